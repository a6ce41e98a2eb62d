"""Decoding strategies over a cached step function, independent of the model class.

`step_fn(cache, tokens [B], index) -> (logits [B, V], cache)` is any cached decoder.
All strategies run under `lax.while_loop` with static shapes and stop as soon as every
sequence has ended. Shapes: B batch, K beams, L max output length, V vocabulary,
W window.

A `cache.DecoderCache` (the models' caches; `model/cache.py` is the contract) lets the
searches save work: its slots grow in windows (8, 16, 32, ... positions; `window`),
and beam search never repeats its cross arrays for the beams nor reorders its slots
(beam slots). Any other cache is a pytree of [B, ...] arrays: beam search repeats it
for the beams and reorders it with them, except an array the step returns untouched
(the very traced value it was given: the same for every beam of a sentence).
"""

import jax
import jax.numpy as jnp

from jaxnmt.decoding import selection
from jaxnmt.model import cache as cache_lib

NEG_INF = -1.0e7
WINDOW = 8  # the first window of position slots; each next one is twice as long


# ----------------------------------------------------------------------------- windows


def window_ends(max_length: int, start: int = 0, window: int | None = WINDOW) -> list[int]:
  """Where the loop's segments end: window, 2 window, 4 window, ... < max_length, then
  max_length; only ends beyond `start` (the first position decoded). No `window`: one
  segment."""
  ends = []
  while window and window < max_length:
    if window > start:
      ends.append(window)
    window *= 2
  return ends + [max_length]


def resize_slots(cache, positions: int):
  """A `DecoderCache`'s slots cut, or zero-padded, to `positions` positions; any other
  cache as it is."""
  if isinstance(cache, cache_lib.DecoderCache):
    return cache.resized(positions)
  return cache


def _for_beams(cache, k: int, max_length: int):
  """`cache` for B rows after the first step -> for K beams a row (a `DecoderCache`: as
  beam slots; any other cache repeated K times)."""
  if isinstance(cache, cache_lib.DecoderCache):
    return cache.for_beams(k, max_length)
  return jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)


def _own_slot(cache, index, own_beam):
  """`cache` for the step at `index`: each row's history names its own beam there."""
  if isinstance(cache, cache_lib.DecoderCache):
    return cache._replace(history=cache.history.at[:, index].set(own_beam))
  return cache


