"""Greedy, sampling and beam search on hand-built step functions and on the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnmt.decoding import search
from tests import beam_reference
from jaxnmt.model import transformer

BOS, EOS = 2, 3


def markov_step(table):
  """A step function whose next-token log-probs depend only on the previous token.
  The 'cache' is a per-row counter, checking that caches are carried and reordered."""
  table = jnp.log(jnp.asarray(table, jnp.float32) + 1e-9)

  def step_fn(cache, tokens, index):
    return table[tokens], {'calls': cache['calls'] + 1}
  return step_fn


def two_path_table():
  """From BOS: A (token 4) p=0.6, B (token 5) p=0.4. After A: six tokens at 1/6 each.
  After B: EOS with p=0.9. Greedy takes A; the best sequence is B EOS (0.36)."""
  table = np.zeros((12, 12))
  table[BOS, 4], table[BOS, 5] = 0.6, 0.4
  table[4, 6:12] = 1 / 6
  table[5, EOS], table[5, 6] = 0.9, 0.1
  for token in range(6, 12):
    table[token, EOS] = 1.0
  table[EOS, EOS] = 1.0
  return table


def test_beam_search_finds_what_greedy_misses():
  step_fn = markov_step(two_path_table())
  cache = {'calls': jnp.zeros((1,), jnp.int32)}
  greedy = search.greedy(step_fn, cache, 1, 6, BOS, EOS)
  assert list(np.asarray(greedy[0])[:3]) == [4, 6, EOS]
  tokens, scores = search.beam_search(step_fn, cache, 1, 2, 6, BOS, EOS, alpha=0.0)
  assert list(np.asarray(tokens[0, 0])[:2]) == [5, EOS]
  np.testing.assert_allclose(scores[0, 0], np.log(0.4 * 0.9), rtol=1e-5)
  # n-best: the runner-up is A then one of the 1/6 tokens then EOS.
  np.testing.assert_allclose(scores[0, 1], np.log(0.6 / 6), rtol=1e-5)
  assert (np.asarray(scores[0, :-1]) >= np.asarray(scores[0, 1:])).all()


def test_finished_hypotheses_are_never_extended():
  step_fn = markov_step(two_path_table())
  cache = {'calls': jnp.zeros((2,), jnp.int32)}
  tokens, _ = search.beam_search(step_fn, cache, 2, 3, 8, BOS, EOS, alpha=0.6)
  for sequence in np.asarray(tokens).reshape(-1, 8):
    end = list(sequence).index(EOS)
    assert (sequence[end + 1:] == 0).all(), sequence


def test_length_penalty_prefers_longer_hypotheses_as_alpha_grows():
  # From BOS: EOS p=0.5 or token 4 p=0.5; token 4 -> token 6 (p=0.9) -> EOS.
  table = np.zeros((8, 8))
  table[BOS, EOS], table[BOS, 4] = 0.5, 0.5
  table[4, 6], table[4, EOS] = 0.9, 0.1
  table[6, EOS] = 1.0
  table[EOS, EOS] = 1.0
  step_fn = markov_step(table)
  cache = {'calls': jnp.zeros((1,), jnp.int32)}
  short, _ = search.beam_search(step_fn, cache, 1, 2, 6, BOS, EOS, alpha=0.0)
  long, _ = search.beam_search(step_fn, cache, 1, 2, 6, BOS, EOS, alpha=2.0)
  assert int(short[0, 0, 0]) == EOS
  assert list(np.asarray(long[0, 0])[:3]) == [4, 6, EOS]


def test_max_lengths_force_eos_per_row():
  table = np.full((8, 8), 1 / 8)
  table[:, EOS] = 0.0
  step_fn = markov_step(table / table.sum(1, keepdims=True))
  cache = {'calls': jnp.zeros((2,), jnp.int32)}
  tokens = search.greedy(step_fn, cache, 2, 10, BOS, EOS, jnp.array([3, 5]))
  assert list(np.asarray(tokens[0])).index(EOS) == 2
  assert list(np.asarray(tokens[1])).index(EOS) == 4
  beams, _ = search.beam_search(step_fn, cache, 2, 2, 10, BOS, EOS, 0.6, jnp.array([3, 5]))
  assert list(np.asarray(beams[0, 0])).index(EOS) == 2
  assert list(np.asarray(beams[1, 0])).index(EOS) == 4


def test_top_p_keeps_the_smallest_set_with_enough_mass():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  kept = lambda p: set(np.flatnonzero(np.asarray(search.filter_logits(logits, top_p=p)[0]) >
                                      search.NEG_INF / 2))
  assert kept(0.4) == {1}
  assert kept(0.7) == {1, 3}
  assert kept(0.79) == {1, 3}
  assert kept(0.81) == {1, 3, 2}
  assert kept(1.0) == {0, 1, 2, 3}


def test_top_k_filter():
  logits = jnp.array([[1.0, 4.0, 2.0, 3.0]])
  filtered = np.asarray(search.filter_logits(logits, top_k=2))[0]
  assert list(filtered > search.NEG_INF / 2) == [False, True, False, True]


def test_sampling_draws_from_the_filtered_distribution():
  table = np.zeros((8, 8))
  table[BOS, 4:8] = [0.4, 0.3, 0.2, 0.1]
  table[4:8, EOS] = 1.0
  step_fn = markov_step(table)
  cache = {'calls': jnp.zeros((2000,), jnp.int32)}
  first = lambda **kw: np.asarray(search.sample(step_fn, cache, 2000, 3, BOS, EOS,
                                                jax.random.key(0), **kw))[:, 0]
  counts = np.bincount(first(), minlength=8)[4:8] / 2000
  np.testing.assert_allclose(counts, [0.4, 0.3, 0.2, 0.1], atol=0.04)
  assert set(first(top_k=2)) == {4, 5}
  assert set(first(top_p=0.65)) == {4, 5}
  assert set(first(temperature=0.01)) == {4}


def test_a_key_per_row_samples_a_row_the_same_in_any_batch():
  """Keys [B]: a row's tokens depend on its own key only, wherever it sits in the
  batch; and per-row keys still draw from the distribution (not one draw repeated)."""
  table = np.full((12, 12), 1 / 8)
  table[:, :4] = 0.0
  table[:, EOS] = 1 / 8
  step_fn = markov_step(table)
  keys = jax.random.split(jax.random.key(7), 64)
  run = lambda k: np.asarray(search.sample(step_fn, {'calls': jnp.zeros((len(k),), jnp.int32)},
                                           len(k), 6, BOS, EOS, k))
  whole = run(keys)
  order = np.random.default_rng(0).permutation(64)
  np.testing.assert_array_equal(run(keys[order]), whole[order])
  np.testing.assert_array_equal(run(keys[5:13]), whole[5:13])
  assert len({tuple(row) for row in whole}) > 50


def small_model():
  config = transformer.ModelConfig(vocab_size=30, num_encoder_layers=1, num_decoder_layers=2,
                                 d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0,
                                 attention_dropout_rate=0.0)
  return transformer.Transformer(config, rngs=nnx.Rngs(params=3, dropout=4))


@pytest.fixture(scope='module')
def encoded_batch():
  model = small_model()
  inputs = jnp.asarray(np.random.default_rng(0).integers(4, 30, (3, 7)), jnp.int32)
  inputs = inputs.at[2, 4:].set(0)
  segments = (inputs > 0).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(7), (3, 7))
  return model, model.encode(inputs, segments, positions), segments


def test_beam_of_one_and_top_k_of_one_equal_greedy(encoded_batch):
  model, encoded, segments = encoded_batch
  cache = model.init_cache(encoded, segments, 12)
  greedy = search.greedy(model.decode_step, cache, 3, 12, BOS, EOS)
  beam, _ = search.beam_search(model.decode_step, cache, 3, 1, 12, BOS, EOS, alpha=0.6)
  sampled = search.sample(model.decode_step, cache, 3, 12, BOS, EOS, jax.random.key(5),
                          top_k=1)
  np.testing.assert_array_equal(beam[:, 0], greedy)
  np.testing.assert_array_equal(sampled, greedy)


def test_cached_and_uncached_decoding_agree(encoded_batch):
  model, encoded, segments = encoded_batch
  cached = model.init_cache(encoded, segments, 12)
  uncached = model.init_uncached(encoded, segments, 12)
  np.testing.assert_array_equal(
      search.greedy(model.decode_step, cached, 3, 12, BOS, EOS),
      search.greedy(model.decode_step_uncached, uncached, 3, 12, BOS, EOS))
  beam_cached, scores_cached = search.beam_search(model.decode_step, cached, 3, 4, 12, BOS,
                                                  EOS)
  beam_uncached, scores_uncached = search.beam_search(model.decode_step_uncached, uncached,
                                                      3, 4, 12, BOS, EOS)
  np.testing.assert_array_equal(beam_cached[:, 0], beam_uncached[:, 0])
  np.testing.assert_allclose(scores_cached, scores_uncached, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- optimised vs plain


def greedy_reference(step_fn, cache, batch_size, max_length, max_lengths, min_lengths=None):
  """The plainest greedy decoder: a Python loop over all max_length steps on the full
  cache -> int32 [B, L] (EOS, then 0s, after the end)."""
  step_fn = jax.jit(step_fn)
  previous = jnp.full((batch_size,), BOS, jnp.int32)
  tokens = np.zeros((batch_size, max_length), np.int32)
  finished = np.zeros((batch_size,), bool)
  for index in range(max_length):
    logits, cache = step_fn(cache, previous, index)
    logits = np.array(logits)
    if min_lengths is not None:
      logits[index + 1 < np.asarray(min_lengths), EOS] = -np.inf
    chosen = logits.argmax(-1)
    chosen = np.where(index + 1 >= np.asarray(max_lengths), EOS, chosen)
    chosen = np.where(finished, 0, chosen)
    tokens[:, index] = chosen
    finished |= chosen == EOS
    previous = jnp.asarray(chosen, jnp.int32)
  return tokens


@pytest.fixture(scope='module')
def eager_eos_model():
  """A small random model, 5 source rows, whose EOS logit grows with the position (and
  after some tokens) so that hypotheses end at many lengths, many before their cap."""
  model = small_model()
  inputs = jnp.asarray(np.random.default_rng(1).integers(4, 30, (5, 6)), jnp.int32)
  inputs = inputs.at[1, 3:].set(0)
  segments = (inputs > 0).astype(jnp.int32)
  encoded = model.encode(inputs, segments, jnp.broadcast_to(jnp.arange(6), (5, 6)))

  def step_fn(cache, tokens, index):
    logits, cache = model.decode_step(cache, tokens, index)
    eos_bias = -3.0 + 0.4 * index + jnp.where(tokens % 3 == 0, 1.0, 0.0)
    return logits.at[:, EOS].add(eos_bias), cache
  return step_fn, model.init_cache(encoded, segments, 20)


@pytest.mark.parametrize('window', [8, 4])
@pytest.mark.parametrize('alpha', [0.6, 1.5])
def test_beam_search_returns_the_reference_hypotheses(eager_eos_model, window, alpha):
  step_fn, cache = eager_eos_model
  max_lengths = jnp.array([3, 9, 20, 14, 17], jnp.int32)
  args = (step_fn, cache, 5, 4, 20, BOS, EOS, alpha, max_lengths)
  tokens, scores = search.beam_search(*args, window=window)
  expected_tokens, expected_scores = beam_reference.beam_search(*args)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  # The case is not trivial: hypotheses of many lengths, some ended before their cap,
  # and rows decoded past the first window.
  lengths = np.argmax(np.asarray(tokens) == EOS, axis=-1) + 1       # [B, K]
  assert (lengths < np.asarray(max_lengths)[:, None]).sum() >= 5, lengths
  assert len(np.unique(lengths)) >= 4 and lengths.max() > window, lengths
  assert (np.asarray(scores)[:, :-1] >= np.asarray(scores)[:, 1:]).all()


def test_beam_search_returns_the_reference_hypotheses_over_a_larger_vocabulary(
    eager_eos_model):
  """The chunked selection over a sentence's K x V candidates (V = 2,048; the small
  model's 30 take lax.top_k), and a row capped at one token: EOS forced at the first
  step, whose candidates come from one beam."""
  step_fn, cache = eager_eos_model
  step_fn = _with_vocabulary(step_fn, 2048)
  max_lengths = jnp.array([1, 9, 20, 14, 17], jnp.int32)
  args = (step_fn, cache, 5, 4, 20, BOS, EOS, 0.6, max_lengths)
  tokens, scores = search.beam_search(*args, window=4)
  expected_tokens, expected_scores = beam_reference.beam_search(*args)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  assert np.asarray(tokens)[0, 0, 0] == EOS and np.asarray(scores)[0, 0] > search.NEG_INF / 2
  lengths = np.argmax(np.asarray(tokens) == EOS, axis=-1) + 1
  assert len(np.unique(lengths[1:])) >= 4, lengths


def test_greedy_returns_the_reference_tokens(eager_eos_model):
  step_fn, cache = eager_eos_model
  max_lengths = jnp.array([3, 9, 20, 14, 17], jnp.int32)
  expected = greedy_reference(step_fn, cache, 5, 20, max_lengths)
  for window in (16, 4, None):
    tokens = search.greedy(step_fn, cache, 5, 20, BOS, EOS, max_lengths, window=window)
    np.testing.assert_array_equal(tokens, expected)


def _with_vocabulary(step_fn, size: int):
  """`step_fn` with its logits padded to `size` columns by tokens never chosen: a
  vocabulary large enough for `selection.top_k`'s chunked path (the small model's 30
  take `lax.top_k`)."""
  def step(cache, tokens, index):
    logits, cache = step_fn(cache, tokens, index)
    filler = -50.0 - 1e-3 * jnp.arange(size - logits.shape[-1], dtype=logits.dtype)
    filler = jnp.broadcast_to(filler, (logits.shape[0], filler.shape[0]))
    return jnp.concatenate([logits, filler], axis=-1), cache
  return step


@pytest.mark.parametrize('vocabulary', [None, 2048])
def test_min_lengths_ban_eos_as_the_plain_searches_do(eager_eos_model, vocabulary):
  step_fn, cache = eager_eos_model
  if vocabulary:
    step_fn = _with_vocabulary(step_fn, vocabulary)
  max_lengths = jnp.array([3, 9, 20, 14, 17], jnp.int32)
  min_lengths = jnp.array([2, 7, 18, 20, 1], jnp.int32)  # row 3: max_lengths wins
  args = (step_fn, cache, 5, 4, 20, BOS, EOS, 0.6, max_lengths)
  tokens, scores = search.beam_search(*args, min_lengths=min_lengths, window=4)
  expected_tokens, expected_scores = beam_reference.beam_search(*args, min_lengths)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  lengths = np.argmax(np.asarray(tokens) == EOS, axis=-1) + 1       # [B, K]
  floor = np.minimum(min_lengths, max_lengths)[:, None]
  assert (lengths >= floor).all(), lengths
  # Without the floor some hypotheses do end earlier: the ban changed the search.
  unbanned = np.argmax(np.asarray(search.beam_search(*args, window=4)[0]) == EOS, -1) + 1
  assert (unbanned < floor).any(), unbanned

  expected = greedy_reference(step_fn, cache, 5, 20, max_lengths, min_lengths)
  greedy_lengths = np.argmax(expected == EOS, axis=-1) + 1
  assert (greedy_lengths >= floor[:, 0]).all(), greedy_lengths
  unbanned = greedy_reference(step_fn, cache, 5, 20, max_lengths)
  assert ((np.argmax(unbanned == EOS, axis=-1) + 1) < floor[:, 0]).any()  # a binding floor
  for window in (4, None):
    found = search.greedy(step_fn, cache, 5, 20, BOS, EOS, max_lengths,
                          min_lengths=min_lengths, window=window)
    np.testing.assert_array_equal(found, expected)


def test_windows_cover_the_positions_to_decode():
  assert search.window_ends(64) == [8, 16, 32, 64]
  assert search.window_ends(20, window=4) == [4, 8, 16, 20]
  assert search.window_ends(20, start=9, window=4) == [16, 20]
  assert search.window_ends(12) == [8, 12]
  assert search.window_ends(8) == [8]
  assert search.window_ends(64, window=None) == [64]


def test_sampling_a_continuation_is_the_same_in_windows():
  config = transformer.ModelConfig(vocab_size=30, num_decoder_layers=2, d_model=32,
                                 num_heads=4, d_ff=64, dropout_rate=0.0,
                                 attention_dropout_rate=0.0, kind='decoder_lm')
  model = transformer.DecoderLM(config, rngs=nnx.Rngs(params=5, dropout=6))
  prompt = jnp.asarray(np.random.default_rng(2).integers(4, 30, (3, 6)), jnp.int32)
  cache = model.init_cache(3, 24)
  for index in range(5):
    _, cache = model.decode_step(cache, prompt[:, index], index)
  run = lambda window: search.sample(model.decode_step, cache, 3, 24, BOS, EOS,
                                     jax.random.key(7), max_lengths=jnp.full((3,), 99),
                                     start_index=5, first_tokens=prompt[:, 5],
                                     window=window)
  np.testing.assert_array_equal(run(4), run(None))


