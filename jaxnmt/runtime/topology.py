"""TPU slices and GPU clusters by name, and their devices on a machine that has none.

`parse('v5e-256')` reads a slice as Cloud TPU names it (`v4-N` and `v5p-N` count
TensorCores, two per chip; `v5litepod-N`, `v5e-N` and `v6e-N` count chips) or as libtpu
does (`v5e:16x16`, `v4:2x2x4`), and `parse('h100-16')` a GPU cluster (16 H100s in
nodes of 8). `devices(slice)` asks the compiler (libtpu from `pip install 'jax[tpu]'`,
or the CUDA plugin from `pip install 'jax[cuda12-local]'`) for its compile-only devices:
a mesh over them lets `jax.jit(...).lower(...).compile()` run the real TPU or GPU
compiler here, without a TPU or a GPU.
"""

import dataclasses
import importlib.util
import math
import os
import re

from jaxnmt.errors import UserError


class TopologyError(UserError, ValueError):
  """An unknown slice name, or no TPU compiler installed."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: its names and what a chip holds (public Cloud TPU specs)."""
  generation: str        # libtpu's name: 'v5e'
  cloud_names: tuple     # Cloud TPU's accelerator-type prefixes
  cores_per_chip: int    # what a Cloud name's N counts per chip
  dimensions: int        # 2-D torus (v5e, v6e) or 3-D (v4, v5p)
  hbm_gib: float         # HBM per chip (usable: for a GPU, JAX's default 75% of it)
  bf16_tflops: float     # peak dense bf16 per chip
  platform: str = 'tpu'


CHIPS = {chip.generation: chip for chip in (
    Chip('v4', ('v4',), 2, 3, 32, 275),
    Chip('v5e', ('v5litepod', 'v5e'), 1, 2, 16, 197),
    Chip('v5p', ('v5p',), 2, 3, 95, 459),
    Chip('v6e', ('v6e',), 1, 2, 32, 918),
)}
# GPUs, by the name of `--topology=<name>-<count>`; `dimensions` is (nodes, per node).
GPUS = {'h100': Chip('h100', ('h100',), 1, 2, 0.75 * 79.1, 989, platform='cuda')}
GPUS_PER_NODE = 8

# The H100 SXM (80 GB) as the CUDA compiler's target (a stream_executor
# GpuTargetConfigProto; figures from NVIDIA's datasheet and XLA's own H100 spec).
_H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Slice:
  """`num_slices` TPU slices of `shape` chips each, joined over the data-center network."""
  chip: Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def chips(self) -> int:
    """Chips in all slices."""
    return math.prod(self.shape) * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f'{self.chip.generation}:{"x".join(map(str, self.shape))}'

  @property
  def name(self) -> str:
    """The Cloud TPU name of one slice, then the slice count: 'v5e-256', '2 x v4-32';
    'h100-16' for GPUs."""
    if self.chip.platform == 'cuda':
      return f'{self.chip.generation}-{math.prod(self.shape)}'
    cloud = (f'{self.chip.cloud_names[-1]}-'
             f'{math.prod(self.shape) * self.chip.cores_per_chip}')
    return cloud if self.num_slices == 1 else f'{self.num_slices} x {cloud}'

  @property
  def hbm_bytes(self) -> int:
    return int(self.chip.hbm_gib * 2**30)


