"""Sharding proven on the TPU compiler: the test config's train step compiled for small
v5e slices (compile-only devices from libtpu), asserted from the compiled program."""

import math

import jax
import pytest

from jaxnmt import config_lib
from jaxnmt.model import initialize
from jaxnmt.runtime import hlo
from jaxnmt.runtime import sharding
from jaxnmt.runtime import topology
from jaxnmt.training import fit
from jaxnmt.training import preflight
from tests.tiny_config import tiny_config

V5E_HBM = 16 * 2**30


def _config(data: int, fsdp: int = 1, tensor: int = 1):
  """The test config a little wider (heads and MLP split 4 ways), on a mesh."""
  config = tiny_config('')
  config.model.update(d_model=64, num_heads=4, d_ff=128)
  config.tokenizer.vocab_size = 512
  config.data.update(batch_size=16, eval_batch_size=16)
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return config, config_lib.model_config(config, 512)


def _train_step(config, model_cfg, name='v5e-8'):
  report = preflight.compile_function('train_step', config, model_cfg,
                                      topology.devices(topology.parse(name)), V5E_HBM)
  assert report.fits and report.flops > 0 and report.compile_s > 0
  return report


def _param_bytes(model_cfg) -> int:
  return sum(leaf.size * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(initialize.abstract_params(model_cfg)))


@pytest.mark.slow
def test_a_data_only_mesh_reduces_exactly_the_gradients(libtpu):
  config, model_cfg = _config(data=8)
  report = _train_step(config, model_cfg)
  assert {(item['kind'], item['axes']) for item in report.collectives} == {
      ('all-reduce', ('data',))}
  # The gradients once, except the shared vocabulary matrix's: the compiler reduces its
  # gradient from the chunked output layer apart from the lookups' (a few scalars too).
  params, vocabulary = _param_bytes(model_cfg), 512 * 64 * 4
  assert params <= report.collective_bytes() <= params + vocabulary + 1024


