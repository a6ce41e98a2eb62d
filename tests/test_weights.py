"""Better final weights: the moving average (config.ema_decay), averaged checkpoints
(--mode=average), the best checkpoint kept by retention, early stopping, and the
validation samples the trainer writes to TensorBoard."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxnmt.decoding import averaging
from jaxnmt.runtime import checkpointing
from jaxnmt.commands import evaluate
from jaxnmt.decoding import inference
from jaxnmt.training import steps
from jaxnmt.training import loop
from jaxnmt.decoding import translation
from jaxnmt.runtime import files
from jaxnmt.errors import CheckpointError, ConfigError, UserError, WorkdirError
from tests.tiny_config import tiny_config


def _config(corpus: str, **overrides):
  config = tiny_config(corpus)
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 10
  for field, value in overrides.items():
    config[field] = value
  return config


@pytest.fixture(scope='module')
def ema_run(small_corpus, tmp_path_factory) -> str:
  """20 steps with a moving average (decay 0.9), a checkpoint every 5 steps."""
  workdir = str(tmp_path_factory.mktemp('ema'))
  loop.train_and_evaluate(_config(small_corpus, ema_decay=0.9), workdir)
  return workdir


def _leaves(params) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def test_update_ema_follows_its_schedule():
  ema, params = {'w': np.zeros(3, np.float32)}, {'w': np.ones(3, np.float32)}
  # Step 0: rate min(0.99, 1/10) = 0.1, so the average moves 90% of the way.
  first = steps.update_ema(ema, params, np.int32(0), 0.99)
  np.testing.assert_allclose(first['w'], 0.9, rtol=1e-6)
  # Late: the rate is the decay itself.
  late = steps.update_ema(ema, params, np.int32(100_000), 0.99)
  np.testing.assert_allclose(late['w'], 0.01, rtol=1e-4)


def test_ema_is_saved_and_inference_uses_it_by_default(ema_run):
  auto = inference.load(ema_run)
  assert (auto.step, auto.weights) == (20, 'ema')
  raw = inference.load(ema_run, weights='raw')
  ema = inference.load(ema_run, weights='ema')
  assert raw.weights == 'raw'
  for a, b in zip(_leaves(auto.params), _leaves(ema.params)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(_leaves(raw.params), _leaves(ema.params)))
  # The trainer validated both.
  valid = [json.loads(line) for line in open(
      os.path.join(ema_run, 'valid', 'metrics.jsonl'), encoding='utf-8')]
  assert 'ema_loss' in valid[-1] and 'loss' in valid[-1]


def test_no_ema_asked_of_a_run_without_one(trained_workdir):
  assert inference.load(trained_workdir).weights == 'raw'
  with pytest.raises(CheckpointError, match='no moving average'):
    inference.load(trained_workdir, weights='ema')


def test_ema_cannot_be_switched_on_when_resuming(trained_workdir, small_corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, workdir)
  config = tiny_config(small_corpus)
  config.num_train_steps = 30
  config.ema_decay = 0.99
  with pytest.raises(WorkdirError, match='ema_decay'):
    loop.train_and_evaluate(config, workdir)


def test_ema_decay_is_validated(small_corpus, tmp_path):
  with pytest.raises(ConfigError, match='ema_decay'):
    loop.train_and_evaluate(_config(small_corpus, ema_decay=1.0), str(tmp_path))


def test_average_is_the_mean_of_the_last_checkpoints(ema_run):
  info = averaging.average(ema_run, last=3)
  assert info['steps'] == [10, 15, 20] and info['name'] == 'last3'
  loaded = inference.load(ema_run, weights='last3')
  assert (loaded.step, loaded.weights) == (20, 'last3')
  reader = checkpointing.Checkpointer(ema_run, read_only=True)
  try:
    each = [_leaves(reader.restore_params(step, loaded.abstract_params))
            for step in (10, 15, 20)]
  finally:
    reader.close()
  for index, leaf in enumerate(_leaves(loaded.params)):
    np.testing.assert_allclose(leaf, np.mean([params[index] for params in each], axis=0),
                               rtol=1e-5, atol=1e-7)
  assert 'last3' in averaging.available(ema_run)


def test_average_refuses_what_it_cannot_do(ema_run):
  with pytest.raises(CheckpointError, match='fewer than --average_last=9'):
    averaging.average(ema_run, last=9)
  with pytest.raises(UserError, match='average_name'):
    averaging.average(ema_run, last=2, name='ema')
  with pytest.raises(UserError, match='average_name'):
    averaging.average(ema_run, last=2, name='../x')
  with pytest.raises(CheckpointError, match="no weights named 'nothing'"):
    inference.load(ema_run, weights='nothing')
  averaging.average(ema_run, last=2, name='two')
  with pytest.raises(CheckpointError, match='drop --checkpoint_step'):
    inference.load(ema_run, step=10, weights='two')


@pytest.mark.slow
def test_averaged_weights_survive_training_on_and_retention(ema_run, small_corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(ema_run, workdir)
  averaging.average(workdir, last=2, name='kept')
  config = _config(small_corpus, ema_decay=0.9, num_train_steps=30, keep_checkpoints=1)
  loop.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir, read_only=True).all_steps() == [30]
  assert inference.load(workdir, weights='kept').step == 20


def _write_results(workdir: str, bleu_by_step: dict[int, float]) -> None:
  for step, value in bleu_by_step.items():
    files.append_result(workdir, {'step': step, 'valid_bleu': value, 'bleu': value})


def test_retention_never_deletes_the_best_checkpoint(ema_run, small_corpus, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(ema_run, workdir)
  _write_results(workdir, {5: 3.0, 10: 7.5, 15: 7.5, 20: 6.0})  # best: 10 (the earliest)
  assert files.best_result(workdir)['step'] == 10
  assert files.checkpoints_since_best(workdir) == 2
  config = _config(small_corpus, ema_decay=0.9, num_train_steps=30, keep_checkpoints=1)
  loop.train_and_evaluate(config, workdir)
  assert checkpointing.Checkpointer(workdir, read_only=True).all_steps() == [10, 30]


@pytest.mark.slow
def test_early_stopping_after_patience_checkpoints_without_gain(ema_run, small_corpus,
                                                                tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(ema_run, workdir)
  _write_results(workdir, {10: 5.0, 15: 4.0, 20: 4.5})  # two scored since the best
  config = _config(small_corpus, ema_decay=0.9, num_train_steps=40,
                   early_stopping_patience=3)
  result = loop.train_and_evaluate(config, workdir)
  assert result['stopped'] is None  # 2 < 3: trains on to the end
  assert result['step'] == 40
  _write_results(workdir, {25: 4.9})  # now three
  config.num_train_steps = 200
  result = loop.train_and_evaluate(config, workdir)
  assert result['stopped'] == 'early stopping'
  assert result['step'] == 50  # the first validation of the resumed run
  assert files.finished_step(workdir) == 50
  assert inference.load(workdir, weights='raw').step == 50


@pytest.mark.slow
def test_eval_worker_scores_the_average_and_keeps_the_best(ema_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(ema_run, workdir)
  results = evaluate.run_eval_worker(workdir, max_test_sentences=8, max_valid_sentences=8,
                                     options=translation.DecodeOptions(beam_size=2))
  assert [r['step'] for r in results] == [5, 10, 15, 20]
  assert all(r['weights'] == 'ema' and 'valid_bleu' in r for r in results)
  best = files.best_result(workdir)
  with open(os.path.join(workdir, 'eval', 'best.json'), encoding='utf-8') as handle:
    assert json.load(handle)['step'] == best['step']
  before = files.read_results(workdir)
  averaging.average(workdir, last=2, name='two')
  [result] = evaluate.run_eval_worker(workdir, weights='two', max_test_sentences=8,
                                      max_valid_sentences=8,
                                      options=translation.DecodeOptions(beam_size=2))
  assert result['weights'] == 'two' and result['averaged_steps'] == [15, 20]
  assert os.path.exists(os.path.join(workdir, 'eval', 'averaged_two.json'))
  assert os.path.exists(os.path.join(workdir, 'eval', 'test_hypotheses_two.txt'))
  assert files.read_results(workdir) == before  # per-checkpoint results untouched


def test_trainer_writes_greedy_validation_samples_to_tensorboard(ema_run):
  events = glob.glob(os.path.join(ema_run, 'valid', 'events.out.tfevents.*'))
  data = b''.join(open(path, 'rb').read() for path in events)
  first_source = files.read_lines(files.split_file(ema_run, 'valid.src'))[0]
  assert b'samples' in data
  assert first_source.encode('utf-8') in data
