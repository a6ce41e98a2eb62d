"""Async checkpoints: exact resume after SIGKILL, SIGTERM preemption, the workdir lock,
corrupt checkpoints, config changes, and restoring onto another mesh."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxnmt.runtime import checkpointing
from jaxnmt import config_lib
from jaxnmt import errors
from jaxnmt.training import metrics
from jaxnmt.training import optim
from jaxnmt.training import loop
from jaxnmt.training import train_state
from jaxnmt.decoding import translation
from jaxnmt.runtime import locks
from jaxnmt.runtime import files
from tests.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def command(workdir, *overrides, processes=1):
  flags = [f'--workdir={workdir}', '--config=tests/tiny_config.py',
           f'--config.num_train_steps={STEPS}', '--config.checkpoint_every_steps=4',
           '--config.log_every_steps=1', '--config.eval_every_steps=1000',
           '--config.keep_checkpoints=20', *overrides]
  if processes == 1:
    return [sys.executable, '-m', 'jaxnmt.main', *flags]
  return ['launch/local.sh', *flags]


def environment(corpus, processes=1, devices=8):
  env = dict(os.environ, JAXNMT_TEST_CORPUS=corpus, JAX_PLATFORMS='cpu', PYTHON=sys.executable)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  if processes > 1:
    env.pop('XLA_FLAGS')
    env.update(NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS=str(devices))
  return env


def run(workdir, corpus, *overrides, processes=1, devices=8):
  result = subprocess.run(command(workdir, *overrides, processes=processes), cwd=ROOT,
                          env=environment(corpus, processes, devices), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def committed_steps(workdir):
  folders = (os.path.basename(os.path.dirname(path)) for path in glob.glob(
      os.path.join(workdir, 'checkpoints', '*', 'commit_success.txt')))
  return sorted(int(folder) for folder in folders if folder.isdigit())


def start_and_wait_for_checkpoint(workdir, corpus, *overrides, processes=1, devices=8):
  process = subprocess.Popen(command(workdir, *overrides, processes=processes), cwd=ROOT,
                             env=environment(corpus, processes, devices),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
  deadline = time.time() + 300
  while not committed_steps(workdir):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint within 300 s'
    time.sleep(0.02)
  return process


def final_params(workdir, config):
  tx, _ = optim.make_optimizer(config.optim, STEPS)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=device),
                          train_state.abstract_train_state(model_cfg, tx))
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  state, _, _ = checkpointer.restore(STEPS, abstract)
  checkpointer.close()
  return jax.tree.leaves(jax.device_get(state))


def losses_by_step(workdir):
  records = metrics.read_jsonl(os.path.join(workdir, 'train', 'metrics.jsonl'))
  return {record['step']: record['loss'] for record in records}  # last record wins


@pytest.mark.slow
@pytest.mark.parametrize('processes, mesh', [
    (1, ()),
    (2, ('--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2')),
])
def test_killed_run_resumes_exactly(tmp_path, small_corpus, processes, mesh):
  devices = 8 // processes
  reference = tmp_path / 'uninterrupted'
  run(reference, small_corpus, *mesh, processes=processes, devices=devices)
  killed = tmp_path / 'killed'
  process = start_and_wait_for_checkpoint(killed, small_corpus, *mesh, processes=processes,
                                          devices=devices)
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()
  resumed_from = committed_steps(killed)[-1]
  assert resumed_from < STEPS
  result = run(killed, small_corpus, *mesh, processes=processes, devices=devices)
  assert f'Resumed from checkpoint at step {resumed_from}' in result.stderr
  config = tiny_config(small_corpus)
  max_difference = 0.0
  for want, got in zip(final_params(reference, config), final_params(killed, config)):
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
  process = start_and_wait_for_checkpoint(workdir, small_corpus,
                                          f'--config.num_train_steps={STEPS * 50}')
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  saved = committed_steps(workdir)[-1]
  # The newest checkpoint is the stop step.
  assert f'Stopped at step {saved} on a signal; checkpoint saved' in stderr
  result = run(workdir, small_corpus, f'--config.num_train_steps={saved + 2}')
  assert f'Resumed from checkpoint at step {saved}' in result.stderr


def test_second_trainer_on_a_live_workdir_refuses(tmp_path, small_corpus):
  workdir = tmp_path / 'busy'
  held = locks.TrainerLock(str(workdir), owner=True)  # a live trainer's lock
  try:
    with pytest.raises(errors.WorkdirError, match=f'pid {os.getpid()}'):
      locks.TrainerLock(str(workdir), owner=True)
    second = subprocess.run(command(workdir), cwd=ROOT, env=environment(small_corpus),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert 'is in use by another trainer' in second.stderr.strip().splitlines()[-1]
    assert 'Traceback' not in second.stderr
    assert not os.path.exists(workdir / 'checkpoints')  # refused before any work
  finally:
    held.release()
  locks.TrainerLock(str(workdir), owner=True).release()  # free once released


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back(trained_workdir, tmp_path, small_corpus):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'copy'
  shutil.copytree(trained_workdir, workdir)
  latest = committed_steps(workdir)[-1]
  for path in glob.glob(str(workdir / 'checkpoints' / str(latest) / 'state' / '**' / '*'),
                        recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 64:
      with open(path, 'r+b') as handle:
        handle.truncate(os.path.getsize(path) // 2)
  result = run(workdir, small_corpus, f'--config.num_train_steps={latest + 2}')
  assert 'could not be read' in result.stderr and 'falling back' in result.stderr
  assert f'Resumed from checkpoint at step {latest - 10}' in result.stderr
  assert glob.glob(str(workdir / 'checkpoints' / f'unreadable-{latest}-*'))  # kept aside
  assert latest + 2 in committed_steps(workdir)


@pytest.mark.slow
def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(trained_workdir, tmp_path,
                                                              small_corpus):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'copy'
  shutil.copytree(trained_workdir, workdir)
  for path in glob.glob(str(workdir / 'checkpoints' / '*' / 'state' / '**' / '*'),
                        recursive=True):
    if os.path.isfile(path):
      open(path, 'wb').close()
  result = subprocess.run(command(workdir), cwd=ROOT, env=environment(small_corpus),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'could be read' in result.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in result.stderr


def test_breaking_config_change_is_refused(trained_workdir, small_corpus):
  result = subprocess.run(command(trained_workdir, '--config.model.d_model=64'), cwd=ROOT,
                          env=environment(small_corpus), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  assert 'model.d_model: 32 -> 64' in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_sharded_checkpoint_restores_on_one_device_and_translates(tmp_path, small_corpus):
  config = tiny_config(small_corpus)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  workdir = str(tmp_path / 'sharded')
  loop.train_and_evaluate(config, workdir)
  translator = translation.Translator.from_workdir(workdir)
  assert translator.step == config.num_train_steps
  leaf = jax.tree.leaves(translator.loaded.params)[0]
  assert len(leaf.sharding.device_set) == 1
  assert len(translator.translate(['Hello.', 'Thank you.'])) == 2


def test_a_failed_save_is_a_clear_error_and_keeps_the_complete_checkpoints(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  state = {'w': jax.numpy.arange(8.0)}
  checkpointer.save(1, state)
  checkpointer.wait()
  # The store breaks under the run (root ignores permissions, so: a file where the
  # checkpoint folder was; the complete checkpoint is kept aside meanwhile).
  folder = tmp_path / 'checkpoints'
  folder.rename(tmp_path / 'aside')
  folder.write_text('not a folder')
  with pytest.raises(checkpointing.SaveError, match='could not .*save.* checkpoint.*'
                     'untouched: rerun to resume'):
    checkpointer.save(2, state)
    checkpointer.wait()
  folder.unlink()
  (tmp_path / 'aside').rename(folder)
  reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  assert reader.all_steps() == [1]
  restored, _, _ = reader.restore(1, jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding),
      state))
  np.testing.assert_array_equal(restored['w'], state['w'])
