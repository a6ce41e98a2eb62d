"""Fault injection on multi-process runs started through `launch/local.sh`: the slow
tests in tests/training/test_loop_faults.py and the matrix in benchmarks/fault_matrix.py use it.

Each fault runs the tiny test config on N processes, injects the fault once training
is past step FAULT_AFTER (a checkpoint at step 20 is committed by then), and measures
every process's exit code, the seconds from the fault to the last exit, the newest
complete checkpoint and the steps lost; then it restarts the same command and compares
the final parameters with an uninterrupted run's, bit for bit.
"""

import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from tests.helpers import ROOT, committed_steps, final_state

STEPS = 60
FAULT_AFTER = 25
PEER_TIMEOUT_S = 20
COLLECTIVE_TIMEOUT_S = 40
# The timeouts a run gets: SHORT (the fast rows), or DEFAULTS (jaxnmt's own flags).
SHORT = (f'--peer_timeout_s={PEER_TIMEOUT_S}', f'--collective_timeout_s={COLLECTIVE_TIMEOUT_S}')
DEFAULTS = ()
_timeouts = list(SHORT)


def use_timeouts(timeouts) -> None:
  """SHORT or DEFAULTS for every run started from now on."""
  _timeouts[:] = timeouts


def flags(workdir, steps=STEPS, *overrides) -> list[str]:
  return [f'--workdir={workdir}', '--config=tests/tiny_config.py',
          f'--config.num_train_steps={steps}', '--config.checkpoint_every_steps=10',
          '--config.log_every_steps=1', '--config.eval_every_steps=1000',
          '--config.keep_checkpoints=20', '--config.preemption_check_every_steps=5',
          *_timeouts, *overrides]


def environment(corpus, processes, devices, log_dir) -> dict:
  env = dict(os.environ, JAXNMT_TEST_CORPUS=corpus, PYTHON=sys.executable,
             NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS=str(devices),
             LOG_DIR=str(log_dir))
  env.pop('XLA_FLAGS', None)
  return env


