"""runtime/distributed: the settings JAX's runtime runs with (read back from how it
behaves), joining a job whose coordinator nobody serves (a clear error in bounded
time), and a straggler named at an agreement point within the collective timeout (on
processes started through launch/local.sh)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from jaxnmt.runtime import coordinator
from tests import faults
from tests.helpers import ROOT

# The JAX release whose runtime these settings were measured on (setup.py pins it).
JAX_VERSION = '0.10.2'

_JOIN = '''
import json, sys, time
from jaxnmt.runtime import coordinator
coordinator.join(60, {peer}, 10, coordinator_address="127.0.0.1:{port}",
                 num_processes=2, process_id=int(sys.argv[1]))
print("joined", json.dumps(coordinator.runtime_settings()), flush=True)
time.sleep(120)
'''


def test_the_jax_release_these_settings_rely_on_is_the_one_installed():
  import jaxlib  # pylint: disable=g-import-not-at-top
  assert (jax.__version__, jaxlib.__version__) == (JAX_VERSION, JAX_VERSION), (
      'jaxnmt sets JAX 0.10.2 runtime internals (runtime/coordinator.join): check '
      'them against this release, then update JAX_VERSION')


@pytest.mark.parametrize('peer_timeout_s', [1, 5, 20, 60, 120, 600])
def test_jax_never_declares_a_death_before_the_peer_watch_has(peer_timeout_s):
  heartbeat = coordinator.heartbeat_timeout_s(peer_timeout_s)
  beat = min(5.0, max(peer_timeout_s / 10, 0.2))  # PeerWatch's interval
  watch_ends_all_by = peer_timeout_s + 4 * beat
  # JAX's clients beat every heartbeat / 2: its service decides heartbeat / 2 after a
  # death at the earliest.
  assert heartbeat / 2 >= watch_ends_all_by + min(0.1 * peer_timeout_s, 20)


def test_the_runtime_declares_a_silent_process_dead_after_the_heartbeat_jaxnmt_set(
    tmp_path):
  """Two processes join through `coordinator.join` with --peer_timeout_s=1 (JAX
  heartbeat 4 s); process 1 is stopped 3 s after joining. JAX's service aborts process
  0 when process 1's last heartbeat is 4 s old: if the service used another timeout,
  or process 1's client did not beat every 2 s after joining, the abort would come
  at another time."""
  peer_timeout_s, heartbeat = 1, coordinator.heartbeat_timeout_s(1)
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  code = _JOIN.format(peer=peer_timeout_s, port=port)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  processes = [subprocess.Popen([sys.executable, '-c', code, str(i)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  try:
    settings = [json.loads(p.stdout.readline().split(' ', 1)[1]) for p in processes]
    joined = time.monotonic()
    assert settings[0]['heartbeat_timeout_s'] == settings[1]['heartbeat_timeout_s'] == 4
    assert settings[0]['service_pid'] and settings[1]['service_pid'] is None
    time.sleep(0.75 * heartbeat - (time.monotonic() - joined))
    processes[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    processes[0].wait(timeout=30)
    seconds = time.monotonic() - stopped
    stderr = processes[0].stderr.read()
  finally:
    for process in processes:
      process.kill()
      process.wait()
  assert processes[0].returncode == -signal.SIGABRT, stderr[-2000:]
  assert 'stopped sending heartbeats' in stderr and '\n1\n' in stderr, stderr[-2000:]
  # Process 1's last heartbeat was 0 to 2 s before the stop (one every 2 s); the
  # service checks about once a second.
  print(f"process 0 aborted by JAX {seconds:.1f} s after process 1 stopped")
  assert heartbeat / 2 - 0.5 <= seconds <= heartbeat + 2.5, seconds


_FINISH = '''
import sys
import jax.numpy as jnp
from jaxnmt.runtime import distributed
distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]), 60, peer_timeout_s=20,
                       collective_timeout_s=30)
distributed._watch._interval_s = 0.0005  # beat all the time: always inside a call
float(jnp.ones(3).sum())
distributed.barrier("the end")
'''


def test_a_job_that_ends_normally_exits_0_on_every_process():
  """Both processes end together while their peer watches beat every 0.5 ms. A watch
  still inside a call of JAX's client when the interpreter finalizes aborts its
  process (exit 134, "terminate called after throwing an instance of"): before the
  watch was stopped at exit, 9 runs in 10 aborted one process or both."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  for _ in range(2):
    with socket.socket() as probe:
      probe.bind(('127.0.0.1', 0))
      port = probe.getsockname()[1]
    processes = [subprocess.Popen(
        [sys.executable, '-c', _FINISH.format(port=port), str(i)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-1500:] \
        + outputs[1][-1500:]


@pytest.mark.slow
def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time():
  outcome = faults.coordinator_unreachable(timeout_s=10)
  assert outcome.exit_codes[1] == 1
  assert outcome.seconds < 60
  assert 'could not join the job through the coordinator 127.0.0.1:9' in outcome.note


@pytest.mark.slow
def test_a_straggler_is_named_at_the_agreement_point_within_the_timeout(tmp_path):
  env = dict(faults.environment('', 2, 1, tmp_path / 'logs'), JAXNMT_MAIN='tests.agree_run')
  began = time.time()
  result = subprocess.run(['launch/local.sh', '--straggle_s=40', '--collective_timeout_s=5',
                           '--peer_timeout_s=60'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  seconds = time.time() - began
  assert 'process 0 exited with code 1' in result.stderr, result.stderr[-2000:]
  assert 'processes 1 did not reach the first stop check within 5 s' in result.stderr
  # Process 1 learns it from process 0's notice, not by waiting out its sleep.
  log = (tmp_path / 'logs' / 'process_1.log').read_text()
  assert 'process 0 failed: processes 1 did not reach' in log
  assert 'process 1 exited with code 1' in result.stderr
  assert seconds < 40, seconds


@pytest.mark.slow
def test_process_0_waiting_for_processes_that_never_come_ends_with_one_line(tmp_path):
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  began = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', '--process_id=0', '--distributed_timeout_s=5',
       '--config=tests/tiny_config.py', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert 'process 0 waited 5 s for the other processes: 0 of 1 connected' in last
  assert 'Traceback' not in result.stderr and 'Fatal Python error' not in result.stderr
  assert time.time() - began < 60
  # The coordination service's process has let the port go.
  deadline = time.time() + 10
  while True:
    try:
      with socket.socket(socket.AF_INET6) as again:
        again.bind(('::', port))
      break
    except OSError:
      assert time.time() < deadline, 'the coordination service still holds the port'
      time.sleep(0.5)
