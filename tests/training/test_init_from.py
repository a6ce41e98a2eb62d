"""Fine-tuning (config.init_from): a run trained on one corpus starts a new run on
another corpus at step 0 from its weights, with its tokenizer; mismatches are refused
in one line; a stopped fine-tuning run resumes from its own checkpoints."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from jaxnmt import config_lib
from jaxnmt.data import prepare as prepare_lib
from jaxnmt.decoding import averaging
from jaxnmt.errors import ConfigError, UserError, WorkdirError
from jaxnmt.model import initialize
from jaxnmt.runtime import checkpointing
from jaxnmt.runtime import files
from jaxnmt.training import init_from
from jaxnmt.training import loop
from jaxnmt.training import optim
from jaxnmt.training import setup
from jaxnmt.training import train_state
from tests import helpers
from tests.tiny_config import tiny_config


@pytest.fixture(scope='module')
def questions(tmp_path_factory) -> str:
  """Another corpus than the source runs': 600 other real pairs, questions first."""
  pairs = helpers.real_pairs(600, seed=7)
  pairs.sort(key=lambda pair: not pair[0].endswith('?'))
  path = tmp_path_factory.mktemp('questions') / 'questions.tsv'
  path.write_text(''.join(f'{en}\t{es}\n' for en, es in pairs), encoding='utf-8')
  return str(path)


def _config(corpus: str, source: str, **fields):
  config = tiny_config(corpus)
  config.init_from = source
  for field, value in fields.items():
    config[field] = value
  return config


def _source_state(workdir: str, step: int, ema: bool = False) -> dict:
  """The whole train state of checkpoint `step` of a tiny-config run, on one device."""
  config = tiny_config('')
  tx, _ = optim.make_optimizer(config.optim, step)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = initialize.with_shardings(
      train_state.abstract_train_state(model_cfg, tx, ema=ema), device)
  reader = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    state, _, _ = reader.restore(step, abstract)
  finally:
    reader.close()
  return jax.device_get(state)


def _start(config, workdir: str):
  """What the loop does before its first step: (source, run, the state at step 0)."""
  mesh, rules = setup.plan(config)
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    source = init_from.resolve(config, workdir, checkpointer)
  finally:
    checkpointer.close()
  run, state = setup.build(config, workdir, mesh, rules)
  return source, run, init_from.start_state(source, state, run.shardings)


def _equal(left, right) -> bool:
  leaves = zip(jax.tree.leaves(jax.device_get(left)), jax.tree.leaves(right), strict=True)
  return all(np.array_equal(a, b) for a, b in leaves)


def _counts(opt_state) -> dict[str, list[int]]:
  """{'adam': [...], 'schedule': [...]} the step counts inside an optimizer state."""
  found = {'adam': [], 'schedule': []}
  counted = lambda node: 'count' in getattr(node, '_fields', ())
  for node in jax.tree.leaves(jax.device_get(opt_state), is_leaf=counted):
    if counted(node):
      found['adam' if 'mu' in node._fields else 'schedule'].append(int(node.count))
  return found


def _sha(path: str) -> str:
  return files.sha256(path)


def test_fine_tuning_starts_at_step_0_from_the_parameters_with_a_fresh_optimizer(
    trained_workdir, questions, tmp_path):
  config = _config(questions, trained_workdir)
  workdir = str(tmp_path / 'fine')
  source, run, state = _start(config, workdir)
  assert (source.step, source.weights, source.keep_optimizer) == (20, 'raw', False)
  assert int(state['step']) == 0
  assert _equal(state['params'], _source_state(trained_workdir, 20)['params'])
  moments = [leaf for node in jax.tree.leaves(
      state['opt_state'], is_leaf=lambda node: hasattr(node, 'mu'))
             if hasattr(node, 'mu') for leaf in jax.tree.leaves((node.mu, node.nu))]
  assert moments and all(not np.any(jax.device_get(leaf)) for leaf in moments)
  assert _counts(state['opt_state']) == {'adam': [0], 'schedule': [0]}
  # The new corpus is tokenized with the source's tokenizer: the same token ids.
  wanted = _sha(files.tokenizer_path(trained_workdir))
  assert config.tokenizer.path == os.path.abspath(files.tokenizer_path(trained_workdir))
  assert _sha(files.tokenizer_path(workdir)) == wanted
  manifest = prepare_lib.load_manifest(prepare_lib.prepared_dir(config, workdir))
  assert manifest['tokenizer_sha256'] == wanted
  assert manifest['corpora'][0]['spec'] == questions
  assert _sha(run.inputs.tokenizer.model_path) == wanted


