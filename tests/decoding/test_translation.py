"""decoding/translation: the Translator's batching by tokens, minimum lengths, scores,
inputs of any length translated whole (or sentence by sentence), and its length buckets."""

import dataclasses
import logging
import os

import jax
import numpy as np
import pytest

from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.decoding import translation
from jaxnmt.errors import UserError

BEAM2 = translation.DecodeOptions(beam_size=2)


@pytest.fixture(scope='module')
def test_sources(trained_workdir):
  with open(os.path.join(trained_workdir, 'splits', 'test.src'), encoding='utf-8') as handle:
    return handle.read().splitlines()


def test_token_batching_gives_the_one_by_one_results(loaded, test_sources):
  translator = translation.Translator(loaded, BEAM2, batch_tokens=256)
  sources = test_sources[:14] + ['', 'Hi.']
  batched = translator.translate_nbest(sources, 2, batch_size=16)
  plan = translator.plan([len(ids or ()) for ids in translator.encode(sources)], 16)
  assert len(plan) > 1 and sorted(i for _, _, rows in plan for i in rows) == [
      i for i, line in enumerate(sources) if line]
  devices = translator.devices
  for length, rows, indices in plan:
    assert rows % devices == 0 and len(indices) <= rows <= 16
    assert rows * length <= 256 or rows == devices
  for line, hypotheses in zip(sources, batched):
    alone = translator.translate_nbest([line], 2)[0]
    assert [h.text for h in hypotheses] == [h.text for h in alone]
    np.testing.assert_allclose([h.score for h in hypotheses], [h.score for h in alone],
                               atol=1e-4)
  assert translator.translate(sources, 16) == [hs[0].text for hs in batched]


def _best_lengths(translator, sources):
  """(the best hypothesis' length in tokens, EOS included, per source; its score)."""
  calls, jitted = [], translator._decoder  # pylint: disable=protected-access

  def spy(options, scores):
    def decode(params, rest, inputs, max_lengths, key, *, max_length):
      tokens, batch_scores = jitted(options, scores)(params, rest, inputs, max_lengths, key,
                                                     max_length=max_length)
      calls.append(np.asarray(tokens)[:len(sources), 0])
      return tokens, batch_scores
    return decode

  translator._decoder = spy  # pylint: disable=protected-access
  [hypotheses] = [translator.translate_nbest(sources)]
  [tokens] = calls
  lengths = np.argmax(tokens == tokenizer_lib.EOS_ID, axis=-1) + 1
  return lengths, np.array([h[0].score for h in hypotheses])


@pytest.mark.parametrize('search', [dict(beam_size=1), dict(beam_size=2),
                                    dict(beam_size=1, temperature=1.0)])
def test_min_length_keeps_outputs_from_ending_early(loaded, search):
  eager = _eos_logit_set(loaded, 30.0)  # every search ends at once unless kept from it
  sources = ['Where is the station?', 'I am tired.']
  plain = translation.Translator(eager, translation.DecodeOptions(**search))
  lengths, scores = _best_lengths(plain, sources)
  assert (lengths == 1).all(), lengths
  floored = translation.Translator(eager, translation.DecodeOptions(**search, min_length=5))
  floored_lengths, floored_scores = _best_lengths(floored, sources)
  assert (floored_lengths >= 6).all(), floored_lengths  # 5 tokens, then EOS
  # The floor removes hypotheses, never rescores one: the best is less likely now.
  assert (floored_scores < scores).all(), (scores, floored_scores)


def test_greedy_hypotheses_carry_their_score(loaded):
  translator = translation.Translator(loaded, translation.DecodeOptions(beam_size=1))
  [[hypothesis]] = translator.translate_nbest(['Good morning.'])
  assert np.isfinite(hypothesis.score) and hypothesis.score < 0


def _eos_logit_set(loaded, value: float):
  """`loaded` with the EOS logit raised by `value` at every step (negative: lowered)."""
  params = jax.tree.map(lambda x: x, loaded.params)
  norm = params['decoder_norm']
  norm['scale'].value = norm['scale'].value.at[0].set(0.0)
  norm['bias'].value = norm['bias'].value.at[0].set(1.0)  # feature 0 is always 1
  embedding = params['source_embed']['embedding']  # tied with the output layer
  embedding.value = embedding.value.at[tokenizer_lib.EOS_ID, 0].set(value)
  return dataclasses.replace(loaded, params=params)


