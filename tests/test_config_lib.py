"""Bad config values are one-line errors naming the field, before any JAX work."""

import os
import subprocess
import sys

import pytest

from configs import base
from jaxnmt import config_lib
from jaxnmt import errors
from tests import helpers
from tests.tiny_config import tiny_config

ROOT = helpers.ROOT


@pytest.mark.parametrize('field, value, message', [
    ('model.num_heads', 3, 'config.model.num_heads: d_model=512 must divide by num_heads=3'),
    ('model.num_encoder_layers', 0, 'config.model.num_encoder_layers: must be an integer >= 1'),
    ('model.dropout_rate', 1.5, 'config.model.dropout_rate: must be a number in [0.0, 1.0)'),
    ('model.activation', 'tanh',
     "config.model.activation: must be one of ['gelu', 'gelu_sigmoid', 'relu', 'swiglu', 'swish']"),
    ('model.position_embedding', 'alibi',
     "config.model.position_embedding: must be one of ['learned', 'rope', 'sinusoidal']"),
    ('task', 'classification', "config.task: must be one of ['lm', 'translation']"),
    ('optim.learning_rate', -1.0, 'config.optim.learning_rate: must be a number > 0'),
    ('optim.schedule', 'linear', "config.optim.schedule: must be one of ['cosine', 'rsqrt']"),
    ('data.batch_size', 0, 'config.data.batch_size: must be an integer >= 1'),
    ('data.test_fraction', 0.7, 'config.data.test_fraction: must be a number in [0.0, 0.5)'),
    ('tokenizer.vocab_size', 100, 'config.tokenizer.vocab_size: must be >= 300'),
    ('model.dtype', 'float16', "config.model.dtype: must be one of ['bfloat16', 'float32']"),
    ('model.attention', 'flash',
     "config.model.attention: must be one of ['dot_product', 'einsum']"),
    ('model.remat', 'yes', "config.model.remat: must be one of ['dots', 'full', 'none']"),
    ('model.attention_implementation', 'cudnn',
     "config.model.attention_implementation: applies to model.attention='dot_product' "
     "only, got 'cudnn' with 'einsum'"),
    ('model.d_model', True, 'config.model.d_model: must be an integer >= 1, got True'),
    ('seed', -1, 'config.seed: must be an integer >= 0, got -1'),
    ('data.device_memory_gb', -1.0,
     'config.data.device_memory_gb: must be a number in [0.0, inf), got -1.0'),
    ('optim.eps', 0.0, 'config.optim.eps: must be a number > 0, got 0.0'),
    ('data.path', None, 'config.data.path: must be a string, got None'),
    ('data.filter_max_length_ratio', 0.5,
     'config.data.filter_max_length_ratio: must be 0 (off) or a number >= 1, got 0.5'),
    ('optim.loss_chunks', 65,
     'config.optim.loss_chunks: 65 slices of data.max_target_length=64 tokens leave some '
     'empty'),
    ('optim.grad_accum_steps', 3,
     'config.optim.grad_accum_steps: data.batch_size=64 must divide by grad_accum_steps=3'),
    ('data.target_lang', 'en', 'config.data.target_lang: source and target languages must '
     "be two different names, got 'en' and 'en'"),
    ('data.weights', '1,x', 'config.data.weights: needs one number >= 0 per corpus'),
    ('data.test_sets', 'news', 'config.data.test_sets: expected comma-separated name=corpus'),
])
def test_bad_value_names_the_field(field, value, message):
  config = base.get_config()
  *sections, name = field.split('.')
  target = config
  for section in sections:
    target = target[section]
  target[name] = value
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value).startswith(message)
  assert '\n' not in str(error.value)


def test_dot_product_attention_needs_no_attention_dropout_and_cudnn_bfloat16():
  config = base.get_config()
  config.model.attention = 'dot_product'
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(config)  # base keeps attention_dropout_rate = 0.1
  assert str(error.value) == (
      "config.model.attention_dropout_rate: attention 'dot_product' has no attention "
      'dropout: the rate must be 0, got 0.1')
  config.model.attention_dropout_rate = 0.0
  config_lib.validate(config)
  config.model.attention_implementation = 'cudnn'
  with pytest.raises(errors.ConfigError, match="'cudnn' needs model.dtype='bfloat16'"):
    config_lib.validate(config)
  config.model.dtype = 'bfloat16'
  config_lib.validate(config)


def test_each_field_is_checked_alone_before_the_rules_between_fields():
  config = base.get_config()
  config.model.num_heads = 0  # would divide by zero in the rule d_model % num_heads
  config.data.source_lang = None  # its own rule comes before 'two different names'
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value) == 'config.model.num_heads: must be an integer >= 1, got 0'
  config.model.num_heads = 8
  with pytest.raises(errors.ConfigError) as error:
    config_lib.validate(config)
  assert str(error.value) == 'config.data.source_lang: must be a string, got None'