def test_keeping_the_optimizer_keeps_adam_and_restarts_the_schedule(
    trained_workdir, questions, tmp_path):
  config = _config(questions, trained_workdir, init_from_optimizer=True)
  _, _, state = _start(config, str(tmp_path / 'fine'))
  saved = _source_state(trained_workdir, 20)
  assert _equal(state['params'], saved['params']) and int(state['step']) == 0
  assert _counts(saved['opt_state']) == {'adam': [20], 'schedule': [20]}
  assert _counts(state['opt_state']) == {'adam': [20], 'schedule': [0]}
  restarted = init_from.restart_schedule(saved['opt_state'])
  assert _equal(state['opt_state'], restarted)  # the moments as saved


def test_weights_the_moving_average_by_default_else_raw_or_averaged(
    ema_copy, questions, tmp_path):
  saved = _source_state(ema_copy, 20, ema=True)
  assert not _equal(saved['ema'], saved['params'])
  config = _config(questions, ema_copy, ema_decay=0.9)
  source, _, state = _start(config, str(tmp_path / 'auto'))
  assert source.weights == 'ema'
  assert _equal(state['params'], saved['ema']) and _equal(state['ema'], saved['ema'])
  # With Adam's state kept, 'auto' is the parameters the moments belong to.
  config = _config(questions, ema_copy, init_from_optimizer=True)
  source, _, state = _start(config, str(tmp_path / 'adam'))
  assert source.weights == 'raw' and _equal(state['params'], saved['params'])
  averaging.average(ema_copy, last=2, name='two')
  config = _config(questions, os.path.join(ema_copy, 'averaged', 'two'))
  source, _, state = _start(config, str(tmp_path / 'averaged'))
  assert (source.step, source.weights) == (None, 'two')
  mean = jax.tree.map(lambda a, b: (a + b) / 2, _source_state(ema_copy, 15, True)['params'],
                      saved['params'])
  for got, want in zip(jax.tree.leaves(jax.device_get(state['params'])),
                       jax.tree.leaves(mean)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  config = _config(questions, os.path.join(ema_copy, 'checkpoints', '15'),
                   init_from_weights='raw')
  source, _, state = _start(config, str(tmp_path / 'raw15'))
  assert (source.step, source.weights) == (15, 'raw')
  assert _equal(state['params'], _source_state(ema_copy, 15, ema=True)['params'])


def _resolve(config, workdir: str):
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    return init_from.resolve(config, workdir, checkpointer)
  finally:
    checkpointer.close()


def test_mismatches_are_refused_naming_what_differs(trained_workdir, pairs_tokenizer,
                                                    questions, tmp_path):
  def refused(error_type, workdir='w', **fields) -> str:
    config = _config(questions, trained_workdir, **fields)
    with pytest.raises(error_type) as raised:
      config_lib.validate(config)
      _resolve(config, str(tmp_path / workdir))
    message = str(raised.value)
    assert '\n' not in message
    return message

  config = _config(questions, trained_workdir)
  config.model.d_model = 64
  with pytest.raises(ConfigError, match=r'model\.d_model: 32 -> 64; fine-tuning needs'):
    _resolve(config, str(tmp_path / 'w'))
  config = _config(questions, trained_workdir)
  config.model.dropout_rate = 0.3  # regularisation may change
  config.model.remat = 'full'
  assert _resolve(config, str(tmp_path / 'dropout')).step == 20
  config = _config(questions, trained_workdir)
  config.tokenizer.path = pairs_tokenizer.model_path
  with pytest.raises(WorkdirError, match='is not the tokenizer of config.init_from'):
    _resolve(config, str(tmp_path / 'w'))
  # A workdir whose data was prepared with another tokenizer.
  other = str(tmp_path / 'other')
  os.makedirs(other)
  shutil.copyfile(pairs_tokenizer.model_path, files.tokenizer_path(other))
  with pytest.raises(WorkdirError, match=r'tokenizer\.model \(sha256 .*is not the tokenizer'):
    _resolve(_config(questions, trained_workdir), other)
  assert 'holds no moving average' in refused(ConfigError, init_from_weights='ema')
  assert 'no checkpoint 7 in' in refused(
      UserError, init_from=os.path.join(trained_workdir, 'checkpoints', '7'))
  assert 'hold no optimizer state' in refused(
      ConfigError, init_from=os.path.join(trained_workdir, 'averaged', 'x'),
      init_from_optimizer=True)
  assert 'no averaged weights' in refused(UserError, init_from_weights='last9')
  assert 'auto, raw, ema, or the name' in refused(ConfigError, init_from_weights='a/b')
  config = _config(questions, trained_workdir, init_from_optimizer=True)
  config.optim.grad_clip_norm = 0.0
  with pytest.raises(ConfigError, match='gradient clipping on, this config has it off'):
    _resolve(config, str(tmp_path / 'w'))
  assert 'a jaxnmt workdir?' in refused(UserError, init_from=str(tmp_path / 'none'))
  assert "own --workdir" in refused(ConfigError, workdir='self',
                                    init_from=str(tmp_path / 'self'))
  config = tiny_config(questions)
  config.init_from_optimizer = True
  with pytest.raises(ConfigError, match='config.init_from_optimizer: keeps'):
    config_lib.validate(config)


@pytest.mark.parametrize('flag, message', [
    ('--config.model.d_ff=128', r'^error: config\.init_from: .* model\.d_ff: 64 -> 128'),
    ('--config.tokenizer.path=OTHER', r'^error: config\.tokenizer\.path=.* is not the '
     r'tokenizer of config\.init_from'),
])
def test_a_mismatch_is_one_line_and_exit_code_2(trained_workdir, pairs_tokenizer, questions,
                                                tmp_path, flag, message):
  flag = flag.replace('OTHER', pairs_tokenizer.model_path)
  result = helpers.run_main('--config=tests/tiny_config.py', f'--workdir={tmp_path}/w',
                            f'--config.init_from={trained_workdir}', flag,
                            corpus=questions, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert re.search(message, helpers.last_error(result.stderr))
  assert not os.path.exists(os.path.join(tmp_path, 'w', 'data'))  # refused before preparing


def test_a_stopped_fine_tuning_resumes_from_its_own_checkpoints(trained_workdir, questions,
                                                                tmp_path):
  source = str(tmp_path / 'source')
  shutil.copytree(trained_workdir, source)
  workdir = str(tmp_path / 'fine')
  config = _config(questions, source, num_train_steps=10, checkpoint_every_steps=5,
                   eval_every_steps=5, num_text_samples=0)
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == 10 and helpers.committed_steps(workdir) == [5, 10]
  record = json.loads(open(os.path.join(workdir, init_from.RECORD)).read())
  assert (record['step'], record['weights']) == (20, 'raw')
  saved = files.load_config(workdir)
  assert saved.init_from == source
  assert saved.tokenizer.path == os.path.abspath(files.tokenizer_path(source))
  first = helpers.losses_by_step(workdir)
  shutil.rmtree(source)  # never read again
  config = _config(questions, source, num_train_steps=20, checkpoint_every_steps=5,
                   eval_every_steps=5, num_text_samples=0)
  result = loop.train_and_evaluate(config, workdir)
  assert result['step'] == 20 and helpers.committed_steps(workdir)[-1] == 20
  losses = helpers.losses_by_step(workdir)
  assert {step: losses[step] for step in first} == first  # steps 1-10 not redone
  assert sorted(losses) == [5, 10, 15, 20]
  # Fine-tuned from the source, not from scratch: its first logged loss is lower than
  # a fresh model's on the same data.
  scratch = tiny_config(questions)
  scratch.num_train_steps, scratch.num_text_samples = 5, 0
  scratch.tokenizer.path = files.tokenizer_path(trained_workdir)  # the same token ids
  loop.train_and_evaluate(scratch, str(tmp_path / 'scratch'))
  assert first[5] < helpers.losses_by_step(str(tmp_path / 'scratch'))[5]
  # A workdir of a run that did not start from init_from is not taken over by one.
  with pytest.raises(WorkdirError, match='already holds a run that did not start from'):
    _resolve(_config(questions, trained_workdir), str(tmp_path / 'scratch'))


def test_prepare_mode_tokenizes_a_fine_tuning_corpus_with_the_source_tokenizer(
    trained_workdir, questions, tmp_path):
  result = helpers.run_main('--mode=prepare', '--config=tests/tiny_config.py',
                            f'--workdir={tmp_path}', f'--config.init_from={trained_workdir}',
                            corpus=questions, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  manifest = prepare_lib.load_manifest(os.path.join(tmp_path, 'data'))
  assert manifest['tokenizer_sha256'] == _sha(files.tokenizer_path(trained_workdir))
