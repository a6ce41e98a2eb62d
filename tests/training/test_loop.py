"""training/loop, the trainer end to end on a tiny model: what it writes, when it stops
(steps, time limit, early stopping, a non-finite loss), what it keeps (retention), what
it refuses to resume, and every shipped config trained for two steps."""

import json
import os
import time

import numpy as np
import pytest

from configs import base, big, lm_char, lm_subword, tiny
from jaxnmt import errors
from jaxnmt.decoding import averaging
from jaxnmt.decoding import inference
from jaxnmt.decoding import translation
from jaxnmt.runtime import checkpointing
from jaxnmt.runtime import files
from jaxnmt.training import loop
from tests.helpers import SHAKESPEARE, ema_config, last_error, run_main
from tests.tiny_config import tiny_config


def test_training_writes_a_translatable_model(trained_workdir):
  for name in ('config.json', 'tokenizer.model', 'checkpoints', 'train', 'valid'):
    assert os.path.exists(os.path.join(trained_workdir, name)), name
  assert sorted(os.listdir(os.path.join(trained_workdir, 'checkpoints'))) == ['10', '20']
  assert files.finished_step(trained_workdir) == 20
  splits = os.path.join(trained_workdir, 'splits')
  sources = open(os.path.join(splits, 'test.src'), encoding='utf-8').read().splitlines()
  references = open(os.path.join(splits, 'test.ref'), encoding='utf-8').read().splitlines()
  assert len(sources) == len(references) > 0
  translator = translation.Translator.from_workdir(trained_workdir)
  assert translator.step == 20
  outputs = translator.translate(['Hello.', '', 'Where is the station?'], batch_size=2)
  assert len(outputs) == 3 and outputs[1] == ''
  assert all(isinstance(line, str) for line in outputs)