def test_every_config_field_has_a_rule():
  """A field added to configs/base.py without a rule in config_lib fails here: every
  field is in FIELD_RULES, or a boolean, or the mesh (config_lib.check_mesh)."""
  def fields(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from fields(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  unchecked = [field for field, value in fields(base.get_config().to_dict())
               if field not in config_lib.FIELD_RULES and not isinstance(value, bool)
               and not field.startswith(('mesh.', 'sharding_rules.'))]
  assert not unchecked


def test_compute_switches_are_harmless_to_resume_across():
  saved = base.get_config().to_dict()
  del saved['model']['remat']  # a checkpoint written before the field existed
  current = base.get_config()
  current.model.dtype = 'bfloat16'
  current.model.attention = 'dot_product'
  current.model.attention_implementation = 'cudnn'
  current.model.remat = 'dots'
  current.model.d_model = 256
  breaking, harmless = config_lib.resume_differences(saved, current.to_dict())
  assert breaking == ['model.d_model: 512 -> 256']
  assert harmless == ["model.attention: 'einsum' -> 'dot_product'",
                      "model.attention_implementation: '' -> 'cudnn'",
                      "model.dtype: 'float32' -> 'bfloat16'",
                      "model.remat: None -> 'dots'"]


def test_main_reports_bad_value_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.model.num_heads=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.model.num_heads: d_model=256 must divide by num_heads=3')
  assert 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path)  # nothing was started


def test_command_line_overrides_reach_the_config(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.model.num_encoder_layers=2',
       '--config.seed=0', '--config.data.path=/nonexistent/corpus.tsv'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: /nonexistent/corpus.tsv: no such file (nor a file pair '
      '/nonexistent/corpus.tsv.en + /nonexistent/corpus.tsv.es)')


def _main(*flags, cwd=ROOT, **env):
  return subprocess.run([sys.executable, '-m', 'jaxnmt.main', *flags], cwd=cwd,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env},
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('flags, message', [
    (['--mode=nonsense'], "error: flag --mode=nonsense: value should be one of"),
    (['--config=configs/tiny.py', '--config.model.no_such_field=1'],
     "error: --config override names no config field: \"'no_such_field'\""),
    (['--config=configs/tiny.py', '--num_processes=2'],
     'error: --workdir is required with several processes'),
    (['--mode=translate'], 'error: --workdir is required for --mode=translate'),
    (['--config=configs/tiny.py', '--workdir=WORKDIR', '--config.model.d_model=-1'],
     'error: config.model.d_model: must be an integer >= 1, got -1'),
    (['--config=configs/tiny.py', '--workdir=WORKDIR', '--beam_size=0'],
     'error: --beam_size, --batch_size and --serve_batch_size must be >= 1'),
    (['--mode=translate', '--workdir=WORKDIR', '--min_length=-1'],
     'error: --beam_size, --batch_size and --serve_batch_size must be >= 1, '
     '--temperature >= 0, --min_length >= 0'),
    (['--config=configs/tiny.py', '--workdir=WORKDIR', '--config.mesh.data=3'],
     'error: mesh data=3 needs 3 devices, found 8'),
    (['--mode=translate', '--workdir=WORKDIR'], 'error: WORKDIR/config.json not found'),
    (['--mode=eval', '--workdir=WORKDIR'], 'error: WORKDIR holds no training run'),
])
def test_every_user_error_is_one_line_and_exit_code_2(tmp_path, flags, message):
  workdir = str(tmp_path / 'run')
  flags = [flag.replace('WORKDIR', workdir) for flag in flags]
  result = _main(*flags, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message.replace('WORKDIR', workdir))
  assert 'Traceback' not in result.stderr


def test_workdir_defaults_to_runs_and_the_config_name(tmp_path):
  result = _main(f'--config={ROOT}/configs/big.py', '--config.data.path=/no/corpus.tsv',
                 cwd=tmp_path)
  assert 'Workdir: runs/big' in result.stderr
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      'error: /no/corpus.tsv: no such file (nor a file pair /no/corpus.tsv.en + '
      '/no/corpus.tsv.es)')


def test_loss_chunks_must_fit_the_target_length():
  config = tiny_config('')
  for bad in (-1, 25):
    config.optim.loss_chunks = bad
    with pytest.raises(errors.ConfigError, match='loss_chunks'):
      config_lib.validate(config)
  config.optim.loss_chunks = 24  # one token per chunk: allowed
  config_lib.validate(config)


def test_accumulation_steps_must_divide_the_batch():
  config = tiny_config('')
  config.optim.grad_accum_steps = 3
  with pytest.raises(errors.ConfigError, match='grad_accum_steps'):
    config_lib.validate(config)
  config.optim.grad_accum_steps = 2  # 8 rows / 2 = 4 per micro-batch, 8 devices
  with pytest.raises(errors.MeshError, match='batch=4'):
    config_lib.check_mesh(config, 8, 1)
  config_lib.check_mesh(config, 4, 1)  # 4 rows on 4 devices: fine


def test_dropout_rng_auto_picks_philox_on_one_device_only():
  assert config_lib.dropout_rng('auto', 1) == 'philox4x32'
  assert config_lib.dropout_rng('auto', 8) == 'threefry2x32'
  assert config_lib.dropout_rng('rbg', 8) == 'rbg'
  with pytest.raises(errors.MeshError, match='one device only'):
    config_lib.dropout_rng('philox4x32', 2)
