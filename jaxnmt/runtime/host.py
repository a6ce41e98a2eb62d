"""Host-side settings for the CPU backend, made before JAX starts: `python -m
jaxnmt.main` calls `prepare(FLAGS.allocator, FLAGS.cpu_library_fusions, multi_process)`
first thing and logs `describe()`. Two settings decide much of a CPU step's time
(measured in BUILD_NOTES.md, "Speed"):

* **XLA:CPU library fusions** (`--cpu_library_fusions`): XLA hands only matrix
  multiplies to YNNPACK by default; `--xla_cpu_experimental_ynn_fusion_type=
  individual_dot,eltwise,reduce` hands it the elementwise loops and reductions too.
  `auto` adds it for the jaxlib versions it was checked with (`TESTED_JAXLIB`;
  `tests/runtime/test_host.py` compares losses with and without it on each install),
  `on` for any jaxlib, `off` never; never over a value the user put in XLA_FLAGS.
  For decoding commands (translate, serve, eval, generate) `auto` hands YNNPACK the
  matrix multiplies and reductions only (`DECODING_LIBRARY_FUSIONS`): their loop runs
  hundreds of small elementwise operations a step, where YNNPACK's fixed cost per call
  (tens of microseconds) outweighs its faster loops.
* **The allocator** (`--allocator`): glibc serves XLA's large per-step temporaries
  with fresh `mmap`s and unmaps them on `free`, so each step page-faults its working
  set in again, 4 KiB at a time. `auto` restarts the process once with tcmalloc
  preloaded when the system has it (`apt install libtcmalloc-minimal4`), which reuses
  that memory; else with glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35 and
  kernel THP `always` or `madvise`), which faults it in 2 MiB at a time; else leaves
  glibc as it is. `tcmalloc`, `hugepages` or a library's path ask for one (an error
  where impossible); `system` keeps glibc as it is; `glibc` tunes glibc in place with
  `mallopt` (no restart; as fast as tcmalloc, but a much larger resident set).

`auto` (either flag) applies nothing unless JAX will compute on the CPU
(`backend_platform`) in a single-process run, where the settings were measured.
Explicit choices are honoured on any backend and process count.

libtpu (the `tpu-compile` extra) on a host without TPU chips only compiles for TPU
slices (`--mode=compile`): it counts as an accelerator only where `tpu_host` finds
chips, and `prepare` sets JAX_PLATFORMS (when unset) so that JAX does not try to start
a TPU backend here, which prints libtpu's complaints about the missing TPU metadata
(compiling for a TPU topology works with it set), and lets several processes load
libtpu at once (ALLOW_MULTIPLE_LIBTPU_LOAD): it has no chips to guard here.

A restart sets LD_PRELOAD or GLIBC_TUNABLES for the loader only: the restarted process
puts both back as the user had them (a private marker variable, removed too, carries
them across `execve`), so the processes it starts inherit the user's environment.
Nothing here imports JAX. Which cluster the process is in (and so whether it is a single
process) is `runtime/clusters.py`'s answer, asked before `prepare`.
"""

import ctypes
import glob
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import sys

from jaxnmt.errors import UserError

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
CPU_LIBRARY_FUSIONS = 'individual_dot,eltwise,reduce'
DECODING_LIBRARY_FUSIONS = 'individual_dot,reduce'
# jaxlib minor versions whose XLA:CPU was measured and checked with CPU_LIBRARY_FUSIONS.
TESTED_JAXLIB = ('0.10.',)
LIBRARY_FUSIONS = ('auto', 'on', 'off')

HUGETLB_TUNABLE = 'glibc.malloc.hugetlb'
_MARKER = '_JAXNMT_HOST_RESTART'  # the user's LD_PRELOAD and GLIBC_TUNABLES, as JSON
_RESTORED = ('LD_PRELOAD', 'GLIBC_TUNABLES')
_ALLOCATOR_NAMES = ('tcmalloc', 'jemalloc', 'mimalloc')
_TCMALLOC_NAMES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
_LIBRARY_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
                 '/usr/lib', '/usr/local/lib', '/lib/x86_64-linux-gnu', '/lib64')