@pytest.mark.slow
def test_fsdp_splits_parameters_and_optimizer_state_across_chips(libtpu):
  config, model_cfg = _config(data=1, fsdp=8)
  report = _train_step(config, model_cfg)
  tx_state = report.state['params'] + report.state['opt_state']
  # Planned from the shardings: a parameter with an `embed` axis is split 8 ways, the
  # rest (norm scales, biases without it) are replicated.
  params = initialize.abstract_params(model_cfg)
  mesh, rules = sharding.plan_mesh(config, topology.devices(topology.parse('v5e-8')))
  with_embed = sum(leaf.size * 4 for leaf, spec in zip(
      jax.tree.leaves(params), jax.tree.leaves(sharding.state_shardings(
          params, mesh, rules))) if spec.spec and any(spec.spec))
  replicated = _param_bytes(model_cfg) - with_embed
  expected = 3 * (with_embed / 8 + replicated)  # parameters and Adam's two moments
  assert abs(tx_state - expected) <= 0.1 * expected
  # ... and the compiled program's arguments hold exactly that (plus the batch shard).
  batch = sum(math.prod(shape) * 4 // 8 for shape in fit.batch_shapes(config, 16).values())
  assert abs(hlo.argument_bytes(report.compiled) - batch - tx_state) <= 0.1 * tx_state
  assert tx_state < 0.25 * 3 * _param_bytes(model_cfg)


@pytest.mark.slow
def test_tensor_parallel_collectives_run_over_the_tensor_axis(libtpu):
  config, model_cfg = _config(data=2, tensor=4)
  report = _train_step(config, model_cfg)
  by_axes = {}
  for item in report.collectives:
    by_axes.setdefault(item['axes'], []).append(item)
  # Attention heads, MLP units and the vocabulary are split: their partial sums are
  # all-reduced over `tensor`, every layer.
  tensor = {item['kind']: item for item in by_axes[('tensor',)]}
  assert tensor['all-reduce']['count'] >= 2 * (1 + 1)
  # No tensor-split parameter is gathered whole: an all-gather over `tensor` is smaller
  # than the smallest of them (a query kernel, d_model x d_model).
  if 'all-gather' in tensor:
    assert tensor['all-gather']['largest'] < 64 * 64 * 4
  # The gradients reduce over data only.
  assert {item['kind'] for item in by_axes[('data',)]} == {'all-reduce'}
  assert set(by_axes) <= {('tensor',), ('data',), ('data', 'tensor')}


def test_meshes_the_state_cannot_fit_are_cut_before_compiling(libtpu):
  config, model_cfg = _config(data=1)
  meshes = preflight.candidate_meshes(config, 8)
  assert {'data': 8, 'fsdp': 1, 'tensor': 1} in meshes
  assert {'data': 1, 'fsdp': 2, 'tensor': 4} in meshes
  assert all(math.prod(mesh.values()) == 8 for mesh in meshes)
  assert not any(mesh['tensor'] == 8 for mesh in meshes)  # 4 heads do not split 8 ways
  candidates = preflight.plan(config, model_cfg, topology.devices(topology.parse('v5e-8')),
                              hbm_bytes=1024, log=lambda line: None)
  assert len(candidates) == len(meshes)
  assert all(c.report is None and c.cut.startswith('state') for c in candidates)


def test_the_planner_ranks_fitting_meshes_by_bytes_communicated():
  def candidate(data, needed, communicated, cut=''):
    report = preflight.Report('train_step', {'data': data}, 16, {'params': 1}, hbm_bytes=100,
                              memory={'peak': needed},
                              collectives=[{'bytes': communicated, 'crosses_slices': False}])
    return preflight.Candidate({'data': data}, 'none', 1, None if cut else report, cut)
  ranked = preflight.rank([candidate(1, 150, 0), candidate(2, 90, 500), candidate(4, 80, 200),
                           candidate(8, 0, 0, cut='state'), candidate(16, 60, 200)])
  assert [c.mesh['data'] for c in ranked] == [16, 4, 2, 1, 8]
  assert ranked[0].flags() == '--config.mesh.data=16'


def test_candidate_meshes_respect_processes_and_slices():
  config, _ = _config(data=1)
  config.data.update(batch_size=32, eval_batch_size=32)
  two_slices = preflight.candidate_meshes(config, 8, processes=2, slices=2)
  assert two_slices and all(mesh['data'] % 2 == 0 for mesh in two_slices)
  assert all(math.prod(mesh.values()) == 8 for mesh in two_slices)
  assert len(two_slices) < len(preflight.candidate_meshes(config, 8))
  # A batch of 2 rows cannot split over 4 processes, on any mesh.
  config.data.update(batch_size=2, eval_batch_size=2)
  assert preflight.candidate_meshes(config, 8, processes=4) == []


@pytest.mark.slow
def test_the_base_config_fits_a_v4_16_with_its_state_split_8_ways(libtpu):
  """configs/base.py as shipped, its train step compiled for a v4-16 (8 chips) with
  `fsdp=8`: it fits a v4 chip's 32 GiB, the parameters and Adam's moments per chip are
  an eighth of the whole plus the replicated parts (within 10%), and the step's
  collectives run over `fsdp` alone."""
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.mesh.update(data=1, fsdp=8, tensor=1)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  devices = topology.devices(topology.parse('v4-16'))
  report = preflight.compile_function('train_step', config, model_cfg, devices, 32 * 2**30)
  assert report.fits and report.flops > 0
  params = initialize.abstract_params(model_cfg)
  mesh, rules = sharding.plan_mesh(config, devices)
  split = sum(leaf.size * leaf.dtype.itemsize for leaf, spec in zip(
      jax.tree.leaves(params), jax.tree.leaves(sharding.state_shardings(
          params, mesh, rules))) if spec.spec and any(spec.spec))
  replicated = _param_bytes(model_cfg) - split
  expected = 3 * (split / 8 + replicated)
  state = report.state['params'] + report.state['opt_state']
  assert abs(state - expected) <= 0.1 * expected, (state, expected)
  assert {item['axes'] for item in report.collectives} == {('fsdp',)}
