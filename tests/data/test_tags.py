"""data/tags and the tokenizer's tags: corpus prefixes and every tag from a config,
user-defined symbols of one id stored in the tokenizer, leading tags encoded as ids,
one-line refusals of unknown input tags, missing target languages, and tokenizers
that lack a tag the config needs."""

import pytest

from jaxnmt.data import tags as tags_lib
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.errors import DataError, UserError
from tests.helpers import real_pairs
from tests.tiny_config import tiny_config


def _config(**data):
  config = tiny_config('a.tsv,b.tsv')
  for key, value in data.items():
    config.data[key] = value
  return config


def test_prefixes_and_tags_of_a_config():
  config = _config(tags=',bt', target_langs='es,fr')
  assert tags_lib.corpus_prefixes(config, 2) == ['<2es> ', '<2fr> <bt> ']
  config.tokenizer.reserved_tags = '<2de>,<bt>'
  assert tags_lib.all_tags(config) == ['<bt>', '<2es>', '<2fr>', '<2de>']
  assert tags_lib.corpus_prefixes(_config(), 2) == ['', '']
  opus = _config(target_langs='spa,fra', target_tag_format='>>{}<<')
  assert tags_lib.corpus_prefixes(opus, 2) == ['>>spa<< ', '>>fra<< ']


@pytest.fixture(scope='module')
def tagged(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tags') / 'tokenizer.model')
  sentences = [side for pair in real_pairs(400) for side in pair]
  return tokenizer_lib.train(['<2es> <bt> ' + s for s in sentences[:100]] + sentences, path,
                             vocab_size=600, tags=['<bt>', '<2es>', '<2fr>'])


def test_tags_are_stored_one_id_each_and_lead_the_ids(tagged):
  reloaded = tokenizer_lib.load(tagged.model_path, 'unigram')
  assert reloaded.tags == ('<bt>', '<2es>', '<2fr>')
  plain = reloaded.encode('Where is the station?')
  assert reloaded.encode('<2es> <bt> Where is the station?') == [5, 4] + plain
  assert reloaded.encode_batch(['<2fr> Where is the station?', '<bt>']) == [[6] + plain, [4]]
  assert 4 not in plain and 5 not in plain


def test_unknown_input_tags_and_missing_languages_are_one_line(tagged):
  config = _config(tags=',bt', target_langs='es,fr')
  tagger = tags_lib.Tagger(config, tagged)
  assert tagger('<2fr> Hello.', 1) == '<2fr> Hello.'
  with pytest.raises(UserError, match=r'input line 3 starts with the tag <2de>, which this '
                                      r'model was not trained with'):
    tagger('<2de> Hello.', 3)
  with pytest.raises(UserError, match=r'line 2 names no target language and this model is '
                                      r'multilingual \(es, fr\): give --target_lang'):
    tagger('Hello.', 2)
  assert tags_lib.Tagger(config, tagged, 'es')('Hello.', 1) == '<2es> Hello.'
  assert tags_lib.Tagger(config, tagged, 'es')('<2fr> Hello.', 1) == '<2fr> Hello.'
  with pytest.raises(UserError, match='--target_lang=de: this model has no tag <2de>'):
    tags_lib.Tagger(config, tagged, 'de')
  # A model without tags reads '<b>' as text.
  assert tags_lib.Tagger(_config(), tokenizer_lib.CharTokenizer.__new__(
      tokenizer_lib.CharTokenizer))('<b> bold', 1) == '<b> bold'


def test_a_tokenizer_without_a_needed_tag_is_refused(tagged, pairs_tokenizer):
  config = _config(tags=',bt', target_langs='es,fr')
  tags_lib.check_tokenizer(config, tagged, 'T')
  config.tokenizer.reserved_tags = '<2de>'
  with pytest.raises(DataError, match=r'the tokenizer T has no tag <2de> \(its tags: <bt>, '
                                      r'<2es>, <2fr>\): tags are fixed when'):
    tags_lib.check_tokenizer(config, tagged, 'T')
  with pytest.raises(DataError, match='its tags: none'):
    tags_lib.check_tokenizer(config, pairs_tokenizer, 'P')


def test_config_checks_of_tags_are_one_line():
  from jaxnmt import config_lib  # pylint: disable=g-import-not-at-top
  from jaxnmt.errors import ConfigError  # pylint: disable=g-import-not-at-top
  config_lib.validate(_config(tags=',bt', target_langs='es,fr'))
  for data, message in (({'tags': 'bt'}, 'config.data.tags: needs one entry per corpus'),
                        ({'target_langs': 'es,f r'}, 'entries are names'),
                        ({'target_tag_format': '<2>'}, "needs one '{}'")):
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(_config(**data))
