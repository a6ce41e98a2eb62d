"""Host runtime settings: the XLA:CPU library fusions and the allocator restart."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from jaxnmt import host_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSIONS = f'{host_runtime.YNN_FLAG}={host_runtime.CPU_LIBRARY_FUSIONS}'


def test_cpu_xla_flags_added_kept_or_left_alone():
  assert host_runtime.cpu_xla_flags('', '0.10.2') == FUSIONS
  assert (host_runtime.cpu_xla_flags('--xla_force_host_platform_device_count=8', '0.10.2')
          == f'--xla_force_host_platform_device_count=8 {FUSIONS}')
  # The user's own choice wins, and an unmeasured jaxlib gets nothing added.
  mine = f'{host_runtime.YNN_FLAG}=individual_dot'
  assert host_runtime.cpu_xla_flags(mine, '0.10.2') == mine
  assert host_runtime.cpu_xla_flags('--foo', '0.11.0') == '--foo'


def test_allocator_environment_choices(tmp_path):
  allocator = host_runtime.allocator_environment
  base = {'PATH': '/usr/bin'}
  # tcmalloc found: preloaded, ahead of what the user preloads, and marked done.
  env = allocator({**base, 'LD_PRELOAD': 'libmine.so'}, '/lib/libtcmalloc.so.4')
  assert env['LD_PRELOAD'] == '/lib/libtcmalloc.so.4 libmine.so'
  assert env['PATH'] == '/usr/bin' and env['_JAXNMT_ALLOCATOR_DONE'] == '1'
  # Nothing to change: no tcmalloc, the opt-out, an allocator the user preloaded, or a
  # process that already restarted.
  assert allocator(base, None) is None
  assert allocator({**base, 'JAXNMT_ALLOCATOR': 'system'}, '/lib/libtcmalloc.so.4') is None
  assert allocator({**base, 'JAXNMT_ALLOCATOR': 'glibc'}, '/lib/libtcmalloc.so.4') is None
  assert allocator({**base, 'LD_PRELOAD': '/x/libjemalloc.so.2'}, '/lib/t.so') is None
  assert allocator({**base, '_JAXNMT_ALLOCATOR_DONE': '1'}, '/lib/t.so') is None
  # An explicit library: preloaded if it exists, a clear error if it does not.
  library = tmp_path / 'libfast.so'
  library.write_bytes(b'')
  env = allocator({**base, 'JAXNMT_ALLOCATOR': str(library)}, None)
  assert env['LD_PRELOAD'] == str(library)
  with pytest.raises(FileNotFoundError, match='JAXNMT_ALLOCATOR=/no/such.so'):
    allocator({**base, 'JAXNMT_ALLOCATOR': '/no/such.so'}, None)
  # No tcmalloc, but glibc's huge page tunable works: restart with it, after the user's
  # own tunables; tcmalloc still comes first, and a user's hugetlb setting is kept.
  env = allocator({**base, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, None, True)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert env['_JAXNMT_ALLOCATOR_DONE'] == '1' and 'LD_PRELOAD' not in env
  assert allocator(base, None, True)['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert 'GLIBC_TUNABLES' not in allocator(base, '/lib/libtcmalloc.so.4', True)
  assert allocator({**base, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, None, True) is None
  assert allocator({**base, 'JAXNMT_ALLOCATOR': 'system'}, None, True) is None
  env = allocator({**base, 'JAXNMT_ALLOCATOR': 'hugepages'}, '/lib/libtcmalloc.so.4', True)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1' and 'LD_PRELOAD' not in env
  with pytest.raises(host_runtime.AllocatorError, match='JAXNMT_ALLOCATOR=hugepages: needs'):
    allocator({**base, 'JAXNMT_ALLOCATOR': 'hugepages'}, None, False)


def test_transparent_hugepage_mode(tmp_path):
  mode = tmp_path / 'enabled'
  mode.write_text('always [madvise] never\n')
  assert host_runtime.transparent_hugepages(str(mode)) == 'madvise'
  mode.write_text('always madvise [never]\n')
  assert host_runtime.transparent_hugepages(str(mode)) == 'never'
  assert host_runtime.transparent_hugepages(str(tmp_path / 'missing')) == ''


def _main(args, **env):
  environment = {k: v for k, v in os.environ.items()
                 if k not in ('_JAXNMT_ALLOCATOR_DONE', 'JAXNMT_ALLOCATOR', 'LD_PRELOAD',
                              'GLIBC_TUNABLES')}
  environment.update(env)
  return subprocess.run([sys.executable, '-m', 'jaxnmt.main', *args], cwd=ROOT,
                        env=environment, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(sys.platform != 'linux', reason='LD_PRELOAD is Linux')
def test_main_restarts_itself_once_with_the_allocator(tmp_path):
  # A library every Linux has stands in for tcmalloc: the restart is what is tested.
  libc = ctypes.util.find_library('c')
  library = next((path for directory in ('/lib/x86_64-linux-gnu', '/lib/aarch64-linux-gnu',
                                         '/lib64', '/usr/lib64', '/lib')
                  if os.path.exists(path := os.path.join(directory, libc or 'libc.so.6'))),
                 None)
  if library is None:
    pytest.skip('no libc.so.6 found to preload')
  workdir = tmp_path / 'empty'
  workdir.mkdir()
  result = _main(['--mode=curves', f'--workdir={workdir}'], JAXNMT_ALLOCATOR=library)
  # The restarted process kept its arguments (the error names the workdir) ...
  assert result.returncode == 1 and f'error: {workdir} holds no metrics' in result.stderr
  # ... and runs with the library preloaded, said once, with the library fusions on.
  lines = [line for line in result.stderr.splitlines() if 'Host allocator:' in line]
  assert len(lines) == 1 and f'LD_PRELOAD={library}' in lines[0], lines
  assert host_runtime.CPU_LIBRARY_FUSIONS in lines[0]
  plain = _main(['--mode=curves', f'--workdir={workdir}'], JAXNMT_ALLOCATOR='system')
  assert 'Host allocator: glibc malloc;' in plain.stderr
  if host_runtime.hugepages_available():
    huge = _main(['--mode=curves', f'--workdir={workdir}'], JAXNMT_ALLOCATOR='hugepages')
    assert 'Host allocator: glibc malloc (transparent huge pages);' in huge.stderr
  tuned = _main(['--mode=curves', f'--workdir={workdir}'], JAXNMT_ALLOCATOR='glibc')
  assert 'Host allocator: glibc malloc (tuned: one arena, no mmap, no trim);' in tuned.stderr
  missing = _main(['--mode=curves', f'--workdir={workdir}'], JAXNMT_ALLOCATOR='/no/lib.so')
  assert missing.returncode == 1 and 'Traceback' not in missing.stderr
  assert 'error: JAXNMT_ALLOCATOR=/no/lib.so: no such library' in missing.stderr


_REUSE = r'''
import ctypes, resource, sys
from jaxnmt import host_runtime
if sys.argv[1] == 'tuned':
  assert host_runtime.tune_glibc_malloc()
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


@pytest.mark.skipif(not host_runtime.is_glibc(), reason='glibc only')
def test_tuned_glibc_reuses_freed_memory():
  """glibc's defaults map a large block anew on each allocation (a page fault per 4 KiB
  touched); tuned, the second and later allocations reuse memory already faulted in."""
  pages = 2 * ((2 << 30) + (256 << 20)) // 4096
  assert _reuse_faults('system') > 0.9 * pages
  assert _reuse_faults('tuned') < 0.05 * pages


def _reuse_faults(mode, **env):
  result = subprocess.run([sys.executable, '-c', _REUSE, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, 'LD_PRELOAD': '', 'GLIBC_TUNABLES': '', **env})
  assert result.returncode == 0, result.stderr[-2000:]
  return int(result.stdout.split()[-1])


@pytest.mark.skipif(not host_runtime.hugepages_available(), reason='no glibc THP tunable')
def test_hugepage_glibc_faults_large_blocks_in_2mib_pages():
  """With glibc.malloc.hugetlb=1 a large block is still mapped anew on each allocation,
  but faulted in 2 MiB at a time: ~1/512 of the 4 KiB faults."""
  pages = 2 * ((2 << 30) + (256 << 20)) // 4096
  assert _reuse_faults('system', GLIBC_TUNABLES='glibc.malloc.hugetlb=1') < 0.05 * pages


_LOSSES = r'''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from jaxnmt import optim, train
from tests.tiny_config import tiny_config
config = tiny_config('')
config.model.d_model, config.model.d_ff, config.model.num_heads = 64, 128, 4
config.model.num_encoder_layers = config.model.num_decoder_layers = 2
config.data.batch_size = 8
mesh, rules = train.plan_mesh(config)
model_cfg = train.model_config(config, 400)
tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
graphdef, state, rest, shardings = train.create_train_state(model_cfg, tx, 0, mesh, rules)
step_fn, _ = train.compile_steps(graphdef, tx, config, mesh, rules, shardings)
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


def test_library_fusions_train_like_xla_default():
  """Guards the fusions against a jaxlib that miscompiles them: five steps of losses and
  gradient norms with XLA's default CPU fusions and with ours agree."""
  flags = host_runtime.cpu_xla_flags('')
  if host_runtime.YNN_FLAG not in flags:
    pytest.skip('this jaxlib gets no library fusions')
  default = _losses(f'{host_runtime.YNN_FLAG}=individual_dot')
  ours = _losses(flags)
  assert default[0] > 5.0  # a real, untrained loss
  assert ours == pytest.approx(default, rel=1e-4)
