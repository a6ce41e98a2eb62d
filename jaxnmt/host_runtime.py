"""Host-side runtime settings that must be in place before JAX starts.

Two settings decide much of a CPU step's time (measured in BUILD_NOTES.md, "Speed"):

* **XLA:CPU library fusions.** By default XLA hands only matrix multiplies to YNNPACK
  and emits the elementwise and reduction loops itself; in a profile of a tiny-model
  step those loops (transposed copies into which XLA had fused long recomputed
  chains) took a third of the threads' time. `cpu_xla_flags` adds
  `--xla_cpu_experimental_ynn_fusion_type=individual_dot,eltwise,reduce`, which hands
  them to YNNPACK as well (tiny steps 1.4x faster on a 2-core CPU). It is
  applied for the jaxlib minor versions it was measured with (losses agree to 1e-5
  over 30 steps; `tests/test_host_runtime.py` checks each install), and never over a
  value the user put in XLA_FLAGS.
* **The allocator.** XLA allocates each step's temporaries anew; glibc's defaults serve
  large blocks with fresh `mmap`s and give them back on `free`, so every step
  page-faults its working set in again, 4 KiB at a time (190,000 faults per
  tiny-model step). `choose_allocator` (called first thing by `python -m jaxnmt.main`)
  restarts the process once with tcmalloc preloaded when the system has it
  (Debian/Ubuntu: `apt install libtcmalloc-minimal4`), which keeps and reuses that
  memory; without tcmalloc, with glibc's `glibc.malloc.hugetlb=1` tunable, which backs
  those blocks with transparent huge pages: still faulted in every step, but 2 MiB at
  a time (~1,000 faults per tiny step; steps 1.2x faster, no more memory).
  `JAXNMT_ALLOCATOR` chooses: `auto` (the default: tcmalloc if found, else huge pages
  where glibc >= 2.35 and the kernel's THP mode allow them, else glibc as it is),
  `hugepages`, `system` (glibc as it is), the path of a malloc library to preload, or
  `glibc`: glibc tuned in place with `mallopt` (`tune_glibc_malloc`: one arena, no
  `mmap` for large blocks, no trimming). Tuned glibc runs tiny-model steps as fast as
  tcmalloc but fragments: its resident set grew to 1.9x glibc's on the tiny model and
  2.5x (14 GiB) on the base model, so it is a choice, not the default.

Nothing here imports JAX, so the launcher and tests can call it first.
"""

import ctypes
import importlib.metadata
import os
import sys

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CPU_LIBRARY_FUSIONS = 'individual_dot,eltwise,reduce'
# jaxlib minor versions whose XLA:CPU was measured and checked with CPU_LIBRARY_FUSIONS.
TESTED_JAXLIB = ('0.10.',)

ALLOCATOR_ENV = 'JAXNMT_ALLOCATOR'
HUGETLB_TUNABLE = 'glibc.malloc.hugetlb'
_DONE_ENV = '_JAXNMT_ALLOCATOR_DONE'
_ALLOCATOR_NAMES = ('tcmalloc', 'jemalloc', 'mimalloc')
_TCMALLOC_NAMES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
_LIBRARY_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
                 '/usr/lib', '/usr/local/lib', '/lib/x86_64-linux-gnu', '/lib64')


class AllocatorError(ValueError):
  """A JAXNMT_ALLOCATOR choice this host cannot honour."""


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def cpu_xla_flags(current: str, jaxlib_version: str | None = None) -> str:
  """XLA_FLAGS with the CPU library fusions added, unless `current` already chooses
  them or this jaxlib was not measured with them."""
  jaxlib_version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  if YNN_FLAG in current or not jaxlib_version.startswith(TESTED_JAXLIB):
    return current
  return f'{current} {YNN_FLAG}={CPU_LIBRARY_FUSIONS}'.strip()


def apply_cpu_xla_flags() -> None:
  """Sets XLA_FLAGS for this process; call before JAX creates its CPU backend."""
  os.environ['XLA_FLAGS'] = cpu_xla_flags(os.environ.get('XLA_FLAGS', ''))


def find_tcmalloc(directories=_LIBRARY_DIRS) -> str | None:
  for directory in directories:
    for name in _TCMALLOC_NAMES:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        return path
  return None


def _allocator_preloaded(environ) -> bool:
  return any(name in environ.get('LD_PRELOAD', '') for name in _ALLOCATOR_NAMES)


def glibc_version() -> tuple[int, ...]:
  """(2, 36) for glibc 2.36; () on other C libraries."""
  name = (os.confstr('CS_GNU_LIBC_VERSION') or '') if sys.platform == 'linux' else ''
  if not name.startswith('glibc '):
    return ()
  try:
    return tuple(int(part) for part in name.split()[1].split('.')[:2])
  except ValueError:
    return ()


