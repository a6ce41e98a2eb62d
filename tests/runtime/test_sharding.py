"""runtime/sharding: mesh planning and its one-line errors, the state split by FSDP, and
the same training on 1 device, an 8-device data x fsdp x tensor mesh, and 2 processes
x 4 devices (launch/local.sh, gloo)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from jaxnmt import config_lib
from jaxnmt import errors
from jaxnmt.training import optim
from jaxnmt.runtime import sharding
from jaxnmt.training import train_state
from tests.helpers import ROOT


def mesh_config(data, fsdp, tensor):
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  return config


@pytest.mark.parametrize('sizes, overrides, message', [
    ((4, 1, 4), {}, 'mesh data=4 x tensor=4 needs 16 devices, found 8'),
    ((3, -1, 1), {}, 'mesh data=3 x fsdp=-1 cannot fill 8 devices: 8 is not a multiple of 3'),
    ((-1, -1, 1), {}, 'config.mesh: at most one axis may be -1, got data, fsdp'),
    ((0, 1, 8), {}, 'config.mesh: axis sizes must be >= 1 or -1, got data=0'),
    ((1, 1, 8), {}, 'heads=4 does not divide by mesh tensor=8 (8 parts); change the mesh '
                    'or config.sharding_rules.heads'),
    ((2, 1, 4), {'data.batch_size': 31}, 'batch=31 does not divide by mesh data=2 x fsdp=1'),
    ((1, 2, 4), {'tokenizer.vocab_size': 6002}, 'vocab=6002 does not divide by mesh tensor=4'),
    ((8, 1, 1), {'sharding_rules.embed': 'model'},
     "config.sharding_rules.embed: unknown mesh axis 'model'"),
])
def test_invalid_mesh_is_one_line_error(sizes, overrides, message):
  config = mesh_config(*sizes)
  for field, value in overrides.items():
    section, name = field.split('.')
    config[section][name] = value
  with pytest.raises(errors.MeshError) as error:
    config_lib.check_mesh(config, 8, 1)
  assert str(error.value).startswith(message), str(error.value)
  assert '\n' not in str(error.value)


def test_fill_axis_takes_the_remaining_devices():
  mesh, _ = sharding.plan_mesh(mesh_config(-1, 2, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}


def test_fsdp_splits_parameters_and_optimizer_state_eightfold():
  config = mesh_config(1, 8, 1)
  mesh, rules = sharding.plan_mesh(config)
  tx, _ = optim.make_optimizer(config.optim, 10)
  model_cfg = config_lib.model_config(config, 6000)
  _, state, _, _ = train_state.create_train_state(model_cfg, tx, 0, mesh, rules)
  embedding = state['params']['source_embed']['embedding'][...]
  assert embedding.shape == (6000, 256)
  assert {shard.data.shape for shard in embedding.addressable_shards} == {(6000, 32)}
  moment = state['opt_state'][1][0].mu['source_embed']['embedding'][...]
  assert {shard.data.shape for shard in moment.addressable_shards} == {(6000, 32)}
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  per_device = sharding.bytes_per_device(state)
  assert len(per_device) == 8
  # Everything but a few small replicated vectors (MLP biases, step counts) is split.
  assert max(per_device.values()) < total / 8 * 1.02, (per_device, total)


def run_equivalence(tmp_path, name, mesh, processes=1, devices=1):
  out = tmp_path / f'{name}.npz'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if processes == 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    command = [sys.executable, '-m', 'tests.equivalence_run', f'--mesh={mesh}', f'--out={out}']
  else:
    env.update(NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS=str(devices),
               JAXNMT_MAIN='tests.equivalence_run', PYTHON=sys.executable)
    command = ['launch/local.sh', f'--mesh={mesh}', f'--out={out}']
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(out))


@pytest.mark.slow
def test_one_device_mesh_and_two_processes_train_identically(tmp_path):
  single = run_equivalence(tmp_path, 'single', '1,1,1', devices=1)
  meshed = run_equivalence(tmp_path, 'mesh', '2,2,2', devices=8)
  multi = run_equivalence(tmp_path, 'multi', '2,2,2', processes=2, devices=4)
  assert len(single['losses']) >= 10
  assert single['losses'][-1] < single['losses'][0]
  for other in (meshed, multi):
    np.testing.assert_allclose(other['losses'], single['losses'], rtol=1e-4)
    assert other.keys() == single.keys()
    for key in single:
      np.testing.assert_allclose(other[key], single[key], rtol=1e-4, atol=1e-5, err_msg=key)
  print('\nstep  1-device  8-dev-mesh  2-proc')
  for step, row in enumerate(zip(single['losses'], meshed['losses'], multi['losses'])):
    print(f'{step + 1:4d}  ' + '  '.join(f'{loss:.6f}' for loss in row))