def test_time_limit_stops_with_a_checkpoint_and_the_finished_marker(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  config.train_time_limit_minutes = 1e-6  # out of time after the first step
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result['stopped'] == 'time limit' and result['step'] == 1
  assert files.finished_step(str(tmp_path)) == 1
  assert inference.load(str(tmp_path)).step == 1  # the stop step was saved


@pytest.mark.slow
def test_non_finite_loss_is_a_runtime_failure_exit_1(small_corpus, tmp_path):
  result = run_main('--config=tests/tiny_config.py', f'--workdir={tmp_path}',
                    '--config.optim.learning_rate=1e30', '--config.optim.grad_clip_norm=0.0',
                    '--config.optim.warmup_steps=0', corpus=small_corpus)
  assert result.returncode == 1, result.stderr[-2000:]
  assert last_error(result.stderr).startswith('error: non-finite loss or gradient at step')
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints' / '10')  # nothing non-finite saved


def test_ema_cannot_be_switched_on_when_resuming(workdir_copy, small_corpus):
  config = tiny_config(small_corpus)
  config.num_train_steps = 30
  config.ema_decay = 0.99
  with pytest.raises(errors.WorkdirError, match='ema_decay'):
    loop.train_and_evaluate(config, workdir_copy)


def test_ema_decay_is_validated(small_corpus, tmp_path):
  with pytest.raises(errors.ConfigError, match='ema_decay'):
    loop.train_and_evaluate(ema_config(small_corpus, ema_decay=1.0), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_resuming_on_other_prepared_data_is_refused(workdir_copy, small_corpus):
  manifest_file = os.path.join(workdir_copy, 'data', 'manifest.json')
  with open(manifest_file, encoding='utf-8') as handle:
    manifest = json.load(handle)
  manifest['corpora'][0]['shards'][0]['pairs'] -= 1  # as if prepared from other input
  with open(manifest_file, 'w', encoding='utf-8') as handle:
    json.dump(manifest, handle)
  config = tiny_config(small_corpus)
  config.num_train_steps = 30
  with pytest.raises(errors.DataError, match='were trained on other prepared data'):
    loop.train_and_evaluate(config, workdir_copy)


def _write_results(workdir: str, bleu_by_step: dict[int, float]) -> None:
  for step, value in bleu_by_step.items():
    files.append_result(workdir, {'step': step, 'valid_bleu': value, 'bleu': value})


def test_retention_keeps_the_best_checkpoint_and_averaged_weights(ema_copy, small_corpus):
  _write_results(ema_copy, {5: 3.0, 10: 7.5, 15: 7.5, 20: 6.0})  # best: 10 (the earliest)
  assert files.best_result(ema_copy)['step'] == 10
  assert files.checkpoints_since_best(ema_copy) == 2
  averaging.average(ema_copy, last=2, name='kept')
  config = ema_config(small_corpus, num_train_steps=30, keep_checkpoints=1)
  loop.train_and_evaluate(config, ema_copy)
  assert checkpointing.Checkpointer(ema_copy, read_only=True).all_steps() == [10, 30]
  assert inference.load(ema_copy, weights='kept').step == 20


@pytest.mark.slow
def test_early_stopping_after_patience_checkpoints_without_gain(ema_copy, small_corpus):
  _write_results(ema_copy, {10: 5.0, 15: 4.0, 20: 4.5})  # two scored since the best
  config = ema_config(small_corpus, num_train_steps=30, early_stopping_patience=3)
  result = loop.train_and_evaluate(config, ema_copy)
  assert result['stopped'] is None  # 2 < 3: trains on to the end
  assert result['step'] == 30
  _write_results(ema_copy, {25: 4.9})  # now three
  config.num_train_steps = 200
  result = loop.train_and_evaluate(config, ema_copy)
  assert result['stopped'] == 'early stopping'
  assert result['step'] == 40  # the first validation of the resumed run
  assert files.finished_step(ema_copy) == 40
  assert inference.load(ema_copy, weights='raw').step == 40


@pytest.mark.slow
def test_retention_keeps_what_a_live_worker_has_not_scored(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 1
  config.num_train_steps = 15
  watched = str(tmp_path / 'watched')
  os.makedirs(os.path.join(watched, 'eval'))
  with open(os.path.join(watched, files.WORKER), 'w') as handle:
    json.dump({'pid': 0, 'heartbeat': time.time()}, handle)
  with open(os.path.join(watched, files.RESULTS), 'w') as handle:
    handle.write(json.dumps({'step': 5}) + '\n')
  loop.train_and_evaluate(config, watched)
  # 5 was scored; 10 was not (a live worker will), 15 is the newest.
  assert sorted(os.listdir(os.path.join(watched, 'checkpoints')), key=int) == ['10', '15']
  os.remove(os.path.join(watched, files.WORKER))  # no worker now: the newest alone
  config.num_train_steps = 20
  loop.train_and_evaluate(config, watched)
  assert sorted(os.listdir(os.path.join(watched, 'checkpoints'))) == ['20']


def _shrunk(get_config, corpus):
  """A shipped config cut to two quick steps: its model as shipped, smaller batches,
  rows and (for the translation configs, trained on a small corpus) vocabulary."""
  config = get_config()
  # The state split over the 8 test devices (FSDP), not replicated on each: Transformer-
  # big's parameters and AdamW moments are 2.2 GB.
  config.mesh.data, config.mesh.fsdp = 1, 8
  config.num_train_steps = 2
  config.train_time_limit_minutes = 0.0
  config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.data.batch_size = config.data.eval_batch_size = 8
  config.optim.warmup_steps = 1
  if config.task == 'lm':
    config.data.path = SHAKESPEARE
    config.data.max_target_length = min(config.data.max_target_length, 32)
  else:
    config.data.path = corpus
    config.data.max_source_length = config.data.max_target_length = 24
    config.tokenizer.vocab_size = 1000
    config.optim.loss_chunks = min(config.optim.loss_chunks, 4)
  return config


@pytest.mark.slow
@pytest.mark.parametrize('get_config', [tiny.get_config, lm_char.get_config,
                                        lm_subword.get_config, base.get_config,
                                        big.get_config])
def test_every_shipped_config_trains_two_steps(get_config, small_corpus, tmp_path):
  config = _shrunk(get_config, small_corpus)
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 2 and np.isfinite(result['valid_loss'])
  loaded = inference.load(str(tmp_path))
  assert loaded.step == 2

