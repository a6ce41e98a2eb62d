"""training/loop on several processes under faults (through launch/local.sh, see
tests/faults.py): every stop is agreed, a lost or hung process ends the job in bounded
time with its number in the message, a restart loses nothing (bitwise), and a
checkpoint resumes on another topology with no pair skipped or seen twice."""

import json
import os
import signal

import numpy as np
import pytest

from tests import faults
from tests.helpers import losses_by_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def reference(build_once, small_corpus):
  """Uninterrupted 2-process runs, by number of steps (each made once per test run)."""
  def of(steps):
    def make(folder):
      faults.run(os.path.join(folder, 'run'), small_corpus, 2, 1, steps)
    return os.path.join(build_once(f'fault_reference_{steps}', make), 'run')
  return of


@pytest.mark.parametrize('target', [1, 0])
def test_kill_9_of_one_process_ends_the_job_and_a_restart_loses_nothing(
    target, tmp_path, small_corpus, reference):
  outcome = faults.inject(f'kill -9 of process {target}', str(tmp_path / 'run'),
                          small_corpus)
  survivor = 1 - target
  assert outcome.exit_codes == {target: 128 + signal.SIGKILL, survivor: 1}
  assert outcome.seconds < 60, outcome
  named = 'lost process 0 (the coordinator)' if target == 0 else 'lost process 1'
  assert named in outcome.notes[survivor] and 'last complete checkpoint' in outcome.note
  assert not outcome.tracebacks, outcome
  # Checkpoints every 10 steps, the kill after step 25: step 20's asynchronous save may
  # still be in flight (2 busy cores), so 10 may be the last complete one.
  assert outcome.saved >= 10
  faults.restart(outcome, str(tmp_path / 'run'), small_corpus, reference)
  assert outcome.restart_resumed == outcome.saved
  assert outcome.bitwise


@pytest.mark.parametrize('target', [1, 0])
def test_a_hung_process_is_named_and_the_job_ends_in_bounded_time(target, tmp_path,
                                                                   small_corpus):
  outcome = faults.inject(f'SIGSTOP of process {target} (hung)', str(tmp_path / 'run'),
                          small_corpus)
  assert outcome.exit_codes[1 - target] == 1
  assert outcome.seconds < 60, outcome
  assert f'process {target}' in outcome.notes[1 - target], outcome.notes
  assert not outcome.tracebacks, outcome


@pytest.fixture
def default_timeouts():
  faults.use_timeouts(faults.DEFAULTS)
  yield
  faults.use_timeouts(faults.SHORT)


@pytest.mark.parametrize('target', [1, 0])
def test_at_the_default_timeouts_jaxnmt_names_a_killed_process_before_jax_aborts(
    target, tmp_path, small_corpus, default_timeouts):  # pylint: disable=unused-argument
  """--peer_timeout_s=120: the survivor ends with jaxnmt's line within 120 s + 4 beats
  of 5 s; JAX's service (heartbeat 320 s, a beat every 160 s) could abort it 160 s
  after the kill at the earliest. About 3 minutes each."""
  outcome = faults.inject(f'kill -9 of process {target}', str(tmp_path / 'run'),
                          small_corpus)
  survivor = 1 - target
  assert outcome.exit_codes == {target: 128 + signal.SIGKILL, survivor: 1}, outcome
  named = 'lost process 0 (the coordinator)' if target == 0 else 'lost process 1'
  assert outcome.notes[survivor].startswith(f'{named}: no heartbeat for 120 s'), outcome
  assert 'rerun the command to resume from the last complete checkpoint' in outcome.note
  assert not outcome.tracebacks, outcome
  # The watch counts from the last beat it saw, up to one beat (5 s) before the fault.
  assert 120 - 5 - 5 < outcome.seconds < 120 + 4 * 5 + 10, outcome


@pytest.mark.parametrize('fault', ['SIGINT to process 0', 'SIGINT to process 1',
                                   'SIGTERM to process 0', 'SIGTERM to process 1'])