_ACCELERATOR_MODULES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm60_plugin', 'jax_rocm7_plugin')
# The JAX platform each known GPU plugin provides.
_GPU_PLATFORMS = {'jax_cuda12_plugin': 'cuda', 'jax_cuda13_plugin': 'cuda'}
_CHOICES = 'use auto, system, tcmalloc, hugepages, glibc or the path of a malloc library'
# TPU chips on the PCI bus: Google's vendor id and a TPU device id (v3 to TPU7x), as
# JAX's `hardware_utils.num_available_tpu_chips_and_device_id` lists them.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = frozenset({'0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f',
                              '0x0076'})
PCI_DEVICES = '/sys/bus/pci/devices'


class AllocatorError(UserError, ValueError):
  """An --allocator or --cpu_library_fusions choice this host cannot honour."""


def _read(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as handle:
      return handle.read().strip()
  except OSError:
    return ''


def tpu_chips(pci_devices: str = PCI_DEVICES) -> int:
  """The TPU chips on this host's PCI bus (`pci_devices`: sysfs' device folders), counted
  as JAX counts them at `import jax` to decide whether it runs on a Cloud TPU VM."""
  return sum(_read(os.path.join(device, 'device')) in _TPU_PCI_DEVICES
             for device in glob.glob(os.path.join(pci_devices, '*'))
             if _read(os.path.join(device, 'vendor')) == _GOOGLE_PCI_VENDOR)


def tpu_host(environ=os.environ, pci_devices: str = PCI_DEVICES, dev: str = '/dev') -> bool:
  """Whether JAX may compute on TPU chips here: `tpu_chips`, or the devices through which
  TPUs newer than JAX's list would show (`/dev/accel*`, VFIO groups in `/dev/vfio`), or
  JAX_FORCE_TPU_INIT (JAX's own override). TPU_LIBRARY_PATH says nothing: importing
  libtpu sets it, and every process started from one that imported JAX inherits it."""
  if 'JAX_FORCE_TPU_INIT' in environ or tpu_chips(pci_devices):
    return True
  groups = glob.glob(os.path.join(dev, 'vfio', '[0-9]*'))
  return bool(groups or glob.glob(os.path.join(dev, 'accel*')))


def tpu_runtime_installed(environ=os.environ) -> bool:
  """libtpu installed (or named by TPU_LIBRARY_PATH): on a TPU host, JAX's TPU runtime;
  elsewhere the TPU compiler only (`tpu_compiler_only`). Found without importing it."""
  return (bool(environ.get('TPU_LIBRARY_PATH')) or
          importlib.util.find_spec('libtpu') is not None)


def tpu_compiler_only(environ=os.environ) -> bool:
  """libtpu installed on a host without TPU chips, where it only compiles for TPUs."""
  return tpu_runtime_installed(environ) and not tpu_host(environ)


def accelerator_plugins(environ=os.environ, tpu: bool | None = None) -> list[str]:
  """The JAX accelerator plugins installed, found as JAX finds them but without
  importing anything: known modules, `jax_plugins.*`, `jax_plugins` entry points.
  libtpu only where `tpu` (default: `tpu_host(environ)`): without TPU chips JAX computes
  elsewhere, and libtpu serves to compile for TPUs."""
  tpu = tpu_host(environ) if tpu is None else tpu
  found = [name for name in _ACCELERATOR_MODULES
           if (tpu or name != 'libtpu') and importlib.util.find_spec(name)]
  spec = importlib.util.find_spec('jax_plugins')
  if spec and spec.submodule_search_locations:
    found += [f'jax_plugins.{module.name}'
              for module in pkgutil.iter_modules(spec.submodule_search_locations)]
  found += [point.value for point in importlib.metadata.entry_points(group='jax_plugins')]
  if environ.get('PJRT_NAMES_AND_LIBRARY_PATHS'):
    found.append('PJRT_NAMES_AND_LIBRARY_PATHS')
  return list(dict.fromkeys(found))


def backend_platform(environ, plugins) -> str:
  """The platform JAX will compute on: JAX_PLATFORM_NAME if set (it picks the default
  backend), else the first entry of JAX_PLATFORMS, else the first accelerator plugin
  installed (`accelerator_plugins`), else 'cpu'."""
  chosen = (environ.get('JAX_PLATFORM_NAME', '').strip()
            or environ.get('JAX_PLATFORMS', '').split(',')[0].strip())
  return chosen.lower() if chosen else (plugins[0] if plugins else 'cpu')


def quiet_platforms(environ, plugins) -> str | None:
  """The JAX_PLATFORMS that keeps JAX from trying the TPU backend on a host where
  libtpu is installed without TPU chips (`tpu_host`), or None to leave JAX its choice:
  'cpu', or 'cuda,cpu' with a CUDA plugin (JAX skips CUDA where no NVIDIA GPU shows,
  as it does unasked). `plugins`: `accelerator_plugins` less libtpu. None where the user
  chose (JAX_PLATFORMS, JAX_PLATFORM_NAME) or another plugin is installed, whose
  platform name is not known here."""
  chosen = environ.get('JAX_PLATFORMS', '').strip() or environ.get('JAX_PLATFORM_NAME', '')
  if chosen or not tpu_compiler_only(environ):
    return None
  if any(plugin not in _GPU_PLATFORMS for plugin in plugins):
    return None
  return ','.join(dict.fromkeys([*(_GPU_PLATFORMS[plugin] for plugin in plugins), 'cpu']))


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def cpu_xla_flags(current: str, jaxlib_version: str | None = None,
                  force: bool = False, fusions: str = CPU_LIBRARY_FUSIONS) -> str:
  """XLA_FLAGS with the CPU library fusions added, unless `current` already chooses
  them or (without `force`) this jaxlib was not tested with them."""
  jaxlib_version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  if YNN_FLAG in current or not (force or jaxlib_version.startswith(TESTED_JAXLIB)):
    return current
  return f'{current} {YNN_FLAG}={fusions}'.strip()


def find_tcmalloc(directories=_LIBRARY_DIRS) -> str | None:
  paths = (os.path.join(folder, name) for folder in directories for name in _TCMALLOC_NAMES)
  return next((path for path in paths if os.path.exists(path)), None)


def glibc_version() -> tuple[int, ...]:
  """(2, 36) for glibc 2.36; () on other C libraries."""
  name = (os.confstr('CS_GNU_LIBC_VERSION') or '') if sys.platform == 'linux' else ''
  try:
    return tuple(int(part) for part in name.split()[1].split('.')[:2])
  except (ValueError, IndexError):
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
  """Whether glibc's `glibc.malloc.hugetlb` tunable works here (glibc >= 2.35 and a
  kernel THP mode other than 'never')."""
  return glibc_version() >= (2, 35) and transparent_hugepages() in ('always', 'madvise')


def restart_environment(allocator: str, environ, tcmalloc: str | None,
                        hugepages: bool) -> dict | None:
  """The environment to restart with for `allocator`, or None to go on as is ('auto':
  tcmalloc, else huge pages, unless the user preloaded an allocator or set the hugetlb
  tunable). `tcmalloc`: the library found; `hugepages`: `hugepages_available()`."""
  preload, tunables = environ.get('LD_PRELOAD', ''), environ.get('GLIBC_TUNABLES', '')
  if allocator == 'auto':
    users = HUGETLB_TUNABLE in tunables or any(name in preload for name in _ALLOCATOR_NAMES)
    allocator = ('system' if users or sys.platform != 'linux' else
                 'tcmalloc' if tcmalloc else 'hugepages' if hugepages else 'system')
  if allocator in ('system', 'glibc'):
    return None
  if sys.platform != 'linux':
    raise AllocatorError(f'--allocator={allocator}: needs Linux ({_CHOICES})')
  if allocator == 'hugepages':
    if not hugepages:
      raise AllocatorError('--allocator=hugepages: needs glibc >= 2.35 and the kernel\'s '
                           'transparent huge pages (/sys/kernel/mm/transparent_hugepage/'
                           'enabled: always or madvise)')
    if f'{HUGETLB_TUNABLE}=1' in tunables.split(':'):
      return None  # set already
    changed = {'GLIBC_TUNABLES': f'{tunables}:{HUGETLB_TUNABLE}=1'.lstrip(':')}
  elif allocator == 'tcmalloc' and not tcmalloc:
    raise AllocatorError(f'--allocator=tcmalloc: not found in {", ".join(_LIBRARY_DIRS)} '
                         '(Debian/Ubuntu: apt install libtcmalloc-minimal4; or pass its path)')
  elif allocator != 'tcmalloc' and not os.path.isfile(allocator):
    raise AllocatorError(f'--allocator={allocator}: no such library ({_CHOICES} such as '
                         '/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4)')
  else:
    library = tcmalloc if allocator == 'tcmalloc' else os.path.abspath(allocator)
    if library in preload.replace(':', ' ').split():
      return None  # preloaded already
    changed = {'LD_PRELOAD': f'{library} {preload}'.strip()}
  saved = {name: environ.get(name) for name in _RESTORED}
  return {**environ, **changed, _MARKER: json.dumps({**saved, 'set': changed})}


def restore_environment(environ) -> dict | None:
  """After a restart: removes the marker and puts LD_PRELOAD and GLIBC_TUNABLES back as
  the user had them (the loader has applied them already). Returns the variables the
  restart set, or None if this process does not come from one."""
  if (marker := environ.pop(_MARKER, None)) is None:
    return None
  saved = json.loads(marker)
  for name in _RESTORED:
    if saved[name] is None:
      environ.pop(name, None)
    else:
      environ[name] = saved[name]
  return saved['set']


# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_glibc_tuned = False


def tune_glibc_malloc() -> bool:
  """Makes glibc keep and reuse freed memory: one arena (other arenas `mmap` large
  blocks whatever the settings), no `mmap` for large blocks, no trimming (a positive
  threshold is at most 2 GiB, less than a large step frees), the heap grown 64 MiB at
  a time. Call before other threads start. Returns whether glibc took the settings."""
  global _glibc_tuned
  if not glibc_version():
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
              (_M_TOP_PAD, 64 << 20))
  _glibc_tuned = all([mallopt(parameter, value) == 1 for parameter, value in settings])
  return _glibc_tuned


