"""training/loop resumed through `python -m jaxnmt.main`: a run killed with SIGKILL
resumes bitwise where its last checkpoint left it (one process, and two on a
2 x 2 x 2 mesh), and SIGTERM (preemption) saves the current step and exits cleanly."""

import os
import signal
import time

import numpy as np
import pytest

from tests.helpers import committed_steps, final_state, losses_by_step, run_main, start_main

STEPS = 40


def _flags(workdir, *overrides) -> list[str]:
  return [f'--workdir={workdir}', '--config=tests/tiny_config.py',
          f'--config.num_train_steps={STEPS}', '--config.checkpoint_every_steps=4',
          '--config.log_every_steps=1', '--config.eval_every_steps=1000',
          '--config.keep_checkpoints=20', *overrides]


def _run(workdir, corpus, *overrides, processes=1, devices=8):
  result = run_main(*_flags(workdir, *overrides), corpus=corpus, processes=processes,
                    devices=devices, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _start_and_wait_for_checkpoint(workdir, corpus, *overrides, processes=1, devices=8):
  process = start_main(*_flags(workdir, *overrides), corpus=corpus, processes=processes,
                       devices=devices)
  deadline = time.time() + 300
  while not committed_steps(workdir):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint within 300 s'
    time.sleep(0.02)
  return process


@pytest.mark.slow
@pytest.mark.parametrize('processes, mesh', [
    (1, ()),
    (2, ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')),
])
def test_killed_run_resumes_exactly(tmp_path, small_corpus, processes, mesh):
  devices = 8 // processes
  reference = tmp_path / 'uninterrupted'
  _run(reference, small_corpus, *mesh, processes=processes, devices=devices)
  killed = tmp_path / 'killed'
  process = _start_and_wait_for_checkpoint(killed, small_corpus, *mesh, processes=processes,
                                           devices=devices)
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  resumed_from = committed_steps(killed)[-1]
  assert resumed_from < STEPS
  result = _run(killed, small_corpus, *mesh, processes=processes, devices=devices)
  assert f'Resumed from checkpoint at step {resumed_from}' in result.stderr
  max_difference = 0.0
  for want, got in zip(final_state(reference, STEPS), final_state(killed, STEPS)):
    np.testing.assert_array_equal(got, want)  # bitwise on CPU
    max_difference = max(max_difference, float(np.max(np.abs(got - want), initial=0.0)))
  want_losses, got_losses = losses_by_step(reference), losses_by_step(killed)
  after = [step for step in want_losses if step > resumed_from]
  assert after and [got_losses[s] for s in after] == [want_losses[s] for s in after]
  print(f'\n{processes} process(es): killed, resumed from step {resumed_from}; max |final '
        f'parameter difference| = {max_difference}')
  print('step  uninterrupted  resumed')
  for step in after:
    print(f'{step:4d}  {want_losses[step]:.6f}  {got_losses[step]:.6f}')


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path, small_corpus):
  workdir = tmp_path / 'preempted'
  process = _start_and_wait_for_checkpoint(workdir, small_corpus,
                                           f'--config.num_train_steps={STEPS * 50}')
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  saved = committed_steps(workdir)[-1]
  # The newest checkpoint is the stop step.
  assert f'Stopped at step {saved} on a signal; checkpoint saved' in stderr
  result = _run(workdir, small_corpus, f'--config.num_train_steps={saved + 2}')
  assert f'Resumed from checkpoint at step {saved}' in result.stderr
