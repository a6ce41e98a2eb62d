"""Shared fixtures: a small corpus cut from the real one, a tiny config, and a model
trained once per test session."""

import os
import random
import zipfile

import pytest

SHARED_DATA = os.environ.get(
    'JAXNMT_DATA_DIR',
    os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


def real_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
  """`count` random lines of the real spa-eng corpus, as (english, spanish)."""
  with zipfile.ZipFile(os.path.join(SHARED_DATA, 'spa-eng.zip')) as archive:
    lines = archive.read('spa-eng/spa.txt').decode('utf-8').splitlines()
  picked = random.Random(seed).sample(lines, count)
  return [tuple(line.split('\t')[:2]) for line in picked]


@pytest.fixture(scope='session')
def small_corpus(tmp_path_factory) -> str:
  """A 3,000-pair TSV of real sentence pairs."""
  path = tmp_path_factory.mktemp('corpus') / 'pairs.tsv'
  path.write_text(''.join(f'{en}\t{es}\n' for en, es in real_pairs(3000)), encoding='utf-8')
  return str(path)


def tiny_config(corpus_path: str):
  """configs/tiny.py shrunk to seconds: 1+1 layers, width 32, vocab 400."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.path = corpus_path
  config.data.max_source_length = 24
  config.data.max_target_length = 24
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.num_packing_bins = 16
  config.data.valid_fraction = 0.02
  config.data.test_fraction = 0.02
  config.tokenizer.vocab_size = 400
  config.model.num_encoder_layers = 1
  config.model.num_decoder_layers = 1
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.d_ff = 64
  config.num_train_steps = 20
  config.train_time_limit_minutes = 0.0
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 10
  config.optim.warmup_steps = 5
  return config


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, small_corpus) -> str:
  """A workdir holding a tiny model trained for 20 steps."""
  from jaxnmt import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(tiny_config(small_corpus), workdir)
  return workdir
