"""Reading compiled programs: replica groups in each of XLA's spellings, and the
collectives of real programs compiled by the TPU compiler for a slice's devices."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.runtime import hlo
from jaxnmt.runtime import sharding
from jaxnmt.runtime import topology

ALL = ('data', 'fsdp', 'tensor')


@pytest.mark.parametrize('attributes, groups', [
    ('replica_groups={{0,2},{1,3}}, dimensions={0}', [[0, 2], [1, 3]]),
    ('replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}', [[0, 2], [1, 3]]),
    ('replica_groups=[2,2]<=[4], dimensions={0}', [[0, 1], [2, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, x", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}",
     [[0, 2], [1, 3]]),
    ('source_target_pairs={{0,1},{1,0}}, x', [[0, 1], [1, 0]]),
    ('replica_groups={}, to_apply=%add', [[0, 1, 2, 3]]),
])
def test_replica_groups_in_each_spelling(attributes, groups):
  assert hlo._groups(attributes, 4) == groups  # pylint: disable=protected-access


def test_groups_within_part_of_an_axis_are_named_by_it():
  # A data=2 x tensor=4 mesh: device = 4 * data + tensor.
  names, shape = ('data', 'tensor'), (2, 4)
  axes_of = hlo._axes_of  # pylint: disable=protected-access
  assert axes_of([[0, 1, 2, 3], [4, 5, 6, 7]], shape, names, False) == ('tensor',)
  assert axes_of([[0, 4], [1, 5], [2, 6], [3, 7]], shape, names, False) == ('data',)
  assert axes_of([[0, 1], [2, 3], [4, 5], [6, 7]], shape, names, False) == (
      'part of tensor',)
  assert axes_of([[0, 1, 4, 5], [2, 3, 6, 7]], shape, names, False) == (
      'part of data+tensor',)


def test_a_loop_with_a_stated_trip_count_multiplies_its_ops():
  condition = ['  %c = s32[] constant(8)', '  ROOT %lt = pred[] compare(%i, %c), direction=LT']
  assert hlo._trip_count(condition) == 8  # pylint: disable=protected-access
  assert hlo._trip_count(condition[1:]) is None  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def mesh(libtpu):
  return sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2},
                            topology.devices(topology.parse('v5e-8')))


def _compiled(mesh, body, elements=8 * 1024):
  spec = PartitionSpec(ALL)
  function = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
  argument = jax.ShapeDtypeStruct((elements,), jnp.float32, sharding=NamedSharding(mesh, spec))
  return jax.jit(function).lower(argument).compile()


@pytest.mark.parametrize('axes', [('tensor',), ('data',), ('fsdp',), ('data', 'fsdp')])
def test_an_all_reduce_is_found_over_its_mesh_axes(mesh, axes):
  compiled = _compiled(mesh, lambda x: jax.lax.psum(x, axes))
  [found] = hlo.collectives(compiled, mesh)
  assert (found.kind, found.axes, found.count) == ('all-reduce', axes, 1)
  assert found.bytes == 1024 * 4  # this device's 1024 floats
  assert hlo.flops(compiled) > 0 and hlo.memory(compiled)['arguments'] == 4096


def test_ops_in_a_counted_loop_count_once_per_iteration(mesh):
  def body(x):
    return jax.lax.fori_loop(0, 5, lambda i, y: jax.lax.psum(y, 'tensor') * 0.5, x)
  [found] = hlo.collectives(_compiled(mesh, body), mesh)
  assert (found.axes, found.count, found.bytes) == (('tensor',), 5, 5 * 4096)
  assert not found.in_unbounded_loop


def test_a_permute_names_the_axis_it_moves_along(mesh):
  compiled = _compiled(mesh, lambda x: jax.lax.ppermute(x, 'fsdp', [(0, 1), (1, 0)]))
  [found] = hlo.collectives(compiled, mesh)
  assert (found.kind, found.axes) == ('collective-permute', ('fsdp',))


def test_only_collectives_over_the_data_axis_cross_slices(libtpu):
  two_slices = sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1},
                                  topology.devices(topology.parse('v5e-4', num_slices=2)))
  found = {axes: hlo.collectives(_compiled(two_slices, lambda x, a=axes: jax.lax.psum(
      x, a)), two_slices) for axes in [('data',), ('fsdp',)]}
  assert [(c.kind, c.axes, c.crosses_slices, c.bytes) for c in found['data',]] == [
      ('all-reduce', ('data',), True, 4096)]
  assert [(c.kind, c.axes, c.crosses_slices) for c in found['fsdp',]] == [
      ('all-reduce', ('fsdp',), False)]


def test_largest_buffer_names_its_shape(mesh):
  compiled = _compiled(mesh, lambda x: jnp.outer(x, x).sum(0), elements=8 * 512)
  assert hlo.largest_buffer(compiled).startswith('f32[512,512]')


def test_an_async_all_gather_of_fsdp_weights_counts_each_layer_once(libtpu):
  """FSDP weights gathered layer by layer in a scan (the TPU compiler may split an
  all-gather into async fusions holding copies of it): each layer's weights once."""
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1},
                            topology.devices(topology.parse('v5e-8')))
  layers, width = 6, 512

  def forward(weights, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, weights)[0].sum()

  weights = jax.ShapeDtypeStruct((layers, width, width), jnp.float32, sharding=NamedSharding(
      mesh, PartitionSpec(None, 'fsdp', None)))
  x = jax.ShapeDtypeStruct((64, width), jnp.float32,
                           sharding=NamedSharding(mesh, PartitionSpec('fsdp', None)))
  found = {item.kind: item for item in hlo.collectives(
      jax.jit(forward).lower(weights, x).compile(), mesh)}
  assert found['all-gather'].axes == ('fsdp',)
  # Each layer's weights once, in bf16: at the TPU's default matmul precision the
  # compiler converts them before gathering.
  assert found['all-gather'].bytes == layers * width * width * 2
  assert found['all-gather'].count == layers
