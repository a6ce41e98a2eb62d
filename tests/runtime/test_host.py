"""runtime/host: backend detection, the XLA:CPU library fusions, the allocator restart
(and that nothing of it leaks into child processes)."""

import json
import os
import subprocess
import sys

import pytest

from jaxnmt import errors
from jaxnmt.runtime import host
from tests.helpers import ROOT, without_cluster

FUSIONS = f'{host.YNN_FLAG}={host.CPU_LIBRARY_FUSIONS}'
MARKER = host._MARKER  # pylint: disable=protected-access
LIB_DIRS = ('/lib/x86_64-linux-gnu', '/lib/aarch64-linux-gnu', '/usr/lib64', '/lib64', '/lib')


def test_cpu_xla_flags_added_kept_or_left_alone():
  assert host.cpu_xla_flags('', '0.10.2') == FUSIONS
  assert (host.cpu_xla_flags('--xla_force_host_platform_device_count=8', '0.10.2')
          == f'--xla_force_host_platform_device_count=8 {FUSIONS}')
  # The user's own choice wins, even when forced; an untested jaxlib gets nothing
  # unless forced (--cpu_library_fusions=on).
  mine = f'{host.YNN_FLAG}=individual_dot'
  assert host.cpu_xla_flags(mine, '0.10.2') == mine
  assert host.cpu_xla_flags(mine, '0.11.0', force=True) == mine
  assert host.cpu_xla_flags('--foo', '0.11.0') == '--foo'
  assert host.cpu_xla_flags('--foo', '0.11.0', force=True) == f'--foo {FUSIONS}'


def test_backend_platform_without_importing_jax():
  platform = host.backend_platform
  assert platform({}, []) == 'cpu'
  assert platform({'JAX_PLATFORMS': ''}, []) == 'cpu'
  assert platform({}, ['jax_cuda12_plugin']) == 'jax_cuda12_plugin'
  # JAX_PLATFORMS' first entry decides, over the plugins installed ...
  assert platform({'JAX_PLATFORMS': 'cpu'}, ['jax_cuda12_plugin']) == 'cpu'
  assert platform({'JAX_PLATFORMS': 'CUDA,cpu'}, []) == 'cuda'
  assert platform({'JAX_PLATFORMS': 'cpu,tpu'}, ['libtpu']) == 'cpu'
  # ... and JAX_PLATFORM_NAME, which picks JAX's default backend, over both.
  assert platform({'JAX_PLATFORMS': 'cuda,cpu', 'JAX_PLATFORM_NAME': 'cpu'}, ['x']) == 'cpu'
  assert platform({'JAX_PLATFORM_NAME': 'tpu'}, []) == 'tpu'


