"""The trainer end to end on a tiny model, and translation with what it saved."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxnmt import config_lib
from jaxnmt import errors
from jaxnmt.decoding import inference
from jaxnmt.data import inputs
from jaxnmt.training import optim
from jaxnmt.training import steps
from jaxnmt.training import loop
from jaxnmt.model import initialize
from jaxnmt.decoding import translation
from jaxnmt.commands import translate as translate_command
from jaxnmt.runtime import files
from tests.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_falls_when_overfitting_a_few_batches(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  config.model.dropout_rate = 0.0
  config.model.d_model = 64
  config.model.d_ff = 128
  config.optim.learning_rate = 3e-3
  run_inputs = inputs.training_inputs(config, str(tmp_path))
  tokenizer, iterator = run_inputs.tokenizer, iter(run_inputs.train_data)
  batches = [next(iterator) for _ in range(2)]
  iterator.close()
  tx, _ = optim.make_optimizer(config.optim, 100)
  graphdef, params, rest = initialize.create_model(
      config_lib.model_config(config, tokenizer.vocab_size), seed=0)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
  step = jax.jit(functools.partial(steps.train_step, graphdef, tx, 0.0, 0, 1))
  losses = []
  for i in range(120):
    state, sums = step(state, rest, batches[i % 2])
    losses.append(float(sums['loss'] / sums['tokens']))
  assert int(state['step']) == 120
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_training_writes_a_translatable_model(trained_workdir):
  for name in ('config.json', 'tokenizer.model', 'checkpoints', 'train', 'valid'):
    assert os.path.exists(os.path.join(trained_workdir, name)), name
  assert sorted(os.listdir(os.path.join(trained_workdir, 'checkpoints'))) == ['10', '20']
  splits = os.path.join(trained_workdir, 'splits')
  sources = open(os.path.join(splits, 'test.src'), encoding='utf-8').read().splitlines()
  references = open(os.path.join(splits, 'test.ref'), encoding='utf-8').read().splitlines()
  assert len(sources) == len(references) > 0
  translator = translation.Translator.from_workdir(trained_workdir)
  assert translator.step == 20
  outputs = translator.translate(['Hello.', '', 'Where is the station?'], batch_size=2)
  assert len(outputs) == 3 and outputs[1] == ''
  assert all(isinstance(line, str) for line in outputs)


def test_translate_command_reads_stdin_and_keeps_lines(trained_workdir):
  lines = ['I love you.', '', 'Ünïcödé 日本語 🙂', 'long ' * 100, 'We will leave tomorrow.']
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--mode=translate',
       f'--workdir={trained_workdir}'],
      input='\n'.join(lines) + '\n', cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  outputs = result.stdout.split('\n')
  assert outputs[-1] == '' and len(outputs) == len(lines) + 1  # one line each, in order
  assert outputs[1] == ''
  assert 'truncated' in result.stderr  # the over-long line is reported
  assert 'Loaded the raw weights of checkpoint 20' in result.stderr  # logs on stderr, not stdout
  assert 'Loaded checkpoint' not in result.stdout


def test_translate_from_file_matches_stdin(trained_workdir, tmp_path):
  translator = translation.Translator.from_workdir(trained_workdir)
  lines = ['Good morning.', 'How are you?', 'Tom is here.']
  source = tmp_path / 'in.txt'
  source.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  output = tmp_path / 'out.txt'
  with open(output, 'w', encoding='utf-8') as handle:
    translate_command.run(trained_workdir, str(source), handle, batch_size=2)
  assert output.read_text(encoding='utf-8').splitlines() == translator.translate(lines)


def test_translate_without_a_trained_model_is_a_clear_error(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--mode=translate', f'--workdir={tmp_path}'],
      input='Hello.\n', cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'config.json not found' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_non_finite_loss_is_a_runtime_failure_exit_1(small_corpus, tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--config=tests/tiny_config.py',
       f'--workdir={tmp_path}', '--config.optim.learning_rate=1e30',
       '--config.optim.grad_clip_norm=0.0', '--config.optim.warmup_steps=0'],
      cwd=ROOT, env={**os.environ, 'JAXNMT_TEST_CORPUS': small_corpus},
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: non-finite loss or gradient at step')
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints' / '10')  # nothing non-finite saved


def test_inference_restores_the_parameters_alone(trained_workdir):
  alive = jax.live_arrays()  # held, so no new array can reuse the id of a freed one
  before = {id(array) for array in alive}
  loaded = inference.load(trained_workdir)
  params_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(loaded.params))
  new_bytes = sum(array.nbytes for array in jax.live_arrays() if id(array) not in before)
  # AdamW's two moments would triple it; the RNG state of `rest` is a few bytes.
  assert params_bytes <= new_bytes < 1.1 * params_bytes, (params_bytes, new_bytes)


def test_checkpoints_of_another_layout_are_refused_untouched(trained_workdir, small_corpus,
                                                            tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'old_layout'
  shutil.copytree(trained_workdir, workdir)
  for metadata_file in workdir.glob('checkpoints/*/metadata/metadata'):
    metadata = json.loads(metadata_file.read_text())
    del metadata['format']  # as written before layouts were numbered
    metadata_file.write_text(json.dumps(metadata))
  with pytest.raises(errors.WorkdirError, match='have layout 1, this jaxnmt reads layout 2'):
    inference.load(str(workdir))
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--config=tests/tiny_config.py',
       f'--workdir={workdir}', '--config.num_train_steps=30'],
      cwd=ROOT, env={**os.environ, 'JAXNMT_TEST_CORPUS': small_corpus},
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'have layout 1' in result.stderr.strip().splitlines()[-1]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']  # nothing moved aside


def test_time_limit_stops_with_a_checkpoint_and_the_finished_marker(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  config.train_time_limit_minutes = 1e-6  # out of time after the first step
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result['stopped'] == 'time limit' and result['step'] == 1
  assert files.finished_step(str(tmp_path)) == 1
  assert inference.load(str(tmp_path)).step == 1  # the stop step was saved


def test_a_checkpoint_of_another_tokenizer_is_refused(trained_workdir, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'other_tokenizer'
  shutil.copytree(trained_workdir, workdir)
  for metadata_file in workdir.glob('checkpoints/*/metadata/metadata'):
    metadata = json.loads(metadata_file.read_text())
    metadata['tokenizer_sha256'] = '0' * 64
    metadata_file.write_text(json.dumps(metadata))
  with pytest.raises(errors.WorkdirError, match='is not the tokenizer the checkpoints'):
    inference.load(str(workdir))


def test_resuming_on_other_prepared_data_is_refused(trained_workdir, small_corpus, tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'other_data'
  shutil.copytree(trained_workdir, workdir)
  manifest_file = workdir / 'data' / 'manifest.json'
  manifest = json.loads(manifest_file.read_text())
  manifest['corpora'][0]['shards'][0]['pairs'] -= 1  # as if prepared from other input
  manifest_file.write_text(json.dumps(manifest))
  config = tiny_config(small_corpus)
  config.num_train_steps = 30
  with pytest.raises(errors.DataError, match='were trained on other prepared data'):
    loop.train_and_evaluate(config, str(workdir))


def test_a_workdir_tokenizer_other_than_the_prepared_one_is_refused(trained_workdir,
                                                                    small_corpus, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'other_tokenizer_data'
  shutil.copytree(trained_workdir, workdir, ignore=shutil.ignore_patterns('checkpoints'))
  shutil.copyfile(workdir / 'data' / 'manifest.json', workdir / 'tokenizer.model')
  with pytest.raises(errors.DataError, match='is not the tokenizer of the prepared data'):
    loop.train_and_evaluate(tiny_config(small_corpus), str(workdir))
