"""data/tokenizer: SentencePiece with fixed special ids, casing and punctuation kept and
any Unicode accepted; the character tokenizer round-trips its training text."""

import os

import pytest

from jaxnmt.data import corpus as data
from jaxnmt import errors
from jaxnmt.data import lm as lm_lib
from jaxnmt.data import tokenizer as tokenizer_lib
from tests.helpers import SHAKESPEARE


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory, small_corpus):
  pairs, _ = data.read_pairs(small_corpus)
  path = str(tmp_path_factory.mktemp('tok') / 'spm.model')
  return tokenizer_lib.train([side for pair in pairs for side in pair], path, vocab_size=500)


def test_special_ids_and_vocab_size(tokenizer):
  assert tokenizer.vocab_size == 500
  processor = tokenizer._processor  # pylint: disable=protected-access
  assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (
      tokenizer_lib.PAD_ID, tokenizer_lib.UNK_ID, tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID)


@pytest.mark.parametrize('text', [
    'Where is the train station?',
    '¿Dónde está la estación de tren?',
    'TOM said: "No!"  (twice)',
    'Ünïcödé — 日本語, emoji 🙂 and ½.',
])
def test_round_trip_keeps_text_exactly(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer_lib.UNK_ID not in ids  # byte fallback covers unseen characters
  assert tokenizer.decode(ids) == text


def test_decode_stops_at_eos_and_skips_pad_and_bos(tokenizer):
  ids = tokenizer.encode('Hola.')
  assert tokenizer.decode([tokenizer_lib.BOS_ID] + ids + [tokenizer_lib.EOS_ID, 7, 8, 0]) == 'Hola.'


def test_missing_model_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='tokenizer model not found'):
    tokenizer_lib.Tokenizer(str(tmp_path / 'nope.model'))


def test_vocabulary_too_large_for_the_corpus_is_a_config_error(tmp_path):
  with pytest.raises(errors.ConfigError, match='config.tokenizer.vocab_size=5000 is too large'):
    tokenizer_lib.train(['a small corpus', 'of two sentences'], str(tmp_path / 'spm.model'),
                        vocab_size=5000)
  assert not os.path.exists(tmp_path / 'spm.model')


def test_char_tokenizer_round_trips_the_training_text(tmp_path):
  text = open(SHAKESPEARE, encoding='utf-8').read()
  train_text, valid_text = lm_lib.split_text(text, 0.1)
  assert len(train_text) + len(valid_text) == 1_115_394
  tokenizer = tokenizer_lib.train_chars(train_text, str(tmp_path / 'chars.json'))
  assert tokenizer.vocab_size == len(set(train_text)) + 4
  assert tokenizer.decode(tokenizer.encode(train_text)) == train_text
  reloaded = tokenizer_lib.load(str(tmp_path / 'chars.json'), 'char')
  assert reloaded.encode('ROMEO:') == tokenizer.encode('ROMEO:')
  assert tokenizer.encode('€')[0] == tokenizer_lib.UNK_ID
