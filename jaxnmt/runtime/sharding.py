"""The device mesh, logical-axis rules, state shardings and global batches.

Mesh axes: `data` (batch only), `fsdp` (batch, and parameters + optimizer state split),
`tensor` (Megatron-style: attention heads, MLP hidden units and the vocabulary split).
Parameters name their dimensions with logical axes (`model/layers.py`); a short rule table,
`config.sharding_rules`, maps each logical axis to mesh axes.
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.errors import MeshError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH = 'batch'  # the logical axis of the batch dimension of inputs


def mesh_sizes(mesh_config, num_devices: int) -> dict[str, int]:
  """Axis sizes from the config, with one -1 filled with the remaining devices."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  bad = [f'{axis}={size}' for axis, size in sizes.items() if size == 0 or size < -1]
  if bad:
    raise MeshError(f'config.mesh: axis sizes must be >= 1 or -1, got {", ".join(bad)}')
  if len(fill) > 1:
    raise MeshError(f'config.mesh: at most one axis may be -1, got {", ".join(fill)}')
  described = ' x '.join(f'{axis}={size}' for axis, size in sizes.items() if size != 1)
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise MeshError(f'mesh {described} cannot fill {num_devices} devices: '
                      f'{num_devices} is not a multiple of {fixed}')
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise MeshError(f'mesh {described or "1 device"} needs {fixed} devices, found {num_devices}')
  return sizes


def rules_from_config(rules_config) -> list[tuple[str, tuple[str, ...] | None]]:
  """{'embed': 'fsdp', 'batch': 'data,fsdp', 'head_dim': ''} -> flax logical axis rules."""
  rules = []
  for logical, mesh_axes in rules_config.items():
    axes = tuple(axis.strip() for axis in mesh_axes.split(',') if axis.strip())
    unknown = [axis for axis in axes if axis not in MESH_AXES]
    if unknown:
      raise MeshError(f'config.sharding_rules.{logical}: unknown mesh axis {unknown[0]!r}; '
                      f'known: {", ".join(MESH_AXES)}')
    rules.append((logical, axes if axes else None))
  return rules


def mesh_axes_of(rules, logical: str) -> tuple[str, ...]:
  for name, axes in rules:
    if name == logical:
      return axes or ()
  return ()


def check_divisibility(sizes: dict[str, int], rules, dims: dict[str, int]) -> None:
  """Every dimension named in `dims` (logical axis -> size) must divide by the product
  of the mesh axes its rule splits it over."""
  for logical, size in dims.items():
    axes = mesh_axes_of(rules, logical)
    parts = math.prod(sizes[axis] for axis in axes)
    if size % parts:
      split = ' x '.join(f'{axis}={sizes[axis]}' for axis in axes)
      raise MeshError(f'{logical}={size} does not divide by mesh {split} ({parts} parts); '
                      f'change the mesh or config.sharding_rules.{logical}')


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """The mesh of `sizes` over `devices`, laid out on the physical topology. Devices
  of several slices (a multislice TPU job: each device has a `slice_index`) make a
  hybrid mesh: the `data` axis spans the slices (its outer factor, over the data-center
  network), every other axis stays inside a slice (ICI)."""
  devices = jax.devices() if devices is None else devices
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(device, 'slice_index', 0) or 0 for device in devices})
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
  if sizes['data'] % slices:
    raise MeshError(f'mesh data={sizes["data"]} must divide by the {slices} slices: the '
                    f'data axis spans them (set config.mesh.data to a multiple of {slices})')
  ici = (sizes['data'] // slices,) + shape[1:]
  dcn = (slices,) + (1,) * (len(MESH_AXES) - 1)
  try:
    array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                 allow_split_physical_axes=True)
  except (NotImplementedError, ValueError, AssertionError) as error:
    raise MeshError(f'mesh {dict(zip(MESH_AXES, shape))} cannot be laid out over '
                    f'{slices} slices of {len(devices) // slices} chips: '
                    f'{str(error).splitlines()[0][:200]}') from None
  return jax.sharding.Mesh(array, MESH_AXES, axis_types=axis_types)


def plan_mesh(config, devices=None) -> tuple[jax.sharding.Mesh, list]:
  """(mesh, logical-axis rules) of `config` over `devices` (default: all of the job's).
  `config_lib.check_mesh` has checked that they fit."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_sizes(config.mesh, len(devices))
  return make_mesh(sizes, devices), rules_from_config(config.sharding_rules)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules):
  """NamedShardings for a train-state pytree whose parameter leaves carry logical axes
  (optimizer moments inherit them); leaves without axes (step counts) are replicated."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Sharding of [B, L] batch arrays: B split over the batch rule's mesh axes."""
  axes = mesh_axes_of(rules, BATCH)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None, None))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's rows of the batch -> global jax.Arrays laid out per `sharding`."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}


def planned_bytes(abstract_tree, shardings) -> tuple[int, int]:
  """(total bytes, bytes on the fullest device) of a pytree of ShapeDtypeStructs laid
  out per `shardings`, computed without allocating anything."""
  total = per_device = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * itemsize
    per_device += math.prod(leaf_sharding.shard_shape(leaf.shape)) * itemsize
  return total, per_device


def bytes_per_device(tree) -> dict[str, int]:
  """Bytes of `tree`'s arrays held by each device (by device id)."""
  totals = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      key = str(shard.device.id)
      totals[key] = totals.get(key, 0) + shard.data.nbytes
  return totals