def _reorder(given, returned, source_beam):
  """The cache the step `returned` (from `given`) for beam rows b*K + j that continue
  rows b*K + source_beam[b, j]. Of a `DecoderCache` only the history moves (slots stay,
  the rest is each sentence's); of any other cache every array not returned untouched.
  Each sentence's rows are picked among its own K (a gather along the beam axis), so
  a batch split over devices stays where it is."""
  def take(x):  # [B*K, ...]
    beams = x.reshape(source_beam.shape + x.shape[1:])
    picked = source_beam.reshape(source_beam.shape + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(beams, picked, axis=1, mode='clip').reshape(x.shape)
  if isinstance(returned, cache_lib.DecoderCache):
    return returned._replace(history=take(given.history))
  return jax.tree.map(lambda old, new: new if new is old else take(new), given, returned)


def _segmented_loop(not_done, body, state: dict, ends: list[int], finish):
  """`finish(lax.while_loop(not_done, body, state))`, run as one while_loop per
  window: the segment ending at `ends[i]` hands `body` the slots of `state['cache']`
  cut to ends[i] positions (`resize_slots`). A later segment (and its growing of the
  slots) runs only if the search is not done."""
  def run(state, segment):
    end = ends[segment]
    state = {**state, 'cache': resize_slots(state['cache'], end)}
    state = jax.lax.while_loop(lambda s: (s['index'] < end) & not_done(s), body, state)
    if segment + 1 == len(ends):
      return finish(state)
    return jax.lax.cond(not_done(state), lambda s: run(s, segment + 1), finish, state)
  return run(state, 0)


# ----------------------------------------------------------------------------- greedy, sampling


def greedy(step_fn, cache, batch_size: int, max_length: int, bos_id: int, eos_id: int,
           max_lengths: jax.Array | None = None, *, min_lengths: jax.Array | None = None,
           window: int | None = WINDOW) -> jax.Array:
  """Most likely token at every step -> int32 [B, L] (EOS, then 0s, after the end).

  max_lengths: optional int32 [B]; sequence b is ended (EOS forced) at that length.
  min_lengths: optional int32 [B]; sequence b does not end (EOS is never chosen)
    before that length, EOS included; max_lengths wins where they conflict.
  window: the first window of position slots (module docstring); None: all L slots.
  """
  select = lambda logits, key, eos_banned: selection.argmax(logits, eos_banned)
  return _token_loop(step_fn, cache, select, batch_size, max_length, bos_id, eos_id,
                     max_lengths, jax.random.key(0), min_lengths=min_lengths,
                     window=window)


def sample(step_fn, cache, batch_size: int, max_length: int, bos_id: int, eos_id: int,
           key: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           max_lengths: jax.Array | None = None, start_index: int = 0,
           first_tokens: jax.Array | None = None, *, min_lengths: jax.Array | None = None,
           window: int | None = WINDOW) -> jax.Array:
  """Ancestral sampling from the temperature-scaled distribution, restricted to the
  `top_k` most likely tokens (0 = all) and to the nucleus of mass `top_p` -> [B, L].
  `key`: one key for the batch, or a key per row ([B]: a row's tokens then depend on
  its own key and logits only, not on its batch mates or its place in the batch).

  To continue a prompt whose first `start_index` tokens are already in `cache`, pass
  its last token as `first_tokens` [B]; the result then holds max_length - start_index
  new tokens. min_lengths: as `greedy`'s, lengths counted from position 0 (the prompt
  included), as max_lengths are."""
  def select(logits, step_key, eos_banned):
    if eos_banned is not None:
      logits = selection.ban(logits, eos_banned)
    filtered = filter_logits(logits / max(temperature, 1e-6), top_k, top_p)
    if step_key.ndim:  # a key per row
      return jax.vmap(lambda k, row: jax.random.categorical(k, row))(step_key, filtered)
    return jax.random.categorical(step_key, filtered, axis=-1)
  return _token_loop(step_fn, cache, select, batch_size, max_length, bos_id, eos_id,
                     max_lengths, key, start_index, first_tokens, min_lengths=min_lengths,
                     window=window)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """logits [..., V] with tokens outside the top-k and outside the smallest set of
  mass >= top_p (the nucleus) set to NEG_INF."""
  if top_k:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # The smallest logit still inside the nucleus (the first token always is).
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def _token_loop(step_fn, cache, select, batch_size, max_length, bos_id, eos_id,
                max_lengths, key, start_index: int = 0, first_tokens=None, *, min_lengths,
                window):
  """Feeds each chosen token back in, from position `start_index`; output [B, L - start].
  select(logits, key, eos_banned: (eos_id, rows bool [B]) or None) -> tokens [B]."""
  if max_lengths is None:
    max_lengths = jnp.full((batch_size,), max_length, jnp.int32)
  previous = (jnp.full((batch_size,), bos_id, jnp.int32) if first_tokens is None
              else first_tokens.astype(jnp.int32))
  state = dict(index=jnp.int32(start_index), previous=previous, cache=cache,
               tokens=jnp.zeros((batch_size, max_length - start_index), jnp.int32),
               finished=jnp.zeros((batch_size,), bool))

  def not_done(state):
    return (state['index'] < max_length) & ~state['finished'].all()

  def body(state):
    index = state['index']
    logits, cache = step_fn(state['cache'], state['previous'], index)
    eos_banned = None if min_lengths is None else (eos_id, index + 1 < min_lengths)
    step_key = (jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, index) if key.ndim
                else jax.random.fold_in(key, index))
    chosen = select(logits.astype(jnp.float32), step_key, eos_banned)
    chosen = chosen.astype(jnp.int32)
    chosen = jnp.where(index + 1 >= max_lengths, eos_id, chosen)
    chosen = jnp.where(state['finished'], 0, chosen)
    return dict(index=index + 1, previous=chosen, cache=cache,
                tokens=state['tokens'].at[:, index - start_index].set(chosen),
                finished=state['finished'] | (chosen == eos_id))

  return _segmented_loop(not_done, body, state,
                         window_ends(max_length, start_index, window),
                         lambda state: state['tokens'])