def transparent_hugepages(path: str = '/sys/kernel/mm/transparent_hugepage/enabled') -> str:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), '' if unknown."""
  try:
    with open(path, encoding='utf-8') as handle:
      text = handle.read()
  except OSError:
    return ''
  return text[text.find('[') + 1:text.find(']')] if '[' in text else ''


def hugepages_available() -> bool:
  """Whether glibc can back large blocks with transparent huge pages: its
  `glibc.malloc.hugetlb` tunable (glibc >= 2.35) and a kernel whose THP mode is not
  'never'."""
  return glibc_version() >= (2, 35) and transparent_hugepages() in ('always', 'madvise')


def allocator_environment(environ: dict, tcmalloc: str | None,
                          hugepages: bool = False) -> dict | None:
  """The environment to restart with for a faster allocator, or None to go on as is.
  `tcmalloc`: the library found, if any; `hugepages`: whether glibc's huge page
  tunable works here (`hugepages_available`)."""
  choice = environ.get(ALLOCATOR_ENV, 'auto')
  if environ.get(_DONE_ENV) or choice in ('system', 'glibc') or sys.platform != 'linux':
    return None
  preload = environ.get('LD_PRELOAD', '')
  if _allocator_preloaded(environ) or HUGETLB_TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return None  # the user chose an allocator already
  if choice == 'hugepages' and not hugepages:
    raise AllocatorError(f'{ALLOCATOR_ENV}=hugepages: needs glibc >= 2.35 and the '
                            'kernel\'s transparent huge pages (/sys/kernel/mm/'
                            'transparent_hugepage/enabled: always or madvise)')
  if choice == 'hugepages' or (choice == 'auto' and not tcmalloc and hugepages):
    tunables = environ.get('GLIBC_TUNABLES', '')
    return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{HUGETLB_TUNABLE}=1'.lstrip(':'),
            _DONE_ENV: '1'}
  if choice != 'auto':
    if not os.path.exists(choice):
      raise FileNotFoundError(f'{ALLOCATOR_ENV}={choice}: no such library (use auto, '
                              'hugepages, glibc, system or the path of a malloc library '
                              'such as libtcmalloc.so.4)')
    library = choice
  elif tcmalloc:
    library = tcmalloc
  else:
    return None
  return {**environ, 'LD_PRELOAD': f'{library} {preload}'.strip(), _DONE_ENV: '1'}


def reexec_with_allocator() -> None:
  """Restarts this command once with a faster allocator (see the module docstring).
  Call first thing in a `__main__`; returns only when nothing needs to change."""
  environment = allocator_environment(dict(os.environ), find_tcmalloc(),
                                      hugepages_available())
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
  except OSError:
    os.environ[_DONE_ENV] = '1'  # could not restart: go on with the system allocator


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_glibc_tuned = False


def is_glibc() -> bool:
  """Whether this process runs on GNU libc (the C library `tune_glibc_malloc` tunes)."""
  return bool(glibc_version())


def tune_glibc_malloc() -> bool:
  """Makes glibc keep and reuse freed memory: one arena (other threads' arenas would
  `mmap` large blocks whatever the settings), no `mmap` for large blocks, no trimming
  of the heap (-1: never; any positive threshold is at most 2 GiB, and a base-model
  step frees more than that at once), and the heap grown 64 MiB at a time. Call
  before other threads start. Returns whether glibc took the settings (False on other
  C libraries)."""
  global _glibc_tuned
  if not is_glibc():
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
              (_M_TOP_PAD, 64 << 20))
  _glibc_tuned = all([mallopt(parameter, value) == 1 for parameter, value in settings])
  return _glibc_tuned


def choose_allocator() -> None:
  """The allocator choice of `JAXNMT_ALLOCATOR` (see the module docstring): restarts
  once with tcmalloc or the given library, or tunes glibc in place. Call first thing in
  a `__main__`, before other threads start."""
  reexec_with_allocator()  # returns only when this process goes on as it is
  if os.environ.get(ALLOCATOR_ENV) == 'glibc' and not _allocator_preloaded(os.environ):
    tune_glibc_malloc()


def describe_allocator() -> str:
  """How this process allocates host memory, for logs and bench.json."""
  loaded = ''
  try:
    with open('/proc/self/maps', encoding='utf-8') as maps:
      loaded = maps.read()
  except OSError:
    pass
  for name in _ALLOCATOR_NAMES:
    if name in loaded:
      paths = sorted({line.split()[-1] for line in loaded.splitlines() if name in line})
      return f'{name} ({paths[0]})'
  preload = os.environ.get('LD_PRELOAD')
  if _glibc_tuned:
    name = 'glibc malloc (tuned: one arena, no mmap, no trim)'
  elif f'{HUGETLB_TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', ''):
    name = 'glibc malloc (transparent huge pages)'
  else:
    name = 'glibc malloc'
  return f'{name} (LD_PRELOAD={preload})' if preload else name