_state: dict | None = None  # what `prepare` did, for `describe`


def prepare(allocator: str = 'auto', library_fusions: str = 'auto',
            multi_process: bool = False, decoding: bool = False) -> None:
  """Applies --allocator and --cpu_library_fusions (see the module docstring). Call once,
  first thing, before JAX is imported and other threads start: it may restart this
  command once (`execve` of the same argv); later calls do nothing. `decoding`: the
  command mostly decodes (library fusions `auto` then adds DECODING_LIBRARY_FUSIONS)."""
  global _state
  if _state is not None:
    return
  if library_fusions not in LIBRARY_FUSIONS:
    raise AllocatorError(f'--cpu_library_fusions={library_fusions}: use auto, on or off')
  restarted = restore_environment(os.environ)  # before anything reads LD_PRELOAD
  plugins = accelerator_plugins()
  platform = backend_platform(os.environ, plugins)
  skipped = (f'the backend is {platform}, not the CPU' if platform != 'cpu' else
             'a multi-process run' if multi_process else '')
  state = {'allocator': allocator, 'skipped': skipped, 'restarted': restarted,
           'added': '', 'notes': []}
  if restarted is None and allocator != 'glibc' and not (allocator == 'auto' and skipped):
    environment = restart_environment(allocator, os.environ, find_tcmalloc(),
                                      hugepages_available())
    if environment is not None:
      sys.stdout.flush()
      sys.stderr.flush()
      try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
      except OSError as error:
        state['notes'].append(f'could not restart with --allocator={allocator}: {error}')
  if tpu_compiler_only():
    # libtpu locks /tmp/libtpu_lockfile to own the chips; without chips there is nothing
    # to own, and compiles for TPUs may run side by side.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if (platforms := quiet_platforms(os.environ, plugins)) is not None:
    os.environ['JAX_PLATFORMS'] = platforms
    if (jax := sys.modules.get('jax')) is not None and jax.config.jax_platforms is None:
      jax.config.update('jax_platforms', platforms)  # imported before (cluster detection)
    state['notes'].append(f'JAX_PLATFORMS={platforms}: libtpu is installed, but this host '
                          'has no TPU chips')
  if allocator == 'glibc' and not any(name in os.environ.get('LD_PRELOAD', '')
                                      for name in _ALLOCATOR_NAMES):
    if not tune_glibc_malloc():
      raise AllocatorError('--allocator=glibc: needs GNU libc (use auto, system, tcmalloc '
                           'or the path of a malloc library)')
  if library_fusions == 'on' or (library_fusions == 'auto' and not skipped):
    before, version = os.environ.get('XLA_FLAGS', ''), _jaxlib_version()
    fusions = (DECODING_LIBRARY_FUSIONS if decoding and library_fusions == 'auto' else
               CPU_LIBRARY_FUSIONS)
    os.environ['XLA_FLAGS'] = cpu_xla_flags(before, version, force=library_fusions == 'on',
                                            fusions=fusions)
    state['added'] = os.environ['XLA_FLAGS'][len(before):].strip()
    if YNN_FLAG in before:
      state['notes'].append(f'XLA_FLAGS already sets {YNN_FLAG}: kept')
    elif not version.startswith(TESTED_JAXLIB):
      state['notes'].append(f'jaxlib {version or "(none)"} is not tested with the CPU '
                            'library fusions' + (': added as asked' if state['added'] else
                                                 ' (--cpu_library_fusions=on adds them)'))
  _state = state