def test_accelerator_plugins_found_as_jax_finds_them(tmp_path, monkeypatch):
  for module in ('jax_cuda12_plugin', 'libtpu'):
    (tmp_path / module).mkdir()
    (tmp_path / module / '__init__.py').write_text('raise ImportError\n')
  (tmp_path / 'jax_plugins' / 'xla_fake').mkdir(parents=True)  # a namespace package
  (tmp_path / 'jax_plugins' / 'xla_fake' / '__init__.py').write_text('raise ImportError\n')
  info = tmp_path / 'jax_rocm7_plugin-0.1.dist-info'
  info.mkdir()
  (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: jax-rocm7-plugin\nVersion: 0.1\n')
  (info / 'entry_points.txt').write_text('[jax_plugins]\nxla_rocm7 = jax_rocm7_plugin\n')
  assert 'jax_cuda12_plugin' not in host.accelerator_plugins({})
  monkeypatch.syspath_prepend(str(tmp_path))
  found = host.accelerator_plugins({}, tpu=False)
  assert found == ['jax_cuda12_plugin', 'jax_plugins.xla_fake', 'jax_rocm7_plugin'], found
  assert 'jax_cuda12_plugin' not in sys.modules  # found, not imported
  # libtpu is an accelerator on a TPU host only: elsewhere it compiles for TPUs.
  assert host.accelerator_plugins({}, tpu=True) == ['libtpu', *found]
  assert host.accelerator_plugins({'PJRT_NAMES_AND_LIBRARY_PATHS': 'x:/x.so'})[-1] \
      == 'PJRT_NAMES_AND_LIBRARY_PATHS'


def _pci_device(root, slot, vendor, device):
  folder = root / slot
  folder.mkdir(parents=True)
  (folder / 'vendor').write_text(f'{vendor}\n')
  (folder / 'device').write_text(f'{device}\n')


def test_tpu_chips_and_tpu_host_from_sysfs_and_dev(tmp_path):
  pci, dev = tmp_path / 'pci', tmp_path / 'dev'
  dev.mkdir()
  _pci_device(pci, '0000:00:04.0', '0x1ae0', '0x0042')  # Google's gVNIC: not a TPU
  _pci_device(pci, '0000:00:05.0', '0x10de', '0x2330')  # an NVIDIA H100
  (pci / '0000:00:06.0').mkdir()  # no vendor file
  assert host.tpu_chips(str(pci)) == 0
  assert not host.tpu_host({}, str(pci), str(dev))
  (dev / 'vfio').mkdir()
  (dev / 'vfio' / 'vfio').touch()  # VFIO's control node: no device behind it
  assert not host.tpu_host({'TPU_LIBRARY_PATH': '/x/libtpu.so'}, str(pci), str(dev))
  assert host.tpu_host({'JAX_FORCE_TPU_INIT': '1'}, str(pci), str(dev))
  for slot, device in (('0000:00:07.0', '0x0063'), ('0000:00:08.0', '0x0063')):  # v5e
    _pci_device(pci, slot, '0x1ae0', device)
  assert host.tpu_chips(str(pci)) == 2 and host.tpu_host({}, str(pci), str(dev))
  # TPUs newer than JAX's list still show as devices: a VFIO group, or an accel node.
  for node in (dev / 'vfio' / '0', dev / 'accel0'):
    node.touch()
    assert host.tpu_host({}, str(tmp_path / 'none'), str(dev))
    node.unlink()


def test_tpu_ids_are_jaxs():
  """JAX's list of TPU PCI ids, which decides at `import jax` whether this is a TPU VM,
  is ours: a JAX that knows a new TPU fails here until `host` knows it too."""
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  assert set(hardware_utils._TPU_PCI_DEVICE_IDS) <= host._TPU_PCI_DEVICES
  assert hardware_utils._GOOGLE_PCI_VENDOR_ID == host._GOOGLE_PCI_VENDOR
  assert host.tpu_chips() == hardware_utils.num_available_tpu_chips_and_device_id()[0]


skip_on_tpus = pytest.mark.skipif(host.tpu_host(), reason='a TPU host')


@skip_on_tpus
def test_quiet_platforms_where_libtpu_only_compiles():
  quiet = host.quiet_platforms
  libtpu = {'TPU_LIBRARY_PATH': '/x/libtpu.so'}  # installed, as far as `host` can tell
  assert quiet(libtpu, []) == 'cpu'
  assert quiet({**libtpu, 'JAX_PLATFORMS': ' '}, []) == 'cpu'  # JAX: unset
  assert quiet(libtpu, ['jax_cuda13_plugin', 'jax_cuda12_plugin']) == 'cuda,cpu'
  # The user's choice, or a plugin whose platform is not known here: JAX chooses.
  for environ, plugins in (({'JAX_PLATFORMS': 'cpu'}, []), ({'JAX_PLATFORM_NAME': 'cpu'}, []),
                           ({'JAX_FORCE_TPU_INIT': '1'}, []), ({}, ['jax_rocm7_plugin']),
                           ({}, ['jax_cuda12_plugin', 'PJRT_NAMES_AND_LIBRARY_PATHS'])):
    assert quiet({**libtpu, **environ}, plugins) is None, (environ, plugins)


def _marker(env):
  return json.loads(env[MARKER])


def test_restart_environment_choices(tmp_path, monkeypatch):
  restart = host.restart_environment
  base = {'PATH': '/usr/bin'}
  tcmalloc = '/lib/libtcmalloc.so.4'
  # auto, tcmalloc found: preloaded ahead of what the user preloads; the marker keeps
  # the user's own values (None: unset) for the restarted process to put back.
  env = restart('auto', {**base, 'LD_PRELOAD': 'libmine.so'}, tcmalloc, True)
  assert env['LD_PRELOAD'] == f'{tcmalloc} libmine.so' and env['PATH'] == '/usr/bin'
  assert _marker(env) == {'LD_PRELOAD': 'libmine.so', 'GLIBC_TUNABLES': None,
                          'set': {'LD_PRELOAD': f'{tcmalloc} libmine.so'}}
  assert 'GLIBC_TUNABLES' not in env
  # auto, no tcmalloc: huge pages after the user's own tunables, else nothing.
  env = restart('auto', {**base, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, None, True)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert 'LD_PRELOAD' not in env and _marker(env)['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'
  assert restart('auto', base, None, False) is None
  # auto keeps an allocator the user chose; system and glibc never restart.
  assert restart('auto', {**base, 'LD_PRELOAD': '/x/libjemalloc.so.2'}, tcmalloc, True) is None
  assert restart('auto', {**base, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, None, True) is None
  assert restart('system', base, tcmalloc, True) is None
  assert restart('glibc', base, tcmalloc, True) is None
  # Explicit choices: honoured, or a one-line UserError naming the flag.
  env = restart('hugepages', base, tcmalloc, True)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1' and 'LD_PRELOAD' not in env
  assert restart('hugepages', {**base, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, None,
                 True) is None
  with pytest.raises(host.AllocatorError, match='^--allocator=hugepages: needs glibc'):
    restart('hugepages', base, tcmalloc, False)
  assert restart('tcmalloc', base, tcmalloc, False)['LD_PRELOAD'] == tcmalloc
  with pytest.raises(host.AllocatorError, match='^--allocator=tcmalloc: not found'):
    restart('tcmalloc', base, None, True)
  library = tmp_path / 'libfast.so'
  library.write_bytes(b'')
  assert restart(str(library), base, tcmalloc, True)['LD_PRELOAD'] == str(library)
  assert restart(str(library), {**base, 'LD_PRELOAD': str(library)}, None, True) is None
  monkeypatch.chdir(tmp_path)  # a relative path is made absolute for the loader
  assert restart('libfast.so', base, None, True)['LD_PRELOAD'] == str(library)
  with pytest.raises(errors.UserError, match='^--allocator=/no/lib.so: no such library'):
    restart('/no/lib.so', base, tcmalloc, True)
  with pytest.raises(host.AllocatorError, match='^--allocator=jemalloc: no such'):
    restart('jemalloc', base, tcmalloc, True)


def test_restore_environment_puts_the_users_values_back():
  env = host.restart_environment('hugepages', {'LD_PRELOAD': 'libmine.so'}, None, True)
  assert host.restore_environment(env) == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert env == {'LD_PRELOAD': 'libmine.so'}  # the marker and our tunable are gone
  env = {'LD_PRELOAD': '/lib/t.so mine.so', 'GLIBC_TUNABLES': 'x=1', 'A': 'b',
         MARKER: json.dumps({'LD_PRELOAD': 'mine.so', 'GLIBC_TUNABLES': None,
                             'set': {'LD_PRELOAD': '/lib/t.so mine.so'}})}
  assert host.restore_environment(env) == {'LD_PRELOAD': '/lib/t.so mine.so'}
  assert env == {'LD_PRELOAD': 'mine.so', 'A': 'b'}
  assert host.restore_environment(env) is None and env == {'LD_PRELOAD': 'mine.so',
                                                                   'A': 'b'}


def test_transparent_hugepage_mode(tmp_path):
  mode = tmp_path / 'enabled'
  mode.write_text('always [madvise] never\n')
  assert host.transparent_hugepages(str(mode)) == 'madvise'
  mode.write_text('always madvise [never]\n')
  assert host.transparent_hugepages(str(mode)) == 'never'
  assert host.transparent_hugepages(str(tmp_path / 'missing')) == ''


class _Exec(Exception):
  pass


@pytest.fixture(name='prepare')
def _prepare(monkeypatch):
  """Runs `prepare` in this process with execve caught: returns (the environment it
  would restart with or None, describe(), XLA_FLAGS)."""
  def fake_execve(path, argv, env):
    raise _Exec(env)

  def run(allocator, fusions, multi_process=False, tcmalloc=None, hugepages=True,
          jaxlib='0.10.2', decoding=False, **env):
    monkeypatch.setattr(host, '_state', None)
    monkeypatch.setattr(host.os, 'execve', fake_execve)
    monkeypatch.setattr(host, 'find_tcmalloc', lambda: tcmalloc)
    monkeypatch.setattr(host, 'hugepages_available', lambda: hugepages)
    monkeypatch.setattr(host, '_jaxlib_version', lambda: jaxlib)
    monkeypatch.setattr(host, 'accelerator_plugins', lambda: [])
    for name in ('LD_PRELOAD', 'GLIBC_TUNABLES', MARKER, 'JAX_PLATFORM_NAME',
                 'TPU_LIBRARY_PATH', 'ALLOW_MULTIPLE_LIBTPU_LOAD'):
      monkeypatch.setenv(name, '')  # restored after the test, whatever prepare sets
      monkeypatch.delenv(name)
    monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    for name, value in env.items():
      monkeypatch.setenv(name, value)
    try:
      host.prepare(allocator, fusions, multi_process, decoding)
    except _Exec as restart:
      return restart.args[0], None, None
    return None, host.describe(), os.environ['XLA_FLAGS']

  return run


def test_auto_applies_only_on_a_single_cpu_process(prepare):
  env, _, _ = prepare('auto', 'auto', tcmalloc='/lib/libtcmalloc.so.4')
  assert env['LD_PRELOAD'] == '/lib/libtcmalloc.so.4'
  env, line, flags = prepare('auto', 'auto', hugepages=False)
  assert env is None and flags == f'--xla_dump_to=/tmp/x {FUSIONS}'
  assert line.startswith('allocator: glibc malloc (tcmalloc makes CPU steps faster')
  assert f'XLA_FLAGS added: {FUSIONS}' in line
  # Several processes, or an accelerator: auto restarts nothing and adds no flags.
  for kwargs, why in (({'multi_process': True}, 'a multi-process run'),
                      ({'JAX_PLATFORMS': 'cuda,cpu'}, 'the backend is cuda, not the CPU')):
    env, line, flags = prepare('auto', 'auto', tcmalloc='/lib/libtcmalloc.so.4', **kwargs)
    assert env is None and flags == '--xla_dump_to=/tmp/x'
    assert line == ('allocator: glibc malloc; XLA_FLAGS added: none; --allocator=auto and '
                    f'--cpu_library_fusions=auto apply nothing: {why}')


@skip_on_tpus
def test_libtpu_without_tpu_chips_keeps_the_cpu_settings(prepare):
  # libtpu installed, JAX_PLATFORMS unset: the CPU settings apply, and JAX is told to
  # start no TPU backend; the user's own JAX_PLATFORMS is left alone.
  env, line, flags = prepare('auto', 'auto', hugepages=False, JAX_PLATFORMS='',
                             TPU_LIBRARY_PATH='/x/libtpu.so')
  assert env is None and flags == f'--xla_dump_to=/tmp/x {FUSIONS}'
  assert line.endswith('; JAX_PLATFORMS=cpu: libtpu is installed, but this host has no '
                       'TPU chips')
  assert os.environ['JAX_PLATFORMS'] == 'cpu'
  assert os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] == '1'
  _, line, flags = prepare('auto', 'auto', hugepages=False, JAX_PLATFORMS='cpu',
                           TPU_LIBRARY_PATH='/x/libtpu.so')
  assert FUSIONS in flags and 'JAX_PLATFORMS' not in line


@skip_on_tpus
def test_a_cpu_run_with_libtpu_installed_is_a_cpu_run(libtpu, tmp_path):
  """The `tpu-compile` extra installed: `python -m jaxnmt.main` without JAX_PLATFORMS
  applies the CPU settings, computes on the CPU, and prints nothing of libtpu's."""
  assert os.path.isfile(libtpu)
  assert host.backend_platform({}, host.accelerator_plugins({})) == 'cpu'
  env = {k: v for k, v in without_cluster(os.environ).items()
         if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}
  result = subprocess.run([sys.executable, '-m', 'jaxnmt.main', '--mode=translate',
                           f'--workdir={tmp_path / "none"}'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  lines = result.stderr.splitlines()
  assert result.returncode == 2 and 'config.json not found' in lines[-1], result.stderr
  host_line = next(line for line in lines if 'Host: allocator:' in line)
  assert f'XLA_FLAGS added: {host.YNN_FLAG}' in host_line, host_line
  assert "local devices ['cpu:0']" in result.stderr
  # Nothing but jaxnmt's log lines (absl's format) and its one-line error.
  assert all(line[:1] in 'IW' and ' main.py:' in line for line in lines[:-1]), lines


@pytest.mark.slow  # a subprocess start; the fast suite is near its 5 minutes
@skip_on_tpus
def test_a_benchmark_with_libtpu_installed_runs_on_the_cpu_quietly(libtpu):
  """A benchmark that computes in its own process applies the host settings first, as
  `jaxnmt.main` does: with libtpu installed it prints nothing of libtpu's."""
  env = {k: v for k, v in without_cluster(os.environ).items() if k != 'JAX_PLATFORMS'}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  result = subprocess.run(
      [sys.executable, 'benchmarks/sharded_state.py', '--config=tests/tiny_config.py',
       '--config.mesh.data=1', '--config.mesh.fsdp=8'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'allocated per device' in result.stdout
  assert 'tpu' not in (result.stdout + result.stderr).lower(), result.stderr[-2000:]


_TOPOLOGY = r'''
import json, os
from jaxnmt.runtime import host
host.prepare('system', 'auto')
import jax
from jax.experimental import topologies
devices = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices
print(json.dumps({'platforms': os.environ.get('JAX_PLATFORMS'), 'kind': devices[0].device_kind,
                  'count': len(devices), 'default': jax.devices()[0].platform}))
'''


@skip_on_tpus
def test_a_tpu_topology_after_prepare(libtpu):
  """`--mode=compile` gets the devices of a TPU slice with the JAX_PLATFORMS `prepare`
  sets, while JAX computes on the CPU."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run([sys.executable, '-c', _TOPOLOGY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1]) == {
      'platforms': 'cpu', 'kind': 'TPU v5 lite', 'count': 4, 'default': 'cpu'}


def test_decoding_gets_fewer_library_fusions_unless_asked(prepare):
  decoding = f'{host.YNN_FLAG}={host.DECODING_LIBRARY_FUSIONS}'
  _, line, flags = prepare('system', 'auto', decoding=True)
  assert flags == f'--xla_dump_to=/tmp/x {decoding}' and f'added: {decoding}' in line
  _, line, flags = prepare('system', 'on', decoding=True)
  assert flags == f'--xla_dump_to=/tmp/x {FUSIONS}'


def test_explicit_choices_are_honoured_everywhere(prepare):
  for kwargs in ({'multi_process': True}, {'JAX_PLATFORMS': 'tpu'}):
    env, _, _ = prepare('hugepages', 'off', **kwargs)
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
    _, line, flags = prepare('system', 'on', **kwargs)
    assert flags == f'--xla_dump_to=/tmp/x {FUSIONS}' and f'added: {FUSIONS}' in line
  _, line, flags = prepare('system', 'off')
  assert flags == '--xla_dump_to=/tmp/x' and 'added: none' in line
  # 'on' adds the fusions to an untested jaxlib and says so; 'auto' does not.
  _, line, flags = prepare('system', 'on', jaxlib='0.11.0')
  assert FUSIONS in flags and 'jaxlib 0.11.0 is not tested with the CPU library fusions: ' \
      'added as asked' in line
  _, line, flags = prepare('system', 'auto', jaxlib='0.11.0')
  assert FUSIONS not in flags and '(--cpu_library_fusions=on adds them)' in line
  # Never over the user's own value.
  _, line, flags = prepare('system', 'on', XLA_FLAGS=f'{host.YNN_FLAG}=individual_dot')
  assert flags == f'{host.YNN_FLAG}=individual_dot' and ': kept' in line
  with pytest.raises(host.AllocatorError, match='^--allocator=/no/lib.so: no such'):
    prepare('/no/lib.so', 'auto', JAX_PLATFORMS='cuda')
  with pytest.raises(host.AllocatorError, match='^--cpu_library_fusions=yes: use'):
    prepare('auto', 'yes')


def test_prepare_after_a_restart_does_not_restart_again(prepare):
  marker = json.dumps({'LD_PRELOAD': None, 'GLIBC_TUNABLES': 'a=1',
                       'set': {'GLIBC_TUNABLES': 'a=1:glibc.malloc.hugetlb=1'}})
  env, line, _ = prepare('hugepages', 'auto', GLIBC_TUNABLES='a=1:glibc.malloc.hugetlb=1',
                         **{MARKER: marker})
  assert env is None and line.startswith('allocator: glibc malloc (transparent huge pages);')
  assert os.environ['GLIBC_TUNABLES'] == 'a=1' and MARKER not in os.environ
  host.prepare('hugepages', 'auto')  # a second call does nothing
  assert host.describe() == line


# Calls prepare() as main does, then reports what the process and a child it starts see.
_DRIVER = r'''
import json, os, subprocess, sys
from jaxnmt.runtime import host
print('START', flush=True)
try:
  host.prepare(sys.argv[1], sys.argv[2], sys.argv[3] == 'multi')
except host.AllocatorError as error:
  sys.exit(f'error: {error}')
names = ('LD_PRELOAD', 'GLIBC_TUNABLES', host._MARKER)
child = subprocess.run([sys.executable, '-c', 'import json, os, sys; print(json.dumps('
                        '{name: os.environ.get(name) for name in sys.argv[1:]}))', *names],
                       capture_output=True, text=True, check=True)
with open('/proc/self/maps') as maps:
  loaded = sorted({line.split()[-1] for line in maps if '/' in line})
print(json.dumps({'describe': host.describe(), 'loaded': loaded,
                  'env': {name: os.environ.get(name) for name in names},
                  'xla_flags': os.environ.get('XLA_FLAGS', ''),
                  'child': json.loads(child.stdout)}))
'''


def _drive(allocator, fusions='auto', processes='single', **env):
  environment = {k: v for k, v in os.environ.items()
                 if k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', MARKER, 'XLA_FLAGS')}
  environment.update(JAX_PLATFORMS='cpu', **env)
  result = subprocess.run([sys.executable, '-c', _DRIVER, allocator, fusions, processes],
                          cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=60)
  starts = result.stdout.splitlines().count('START')
  report = json.loads(result.stdout.splitlines()[-1]) if result.returncode == 0 else None
  return result, starts, report


def _stand_in_library():
  """A library Python does not load by itself, to preload in tcmalloc's place."""
  for directory in LIB_DIRS:
    for name in ('libz.so.1', 'libbz2.so.1.0', 'liblzma.so.5', 'libexpat.so.1'):
      if os.path.exists(path := os.path.join(directory, name)):
        return path
  pytest.skip('no library found to preload')


@pytest.mark.skipif(sys.platform != 'linux', reason='LD_PRELOAD is Linux')
def test_restart_preloads_once_and_leaks_nothing():
  library = _stand_in_library()
  user = {'LD_PRELOAD': None, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4', MARKER: None}
  if os.path.exists(mine := '/lib/x86_64-linux-gnu/libc.so.6'):
    user['LD_PRELOAD'] = mine  # the user's own preload, kept
  result, starts, report = _drive(library, **{k: v for k, v in user.items() if v})
  assert result.returncode == 0, result.stderr[-2000:]
  # Restarted exactly once, with the library really loaded ...
  assert starts == 2 and os.path.realpath(library) in report['loaded']
  assert report['describe'].startswith(f'allocator: {library} (preloaded); XLA_FLAGS added: ')
  assert host.CPU_LIBRARY_FUSIONS in report['xla_flags']
  # ... and the process and its children see the user's environment, not ours.
  assert report['env'] == user and report['child'] == user


@pytest.mark.skipif(not host.hugepages_available(), reason='no glibc THP tunable')
def test_hugepages_restart_leaks_no_tunables():
  result, starts, report = _drive('hugepages', 'off')
  assert result.returncode == 0, result.stderr[-2000:]
  assert starts == 2
  assert report['describe'] == ('allocator: glibc malloc (transparent huge pages); '
                                'XLA_FLAGS added: none')
  clean = {'LD_PRELOAD': None, 'GLIBC_TUNABLES': None, MARKER: None}
  assert report['env'] == clean and report['child'] == clean and report['xla_flags'] == ''


def test_no_restart_where_nothing_is_asked():
  for args, describe in ((('system', 'on'), 'allocator: glibc malloc; XLA_FLAGS added: '),
                         (('glibc', 'off'), 'allocator: glibc malloc (tuned: one arena, '
                                            'no mmap, no trim); XLA_FLAGS added: none'),
                         (('auto', 'auto', 'multi'), 'allocator: glibc malloc; XLA_FLAGS '
                                                     'added: none; --allocator=auto')):
    result, starts, report = _drive(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert starts == 1 and report['describe'].startswith(describe), report['describe']
  result, starts, _ = _drive('/no/lib.so')
  assert result.returncode == 1 and starts == 1 and 'Traceback' not in result.stderr
  assert 'error: --allocator=/no/lib.so: no such library' in result.stderr


_REUSE = r'''
import ctypes, resource, sys
from jaxnmt.runtime import host
if sys.argv[1] == 'tuned':
  assert host.tune_glibc_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = (2 << 30) + (256 << 20)  # past the 2 GiB that a positive trim threshold allows
faults = []
for _ in range(3):  # a step's temporaries: allocated, written, freed
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  assert block, 'malloc failed'
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
'''


def _reuse_faults(mode, **env):
  result = subprocess.run([sys.executable, '-c', _REUSE, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, 'LD_PRELOAD': '', 'GLIBC_TUNABLES': '', **env})
  assert result.returncode == 0, result.stderr[-2000:]
  return int(result.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not host.glibc_version(), reason='glibc only')
def test_tuned_glibc_reuses_freed_memory():
  """glibc's defaults map a large block anew on each allocation (a page fault per 4 KiB
  touched); tuned, the second and later allocations reuse memory already faulted in."""
  pages = 2 * ((2 << 30) + (256 << 20)) // 4096
  assert _reuse_faults('system') > 0.9 * pages
  assert _reuse_faults('tuned') < 0.05 * pages


@pytest.mark.skipif(not host.hugepages_available(), reason='no glibc THP tunable')
def test_hugepage_glibc_faults_large_blocks_in_2mib_pages():
  """With glibc.malloc.hugetlb=1 a large block is still mapped anew on each allocation,
  but faulted in 2 MiB at a time: ~1/512 of the 4 KiB faults."""
  pages = 2 * ((2 << 30) + (256 << 20)) // 4096
  assert _reuse_faults('system', GLIBC_TUNABLES='glibc.malloc.hugetlb=1') < 0.05 * pages


_LOSSES = r'''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from jaxnmt import config_lib
from jaxnmt.training import optim
from jaxnmt.runtime import sharding
from jaxnmt.training import steps
from jaxnmt.training import train_state
from tests.tiny_config import tiny_config
config = tiny_config('')
config.model.d_model, config.model.d_ff, config.model.num_heads = 64, 128, 4
config.model.num_encoder_layers = config.model.num_decoder_layers = 2
config.data.batch_size = 8
mesh, rules = sharding.plan_mesh(config)
model_cfg = config_lib.model_config(config, 400)
tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
graphdef, state, rest, shardings = train_state.create_train_state(model_cfg, tx, 0, mesh,
                                                                  rules)
step_fn, _ = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
rng = np.random.default_rng(0)
shape = (8, 24)
segments = np.repeat(np.arange(1, 4), 8)[None].repeat(8, 0).astype(np.int32)
segments[:, -3:] = 0
positions = (np.arange(24) % 8)[None].repeat(8, 0).astype(np.int32) * (segments > 0)
tokens = rng.integers(4, 400, shape).astype(np.int32) * (segments > 0)
batch = {'inputs': tokens, 'inputs_segment_ids': segments, 'inputs_positions': positions,
         'decoder_inputs': np.roll(tokens, 1, 1), 'targets': tokens,
         'targets_segment_ids': segments, 'targets_positions': positions}
losses = []
for _ in range(5):
  state, metrics = step_fn(state, rest, batch)
  metrics = jax.device_get(metrics)
  losses.append(float(metrics['loss'] / metrics['tokens']))
  losses.append(float(metrics['grad_norm']))
print('LOSSES ' + json.dumps(losses))
'''


def _losses(xla_flags: str) -> list[float]:
  env = {**os.environ, 'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', _LOSSES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('LOSSES ')][0]
  return json.loads(line[len('LOSSES '):])


@pytest.mark.slow
def test_library_fusions_train_like_xla_default():
  """Guards the fusions against a jaxlib that miscompiles them: five steps of losses and
  gradient norms with XLA's default CPU fusions and with ours agree."""
  flags = host.cpu_xla_flags('')
  if host.YNN_FLAG not in flags:
    pytest.skip('this jaxlib gets no library fusions')
  default = _losses(f'{host.YNN_FLAG}=individual_dot')
  ours = _losses(flags)
  assert default[0] > 5.0  # a real, untrained loss
  assert ours == pytest.approx(default, rel=1e-4)
