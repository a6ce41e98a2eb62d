"""decoding/scoring: teacher-forced log-probabilities of given pairs agree with the
scores the decoder gives its own outputs, do not depend on batch mates or padding,
and count the target's EOS."""

import jax
import numpy as np
import pytest

from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.decoding import scoring
from jaxnmt.decoding import translation
from jaxnmt.errors import UserError

LINES = ['Good morning.', 'Where is the station?', 'Tom is here.', 'I love you.',
         'We will leave tomorrow.', 'Hello.']


def _greedy(loaded, sources):
  """Greedy outputs (ids, EOS included) and their log-probabilities, from the decoder."""
  options = translation.DecodeOptions(beam_size=1, length_penalty=0.0)
  translator = translation.Translator(loaded, options)
  lengths = [len(ids) for ids in sources]
  source_length = translation.length_bucket(max(lengths))
  rows = len(loaded.mesh.devices.flat)
  inputs = np.zeros((rows, source_length), np.int32)
  caps = np.ones((rows,), np.int32)
  for row, ids in enumerate(sources):
    inputs[row, :len(ids)] = ids
    caps[row] = translator.output_cap(len(ids))
  tokens, scores = translation.decoder(loaded.graphdef, options, scores=True)(
      loaded.params, loaded.rest, inputs, caps, jax.random.key(0),
      max_length=translator._output_length(source_length))  # pylint: disable=protected-access
  outputs = []
  for row in range(len(sources)):
    ids = list(np.asarray(tokens)[row, 0])
    outputs.append(ids[:ids.index(tokenizer_lib.EOS_ID) + 1])
  return outputs, np.asarray(scores)[:len(sources), 0]


def test_scores_match_the_decoders_own_and_count_eos(loaded):
  sources = [loaded.tokenizer.encode(line) + [tokenizer_lib.EOS_ID] for line in LINES]
  outputs, expected = _greedy(loaded, sources)
  got = scoring.score(loaded, sources, outputs, add_eos=False, per_token=True)
  assert [s.tokens for s in got] == [len(ids) for ids in outputs]
  np.testing.assert_allclose([s.total for s in got], expected, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose([sum(s.token_log_probs) for s in got],
                             [s.total for s in got], atol=1e-4)
  assert all(s.total < 0 and np.isclose(s.mean, s.total / s.tokens) for s in got)


def test_a_pair_scores_the_same_alone_and_in_any_batch(loaded):
  tokenizer = loaded.tokenizer
  sources = [tokenizer.encode(line) for line in LINES]
  targets = [tokenizer.encode(line[::-1]) for line in LINES]
  together = scoring.score(loaded, sources, targets)
  alone = [scoring.score(loaded, [s], [t])[0] for s, t in zip(sources, targets)]
  np.testing.assert_allclose([s.total for s in together], [s.total for s in alone],
                             rtol=1e-5, atol=1e-4)
  # EOS appended: one more token than the pieces.
  assert [s.tokens for s in together] == [len(t) + 1 for t in targets]
  text = scoring.score_text(loaded, LINES + [''], [line[::-1] for line in LINES] + ['x'])
  assert [s.total for s in text[:-1]] == [s.total for s in together]
  assert (text[-1].total, text[-1].tokens) == (0.0, 0)  # an empty side: not scored


def test_unequal_sides_are_a_user_error(loaded):
  with pytest.raises(UserError, match='2 sources but 1 targets'):
    scoring.score(loaded, [[5], [6]], [[7]])