def _never_ending(loaded):
  """`loaded` with the EOS logit pushed far down: every output runs to its cap."""
  return _eos_logit_set(loaded, -1e4)


def test_long_inputs_are_translated_whole(loaded, caplog):
  translator = translation.Translator(_never_ending(loaded), translation.DecodeOptions(beam_size=1))
  data = translator.config.data
  long_line = ' '.join(['the cat sleeps on the sofa and the dog barks'] * 12)
  source_tokens = len(translator.tokenizer.encode(long_line)) + 1
  assert source_tokens >= 3 * data.max_source_length
  calls = []
  jitted = translator._decoder  # pylint: disable=protected-access

  def spy(options, scores):
    def decode(params, rest, inputs, max_lengths, key, *, max_length):
      tokens, batch_scores = jitted(options, scores)(params, rest, inputs, max_lengths, key,
                                                     max_length=max_length)
      calls.append((np.asarray(inputs), np.asarray(max_lengths), max_length,
                    np.asarray(tokens)))
      return tokens, batch_scores
    return decode

  translator._decoder = spy  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    [output] = translator.translate([long_line])
    translator.translate([long_line, long_line])
  [inputs, caps, max_length, tokens] = calls[0]
  assert (inputs[0] != 0).sum() == source_tokens  # the whole source reaches the encoder
  cap = translator.output_cap(source_tokens)
  assert cap == int(1.5 * source_tokens + 10) > 2 * data.max_target_length
  assert caps[0] == cap and max_length >= cap
  end = list(tokens[0, 0]).index(tokenizer_lib.EOS_ID)
  assert end + 1 == cap  # ran to its cap, far past max_target_length
  assert output
  warnings = [r.getMessage() for r in caplog.records if 'not truncated' in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith('1 input line')  # once per run
  assert translator.long_lines == 3


def test_a_line_beyond_a_learned_position_table_is_refused_by_name(loaded):
  learned = dataclasses.replace(loaded, model_config=dataclasses.replace(
      loaded.model_config, position_embedding='learned', max_length=40))
  translator = translation.Translator(learned)
  assert translator.max_source_tokens == 40 and translator.output_cap(30) == 40
  with pytest.raises(UserError, match='input line 2 has .* tokens, more than the 40'):
    translator.translate(['Hello.', 'word ' * 50])


def test_length_buckets_are_few():
  assert [translation.length_bucket(n) for n in (1, 16, 17, 64, 65, 97, 129, 200, 300)] == [
      16, 16, 32, 64, 96, 128, 192, 256, 384]
  assert len({translation.length_bucket(n) for n in range(1, 1025)}) == 12


def test_sentences_are_split_where_they_end():
  assert translation.split_sentences('Tom is here. He is tired! Is he? "Yes." 10 came.') == [
      'Tom is here.', 'He is tired!', 'Is he?', '"Yes."', '10 came.']
  assert translation.split_sentences('I met Mr. Smith. Pi is 3.14 here.') == [
      'I met Mr. Smith.', 'Pi is 3.14 here.']
  assert translation.split_sentences('¿Dónde está? ¡Aquí!') == ['¿Dónde está?', '¡Aquí!']
  assert translation.split_sentences('no end at all') == ['no end at all']


def test_a_long_line_of_sentences_is_translated_sentence_by_sentence(loaded, test_sources):
  translator = translation.Translator(loaded, BEAM2)
  trained = translator.config.data.max_source_length
  sentences = [s for s in test_sources if s.rstrip().endswith(('.', '?', '!'))
               and s[:1].isupper()][:8]
  long_line = ' '.join(sentences)
  assert len(translator.tokenizer.encode(long_line)) > trained
  short_line = sentences[0]
  [encoded_long, encoded_short] = translator.encode([long_line, short_line])
  assert isinstance(encoded_long, tuple) and len(encoded_long) == len(sentences)
  assert isinstance(encoded_short, list)  # short lines are never split
  one_by_one = translator.translate_nbest(sentences)
  [joined, short] = translator.translate_nbest([long_line, short_line])
  assert joined[0].text == ' '.join(h[0].text for h in one_by_one)
  np.testing.assert_allclose(joined[0].score, sum(h[0].score for h in one_by_one), rtol=1e-4)
  assert short[0].text == one_by_one[0][0].text