def start(workdir, corpus, processes=2, devices=1, steps=STEPS, *overrides):
  log_dir = f'{workdir}.logs'
  return subprocess.Popen(['launch/local.sh', *flags(workdir, steps, *overrides)], cwd=ROOT,
                          env=environment(corpus, processes, devices, log_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def finish(launcher, timeout=900) -> tuple[dict[int, int], str]:
  """Waits for the launcher; returns ({process: exit code}, process 0's stderr)."""
  _, stderr = launcher.communicate(timeout=timeout)
  codes = {int(i): int(code) for i, code in
           re.findall(r'process (\d+) exited with code (\d+)', stderr)}
  return codes, stderr


def run(workdir, corpus, processes=2, devices=1, steps=STEPS, *overrides):
  codes, stderr = finish(start(workdir, corpus, processes, devices, steps, *overrides))
  assert set(codes.values()) == {0}, stderr[-3000:]
  return stderr


def pid_of(workdir, process: int) -> int:
  """The pid of process `process` of the run in `workdir`."""
  pattern = f'--process_id={process} .*--workdir={workdir}( |$)'
  for _ in range(100):
    found = subprocess.run(['pgrep', '-f', '--', pattern], capture_output=True, text=True)
    if found.stdout.split():
      return int(found.stdout.split()[0])
    time.sleep(0.1)
  raise AssertionError(f'no process {process} for {workdir}')


def logged_steps(workdir) -> list[int]:
  path = os.path.join(workdir, 'train', 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as handle:
    return [int(m.group(1)) for m in re.finditer(r'"step": (\d+)', handle.read())]


def wait_for_step(workdir, step, launcher, timeout=300) -> None:
  deadline = time.time() + timeout
  while max(logged_steps(workdir), default=0) < step:
    if launcher.poll() is not None:
      raise AssertionError(finish(launcher)[1][-3000:])
    assert time.time() < deadline, f'step {step} not reached in {timeout} s'
    time.sleep(0.05)


def bitwise_equal(workdir, reference, step) -> bool:
  return all(np.array_equal(a, b) for a, b in
             zip(final_state(workdir, step), final_state(reference, step)))


@dataclasses.dataclass
class Outcome:
  fault: str
  exit_codes: dict
  seconds: float | None  # from the fault to the last exit
  saved: int | None  # newest complete checkpoint after the fault
  at_fault: int | None  # the last step logged when the fault came
  restart_resumed: int | None = None
  bitwise: bool | None = None
  note: str = ''  # process 0's last "error: " line, else the first other process's
  notes: dict = dataclasses.field(default_factory=dict)  # process -> its last error line
  tracebacks: list = dataclasses.field(default_factory=list)  # processes that printed one

  @property
  def lost(self) -> int | None:
    if self.saved is None or self.at_fault is None:
      return None
    return max(self.at_fault - self.saved, 0)


def inject(fault: str, workdir, corpus, processes=2, devices=1) -> Outcome:
  """Runs to FAULT_AFTER, injects `fault`, waits for every process to exit."""
  steps = 100_000 if fault == 'time limit' else STEPS
  overrides = ['--config.train_time_limit_minutes=0.5'] if fault == 'time limit' else []
  launcher = start(workdir, corpus, processes, devices, steps, *overrides)
  if fault == 'time limit':
    wait_for_step(workdir, 1, launcher)
    began = time.time()
  else:
    wait_for_step(workdir, FAULT_AFTER, launcher)
    began = time.time()
    target, signum = parse(fault)
    survivors = [pid_of(workdir, i) for i in range(processes) if i != target]
    os.kill(pid_of(workdir, target), signum)
  at_fault = max(logged_steps(workdir), default=None)
  if fault.startswith('SIGSTOP'):  # a hung process never exits: time the others
    while any(os.path.exists(f'/proc/{pid}') and _state(pid) != 'Z' for pid in survivors):
      assert time.time() - began < 900, 'the others still wait for the hung process'
      time.sleep(0.05)
    seconds = time.time() - began
    subprocess.run(['pkill', '-KILL', '-f', '--',
                    f'--process_id=[0-9]+ .*--workdir={workdir}( |$)'], check=False)
  codes, stderr = finish(launcher)
  if not fault.startswith('SIGSTOP'):
    seconds = time.time() - began
  if fault == 'time limit':
    at_fault = max(logged_steps(workdir), default=None)
    seconds = None
  saved = (committed_steps(workdir) or [None])[-1]
  outcome = Outcome(fault, codes, seconds, saved, at_fault)
  read_outputs(outcome, stderr, f'{workdir}.logs', processes)
  return outcome


TRACEBACK_SIGNS = ('Traceback (most recent call last)', 'Fatal Python error',
                   'Check failure stack trace')


def read_outputs(outcome: Outcome, stderr: str, log_dir, processes: int) -> None:
  """Each process's last `error: ` line, and which processes printed a traceback
  (Python's, or JAX's C++ abort), from process 0's stderr and the others' logs."""
  outputs = {0: stderr}
  for index in range(1, processes):
    path = os.path.join(log_dir, f'process_{index}.log')
    if os.path.exists(path):
      with open(path, encoding='utf-8', errors='replace') as handle:
        outputs[index] = handle.read()
  for index, text in outputs.items():
    lines = [line for line in text.splitlines() if not line.startswith('launch/')]
    note = next((line[len('error: '):] for line in reversed(lines)
                 if line.startswith('error: ')), '')
    if note:
      outcome.notes[index] = note
    if any(sign in text for sign in TRACEBACK_SIGNS):
      outcome.tracebacks.append(index)
  outcome.note = outcome.notes.get(0) or next(iter(outcome.notes.values()), '')


SIGNALS = {'SIGTERM': signal.SIGTERM, 'SIGINT': signal.SIGINT, 'kill -9': signal.SIGKILL,
           'SIGSTOP': signal.SIGSTOP}


def parse(fault: str) -> tuple[int, int]:
  """'kill -9 of process 1' -> (1, SIGKILL); 'SIGSTOP of process 0 (hung)' -> ..."""
  found = re.fullmatch(r'(SIGTERM|SIGINT|kill -9|SIGSTOP) (?:to|of) process (\d+)( \(hung\))?',
                       fault)
  assert found, fault
  return int(found.group(2)), SIGNALS[found.group(1)]


def _state(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as handle:
      return handle.read().rsplit(')', 1)[1].split()[0]
  except OSError:
    return 'gone'


def restart(outcome: Outcome, workdir, corpus, reference_of, processes=2,
            devices=1) -> Outcome:
  """Reruns the same command to the end; compares with `reference_of(steps)`, the
  workdir of an uninterrupted run of that many steps."""
  steps = STEPS if outcome.fault != 'time limit' else outcome.saved + 10
  if os.path.isdir(f'{workdir}.logs'):  # the restart writes its own there
    shutil.copytree(f'{workdir}.logs', f'{workdir}.fault-logs', dirs_exist_ok=True)
  stderr = run(workdir, corpus, processes, devices, steps)
  found = re.search(r'Resumed from checkpoint at step (\d+)', stderr)
  outcome.restart_resumed = int(found.group(1)) if found else None
  outcome.bitwise = bitwise_equal(workdir, reference_of(steps), steps)
  return outcome


def corrupt_latest(workdir) -> int:
  """Truncates the state files of the newest checkpoint; returns its step."""
  latest = committed_steps(workdir)[-1]
  for path in glob.glob(os.path.join(workdir, 'checkpoints', str(latest), 'state', '**',
                                     '*'), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 64:
      with open(path, 'r+b') as handle:
        handle.truncate(os.path.getsize(path) // 2)
  return latest


def coordinator_unreachable(timeout_s=20) -> Outcome:
  """Process 1 of 2 started alone: nobody serves the coordinator address."""
  began = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--coordinator_address=127.0.0.1:9',
       '--num_processes=2', '--process_id=1', f'--distributed_timeout_s={timeout_s}',
       '--config=tests/tiny_config.py', '--workdir=/tmp/jaxnmt-unreachable'],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=timeout_s + 120)
  lines = result.stderr.strip().splitlines()
  return Outcome('coordinator unreachable at start', {1: result.returncode},
                 time.time() - began, None, None,
                 note=lines[-1][len('error: '):] if lines else '')


def copy(source, target) -> None:
  shutil.copytree(source, target)
