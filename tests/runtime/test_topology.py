"""TPU slices and GPU clusters by name, and their compile-only devices from libtpu."""

import pytest

from jaxnmt.runtime import topology


@pytest.mark.parametrize('name, libtpu_name, chips, cloud_name', [
    ('v5e-256', 'v5e:16x16', 256, 'v5e-256'),
    ('v5litepod-16', 'v5e:4x4', 16, 'v5e-16'),
    ('v5e:4x8', 'v5e:4x8', 32, 'v5e-32'),
    ('v4-32', 'v4:2x2x4', 16, 'v4-32'),  # v4-N counts TensorCores: 16 chips
    ('v4-8', 'v4:2x2x1', 4, 'v4-8'),
    ('v5p-128', 'v5p:4x4x4', 64, 'v5p-128'),
    ('v6e-64', 'v6e:8x8', 64, 'v6e-64'),
    ('v5e-1', 'v5e:1x1', 1, 'v5e-1'),
])
def test_cloud_and_libtpu_names_give_the_slice(name, libtpu_name, chips, cloud_name):
  tpu_slice = topology.parse(name)
  assert (tpu_slice.libtpu_name, tpu_slice.chips, tpu_slice.name) == (
      libtpu_name, chips, cloud_name)


def test_slices_and_gpu_clusters():
  assert topology.parse('v5e-256', num_slices=2).chips == 512
  assert topology.parse('v5e-256', num_slices=2).name == '2 x v5e-256'
  assert topology.parse('v5e-16').hbm_bytes == 16 * 2**30
  cluster = topology.parse('h100-16')
  assert (cluster.shape, cluster.chips, cluster.chip.platform) == ((2, 8), 16, 'cuda')


@pytest.mark.parametrize('name, words', [
    ('v7-8', 'expected a Cloud TPU name'),
    ('v4-7', 'counts TensorCores'),
    ('v5e-12', 'power-of-two'),
    ('v5e:4x4x4', '2 axes'),
    ('h100-12', 'nodes of 8'),
    ('tpu', 'expected a Cloud TPU name'),
])
def test_a_bad_name_is_one_line_naming_it(name, words):
  with pytest.raises(topology.TopologyError, match=words) as raised:
    topology.parse(name)
  assert '\n' not in str(raised.value)


@pytest.mark.parametrize('name, count, kind', [
    ('v5e-8', 8, 'TPU v5 lite'), ('v5e-1', 1, 'TPU v5 lite'),
    ('v4-16', 8, 'TPU v4'),  # one device per chip (megacore), as JAX shows a v4
    ('v5p-16', 8, 'TPU v5'),
])
def test_libtpu_gives_one_device_per_chip(libtpu, name, count, kind):
  found = topology.devices(topology.parse(name))
  assert len(found) == count
  assert {device.device_kind for device in found} == {kind}


@pytest.mark.parametrize('name, hosts', [('v5e-8', 1), ('v5e-16', 4), ('v5e-1', 1),
                                         ('v4-16', 2), ('v6e-8', 1)])
def test_hosts_of_a_slice_as_its_vms_have_them(libtpu, name, hosts):
  found = topology.devices(topology.parse(name))
  assert len({device.process_index for device in found}) == hosts


def test_several_slices_have_their_slice_index(libtpu):
  found = topology.devices(topology.parse('v5e-4', num_slices=2))
  assert sorted(device.slice_index for device in found) == [0] * 4 + [1] * 4