def _torus(chips: int, dimensions: int) -> tuple[int, ...]:
  """The usual shape of a slice of `chips` chips: powers of two, the last axes largest
  (v5e-32 is 4x8; v4-32, 16 chips, is 2x2x4; the smallest v4/v5p slice is 2x2x1)."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f'a slice has a power-of-two number of chips, got {chips}')
  bits = chips.bit_length() - 1
  if dimensions == 3 and bits == 2:
    return (2, 2, 1)
  exponents = [bits // dimensions] * dimensions
  for axis in range(bits % dimensions):
    exponents[dimensions - 1 - axis] += 1
  return tuple(2**exponent for exponent in exponents)


def parse(name: str, num_slices: int = 1) -> Slice:
  """A slice from its Cloud TPU name ('v5e-256', 'v5litepod-16', 'v4-32', 'v5p-128',
  'v6e-64') or libtpu's ('v5e:16x16', 'v4:2x2x4')."""
  text = name.strip().lower()
  if num_slices < 1:
    raise TopologyError(f'--num_slices must be >= 1, got {num_slices}')
  known = ', '.join(f'{prefix}-N' for chip in CHIPS.values() for prefix in chip.cloud_names)
  match = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', text)
  if match:
    chip = CHIPS.get(match.group(1))
    if chip is None:
      raise TopologyError(f'--topology={name}: unknown TPU generation {match.group(1)!r}; '
                          f'known: {", ".join(CHIPS)}')
    shape = tuple(int(size) for size in match.group(2).split('x'))
    if len(shape) != chip.dimensions or min(shape) < 1:
      raise TopologyError(f'--topology={name}: a {chip.generation} slice has '
                          f'{chip.dimensions} axes of chips, e.g. '
                          f'{chip.generation}:{"x".join(["2"] * chip.dimensions)}')
    return Slice(chip, shape, num_slices)
  match = re.fullmatch(r'([a-z0-9]+)-(\d+)', text)
  if match and match.group(1) in GPUS:
    count = int(match.group(2))
    if num_slices != 1:
      raise TopologyError('--num_slices applies to TPU slices; give GPUs as one count')
    if count < 1 or (count > GPUS_PER_NODE and count % GPUS_PER_NODE):
      raise TopologyError(f'--topology={name}: GPUs come in nodes of {GPUS_PER_NODE}: '
                          f'give up to {GPUS_PER_NODE}, or a multiple of it')
    per_node = min(count, GPUS_PER_NODE)
    return Slice(GPUS[match.group(1)], (count // per_node, per_node))
  chip = next((chip for chip in CHIPS.values() if match and match.group(1) in chip.cloud_names),
              None)
  if chip is None:
      raise TopologyError(f'--topology={name}: expected a Cloud TPU name ({known}), '
                        f"libtpu's form (v5e:4x4, v4:2x2x4) or GPUs ("
                        f'{", ".join(f"{gpu}-N" for gpu in GPUS)})')
  count = int(match.group(2))
  if count < chip.cores_per_chip or count & (count - 1):
    raise TopologyError(f'--topology={name}: a slice has a power-of-two number of chips'
                        + (f' ({match.group(1)}-N counts TensorCores, '
                           f'{chip.cores_per_chip} per chip)' if chip.cores_per_chip > 1
                           else ''))
  return Slice(chip, _torus(count // chip.cores_per_chip, chip.dimensions), num_slices)


def compiler_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def _gpu_devices(cluster: Slice) -> list:
  """Compile-only GPUs of `cluster` (process_index = node), from the CUDA plugin."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  nodes, per_node = cluster.shape
  try:
    found = topologies.get_topology_desc(platform='cuda', target_config=_H100_TARGET,
                                         topology=f'1x{nodes}x{per_node}').devices
  except Exception as error:  # pylint: disable=broad-except
    raise TopologyError(
        f'no GPU compiler for --topology={cluster.name}: {str(error).splitlines()[0][:200]} '
        "(pip install 'jax[cuda12-local]' at this jax's version)") from None
  return list(found)


def devices(tpu_slice: Slice) -> list:
  """The compile-only devices of `tpu_slice` (all its slices), from libtpu or the
  CUDA plugin."""
  if tpu_slice.chip.platform == 'cuda':
    return _gpu_devices(tpu_slice)
  if not compiler_installed():
    raise TopologyError("compiling for a TPU slice needs the TPU compiler: pip install -e "
                        "'.[tpu-compile]' (jax[tpu] at this jax's version)")
  # libtpu otherwise looks for the TPU VM it runs on, and says so on stderr (these stay
  # in the environment; they mean nothing to a CPU run).
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # other compiles may run at once
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # One device per chip, as JAX shows a v4 or v5p chip's two TensorCores (megacore).
  options = {'chip_config_name': 'megacore' if tpu_slice.chip.cores_per_chip == 2 else 'default'}
  chips = math.prod(tpu_slice.shape)
  # Hosts of libtpu's default 2x2x1 chips, but a slice smaller than that is one host,
  # and so is an 8-chip v5e or v6e slice (v5litepod-8, v6e-8).
  if chips < 4 or (tpu_slice.chip.dimensions == 2 and chips == 8):
    options['chips_per_host_bounds'] = tuple(tpu_slice.shape) + (1,) * (
        3 - len(tpu_slice.shape))
  try:
    found = topologies.get_topology_desc(
        platform='tpu', topology_name=tpu_slice.libtpu_name,
        num_slices=tpu_slice.num_slices, **options).devices
  except Exception as error:  # pylint: disable=broad-except
    raise TopologyError(f'libtpu has no slice {tpu_slice.libtpu_name} x '
                        f'{tpu_slice.num_slices}: {str(error).splitlines()[0][:200]}') from None
  return list(found)