def test_a_signal_to_one_process_stops_all_at_one_step_with_a_checkpoint(
    fault, tmp_path, small_corpus, reference):
  workdir = str(tmp_path / 'run')
  outcome = faults.inject(fault, workdir, small_corpus)
  assert outcome.exit_codes == {0: 0, 1: 0}, outcome
  assert outcome.lost == 0 and outcome.saved < faults.STEPS, outcome
  assert outcome.saved == max(faults.logged_steps(workdir))  # saved where it stopped
  faults.restart(outcome, workdir, small_corpus, reference)
  assert outcome.restart_resumed == outcome.saved and outcome.bitwise


def test_the_time_limit_is_one_clock_for_all(tmp_path, small_corpus):
  workdir = str(tmp_path / 'run')
  outcome = faults.inject('time limit', workdir, small_corpus)
  assert outcome.exit_codes == {0: 0, 1: 0}, outcome
  assert outcome.saved == max(faults.logged_steps(workdir))
  with open(os.path.join(workdir, 'train', 'finished.json'), encoding='utf-8') as handle:
    assert json.load(handle)['step'] == outcome.saved


def _trace(workdir) -> dict[int, list[int]]:
  """step -> sorted global positions of the pairs it trained on (all processes)."""
  steps = {}
  for name in os.listdir(os.path.join(workdir, 'train')):
    if name.startswith('pairs_'):
      with open(os.path.join(workdir, 'train', name), encoding='utf-8') as handle:
        for line in handle:
          record = json.loads(line)
          steps.setdefault(record['step'], []).extend(
              g for row in record['positions'] for g in row)
  return {step: sorted(positions) for step, positions in steps.items()}


def test_a_checkpoint_of_2x4_resumes_on_1x2_and_4x1_without_skipping_a_pair(
    tmp_path, small_corpus):
  steps, trace = 30, ('--config.data.trace_pairs=True',
                      '--config.dropout_rng=threefry2x32')
  uninterrupted = str(tmp_path / 'uninterrupted')
  faults.run(uninterrupted, small_corpus, 2, 4, steps, *trace)
  killed = str(tmp_path / 'killed')
  launcher = faults.start(killed, small_corpus, 2, 4, steps, *trace)
  faults.wait_for_step(killed, 12, launcher)
  os.killpg(launcher.pid, signal.SIGKILL)
  launcher.wait()
  resumed_from = faults.committed_steps(killed)[-1]
  assert 10 <= resumed_from < steps
  want_trace, want_losses = _trace(uninterrupted), losses_by_step(uninterrupted)
  assert sorted(want_trace) == list(range(1, steps + 1))
  for processes, devices in ((1, 2), (4, 1)):
    workdir = str(tmp_path / f'resumed_{processes}x{devices}')
    faults.copy(killed, workdir)
    stderr = faults.run(workdir, small_corpus, processes, devices, steps, *trace)
    assert f'Resumed from checkpoint at step {resumed_from}' in stderr
    got_trace, got_losses = _trace(workdir), losses_by_step(workdir)
    assert sorted(got_trace) == list(range(1, steps + 1))
    want = [g for step in sorted(want_trace) for g in want_trace[step]]
    got = [g for step in sorted(got_trace) for g in got_trace[step]]
    skipped, duplicated = len(set(want) - set(got)), len(got) - len(set(got))
    print(f'\n2x4 -> {processes}x{devices} at step {resumed_from}: {len(got)} pairs, '
          f'{skipped} skipped, {duplicated} seen twice; max |loss difference| '
          f'{max(abs(got_losses[s] - want_losses[s]) for s in want_losses):.2e}')
    assert got_trace == want_trace  # the same pairs in the same steps
    assert skipped == 0 and duplicated == 0
    np.testing.assert_allclose([got_losses[s] for s in sorted(want_losses)],
                               [want_losses[s] for s in sorted(want_losses)], rtol=2e-4)