# ----------------------------------------------------------------------------- beam search


def length_penalty(length, alpha: float):
  """GNMT length penalty ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(step_fn, cache, batch_size: int, beam_size: int, max_length: int,
                bos_id: int, eos_id: int, alpha: float = 0.6,
                max_lengths: jax.Array | None = None, *, min_lengths: jax.Array | None = None,
                window: int | None = WINDOW) -> tuple[jax.Array, jax.Array]:
  """Beam search -> (tokens int32 [B, K, L], scores float32 [B, K]), best first.

  A hypothesis that emits EOS is finished: it is kept (scored log p / length_penalty)
  and never extended. The search stops when no live beam can beat the finished ones.
  `cache` is for B rows. Same hypotheses as the plain search in tests/beam_reference.py,
  for less work:

  * the first step runs on the B rows (every beam starts from the same BOS); only then
    is the cache made ready for the K beams;
  * position slots grow in windows and are never reordered: each beam writes its own
    slots and reads its history through an index (`cache.DecoderCache`, beam slots);
    cross arrays are never repeated for the beams (module docstring);
  * the 2K best of a sentence's K x V candidates by one pass over the logits for the
    maxima of small chunks, then the candidates of the 2K best chunks only
    (`selection.top_candidates`; a small V takes `lax.top_k` over all of them): the
    same 2K as a top-k over all K x V log-probabilities;
  * a sentence is settled once no live beam can beat its finished ones even at its
    own `max_lengths` (alpha >= 0), rather than at the global max_length.

  min_lengths: optional int32 [B]; no hypothesis of sequence b ends before that length
    (EOS included): EOS is not a candidate at earlier steps, and the scores stay the
    model's log-probabilities. max_lengths wins where they conflict.
  window: the first window of position slots (module docstring); None: all L slots.
  """
  k = beam_size
  if max_lengths is None:
    max_lengths = jnp.full((batch_size,), max_length, jnp.int32)
  ends = window_ends(max_length, 0, window)
  logits, cache = step_fn(resize_slots(cache, ends[0]),
                          jnp.full((batch_size,), bos_id, jnp.int32), jnp.int32(0))
  start = dict(live_tokens=jnp.zeros((batch_size, 1, max_length), jnp.int32),
               live_logprobs=jnp.zeros((batch_size, 1)),
               finished_tokens=jnp.zeros((batch_size, k, max_length), jnp.int32),
               finished_scores=jnp.full((batch_size, k), NEG_INF))
  state, _ = _extend(start, logits, 0, k, max_lengths, min_lengths, eos_id, alpha)
  state.update(index=jnp.int32(1), cache=_for_beams(cache, k, max_length))
  own_beam = jnp.arange(batch_size * k, dtype=jnp.int32) % k

  def not_done(state):
    best_possible = state['live_logprobs'][:, 0] / length_penalty(max_lengths, alpha)
    improvable = (best_possible > state['finished_scores'].min(axis=1)).any()
    return (state['index'] < max_length) & improvable

  def body(state):
    index = state['index']
    previous = state['live_tokens'][:, :, index - 1]                     # [B, K]
    cache = _own_slot(state['cache'], index, own_beam)
    logits, returned = step_fn(cache, previous.reshape(-1), index)       # [B*K, V]
    new_state, source_beam = _extend(state, logits, index, k, max_lengths, min_lengths,
                                     eos_id, alpha)
    # Row b*K + j continues row b*K + source_beam[b, j].
    new_state.update(index=index + 1, cache=_reorder(cache, returned, source_beam))
    return new_state

  def finish(state):
    # A batch row with no finished hypothesis (cannot happen with a forced EOS) keeps
    # its live beams.
    none_finished = (state['finished_scores'] <= NEG_INF / 2).all(axis=1)
    tokens = jnp.where(none_finished[:, None, None], state['live_tokens'],
                       state['finished_tokens'])
    scores = jnp.where(none_finished[:, None], state['live_logprobs'],
                       state['finished_scores'])
    return tokens, scores

  return _segmented_loop(not_done, body, state, ends, finish)


def _extend(state: dict, logits, index, k: int, max_lengths, min_lengths, eos_id: int,
            alpha: float):
  """One step of beam search from the K' live beams of `state` (K' = 1 at the first
  step) with their next-token logits [B*K', V] -> (the new live and finished
  hypotheses, K of each, and for each new live beam the old one it extends [B, K])."""
  batch, beams = state['live_logprobs'].shape
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  logits = logits.reshape(batch, beams, vocab)                           # [B, K', V]
  # log p of each continuation: the beam's log p plus log_softmax(logits), computed as
  # jax.nn.log_softmax does, (x - max) - log(sum(exp(x - max))).
  largest = logits.max(axis=-1, keepdims=True)                           # [B, K', 1]
  log_normaliser = jnp.log(jnp.sum(jnp.exp(logits - largest), axis=-1, keepdims=True))
  live = state['live_logprobs'][:, :, None]

  def log_prob(x, rows):  # x [B, K' or 2K, M] from the beams `rows` (None: all, in order)
    terms = (live, largest, log_normaliser)
    if rows is not None:
      terms = [jnp.take_along_axis(term, rows[..., None], axis=1) for term in terms]
    return terms[0] + ((x - terms[1]) - terms[2])

  # The best 2K of the K' x V candidates. 2K always leave K that do not end in EOS.
  eos_banned = None if min_lengths is None else (
      eos_id, jnp.broadcast_to((index + 1 < min_lengths)[:, None], (batch, beams)))
  top_logprobs, top_index = selection.top_candidates(logits, 2 * k, eos_banned,
                                                      log_prob)          # [B, 2K]
  beam_of, token_of = top_index // vocab, top_index % vocab
  # At its length limit a hypothesis can only end: EOS is each beam's one candidate.
  must_end = (index + 1 >= max_lengths)[:, None]
  eos_logprobs, eos_beam = jax.lax.top_k(
      log_prob(logits[..., eos_id:eos_id + 1], None)[..., 0], beams)     # [B, K']
  pad = lambda x, value: jnp.pad(x, [(0, 0), (0, 2 * k - beams)], constant_values=value)
  top_logprobs = jnp.where(must_end, pad(eos_logprobs, NEG_INF), top_logprobs)
  beam_of = jnp.where(must_end, pad(eos_beam, 0), beam_of)
  token_of = jnp.where(must_end, eos_id, token_of)
  sequences = jnp.take_along_axis(state['live_tokens'], beam_of[:, :, None], axis=1)
  sequences = sequences.at[:, :, index].set(token_of)                    # [B, 2K, L]
  is_eos = token_of == eos_id

  # Finished: merge new EOS hypotheses with the old finished ones, keep the best K.
  real_eos = is_eos & (top_logprobs > NEG_INF / 2)  # not a dead beam's forced end or padding
  new_scores = jnp.where(real_eos, top_logprobs / length_penalty(index + 1, alpha), NEG_INF)
  all_scores = jnp.concatenate([state['finished_scores'], new_scores], axis=1)
  all_tokens = jnp.concatenate([state['finished_tokens'], sequences], axis=1)
  finished_scores, keep = jax.lax.top_k(all_scores, k)
  finished_tokens = jnp.take_along_axis(all_tokens, keep[:, :, None], axis=1)

  # Live: the best K candidates that did not end. A stable sort (rather than top-k and
  # a gather) hands back the beams they extend as an array of its own: XLA would
  # otherwise recompute that gather inside every cache reorder, for every element.
  candidates = jnp.where(is_eos, NEG_INF, top_logprobs)
  _, order, source_beam = jax.lax.sort(
      (-candidates, jnp.broadcast_to(jnp.arange(2 * k), candidates.shape), beam_of),
      dimension=1, is_stable=True, num_keys=1)
  order, source_beam = order[:, :k], source_beam[:, :k]                 # [B, K]
  live_logprobs = jnp.take_along_axis(candidates, order, axis=1)
  live_tokens = jnp.take_along_axis(sequences, order[:, :, None], axis=1)  # [B, K, L]
  return dict(live_tokens=live_tokens, live_logprobs=live_logprobs,
              finished_tokens=finished_tokens, finished_scores=finished_scores), source_beam