def describe_allocator() -> str:
  """How this process allocates host memory, for logs and bench.json."""
  try:
    with open('/proc/self/maps', encoding='utf-8') as maps:
      loaded = {line.split()[-1] for line in maps if '/' in line}
  except OSError:
    loaded = set()
  for name in _ALLOCATOR_NAMES:
    if paths := sorted(path for path in loaded if name in os.path.basename(path)):
      return f'{name} ({paths[0]})'
  ours = (_state or {}).get('restarted') or {}
  if ours.get('LD_PRELOAD'):
    library = ours['LD_PRELOAD'].split()[0]
    found = os.path.realpath(library) in loaded or not loaded
    return f'{library} (preloaded{"" if found else " but not loaded"})'
  if _glibc_tuned:
    name = 'glibc malloc (tuned: one arena, no mmap, no trim)'
  elif f'{HUGETLB_TUNABLE}=1' in ours.get('GLIBC_TUNABLES',
                                          os.environ.get('GLIBC_TUNABLES', '')):
    name = 'glibc malloc (transparent huge pages)'
  else:
    name = 'glibc malloc'
  preload = os.environ.get('LD_PRELOAD')
  return f'{name} (LD_PRELOAD={preload})' if preload else name


def describe() -> str:
  """One line for the log: the allocator running, the XLA flags added, and why
  nothing was applied where that is so."""
  if _state is None:
    return f'allocator: {describe_allocator()}; host.prepare was not called'
  allocator, skipped = describe_allocator(), _state['skipped']
  if _state['allocator'] == 'auto' and not skipped and allocator == 'glibc malloc':
    allocator += ' (tcmalloc makes CPU steps faster: apt install libtcmalloc-minimal4)'
  line = f'allocator: {allocator}; XLA_FLAGS added: {_state["added"] or "none"}'
  if skipped:
    line += f'; --allocator=auto and --cpu_library_fusions=auto apply nothing: {skipped}'
  return '; '.join([line, *_state['notes']])
