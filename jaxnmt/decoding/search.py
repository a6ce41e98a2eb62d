"""Decoding strategies over a cached step function, independent of the model class.

`step_fn(cache, tokens [B], index) -> (logits [B, V], cache)` is any cached decoder
(every cache array has the batch as its leading axis). All strategies run under
`lax.while_loop` with static shapes and stop as soon as every sequence has ended.
Shapes: B batch, K beams, L max output length, V vocabulary, W window.

Four conventions make the search cheap without knowing the model:

* Position slots. A cache array stored under a dict key in `SLOT_NAMES` ('keys',
  'values': a self-attention KV cache) holds one slot per output position on its
  axis 2, [rows, heads, L, ...], slot i written at step i. The loop runs in segments over
  growing windows (8, 16, 32, ... positions; `window`): while decoding positions
  < W the step function is handed those arrays cut to their first W slots, so early
  steps attend over W slots instead of L. The step function must take its length
  from the cache it is given (the models' do).
* Untouched arrays. An array the step function returns unchanged (the very traced
  value it was given, e.g. the encoder's cross-attention keys) is the same for every
  beam of a sentence, so beam search never reorders it.
* Shared arrays. An array under a dict key in `SHARED_NAMES` ('cross_keys',
  'cross_values': a cross-attention KV cache) is never repeated for the beams: beam search
  hands the step function such arrays with B rows next to tokens and other arrays
  with B*K rows, and the step function reads row b for rows b*K ... b*K + K - 1 (the
  models' do: `Attention.attend_one`). Such an array must be returned untouched.
* Beam slots. Beam search never reorders position-slot arrays. After its first step
  each holds K slots per position, L * K on the axis `BEAM_SLOT_AXES` names ('values'
  [B, heads, L * K, head_dim]; 'keys' [B, heads, head_dim, L * K], positions last: the
  scores of a sentence's K queries are then a plain matmul): slot t * K + j is beam j's
  position t, and every dict that holds slot arrays also gets `HISTORY_NAME`, int32
  [B*K, L]: for token row b*K + j, which beam's slot holds each of its positions (its
  own, j, at the position being decoded). The step function writes row b*K + j's
  slot index * K + j of sentence b and attends, for that row, to the slots its
  history names (the models' do: `model.Block`). A changed beam costs a gather of the
  [B*K, L] history, not of the cache.
"""

import jax
import jax.numpy as jnp

from jaxnmt.decoding import selection

NEG_INF = -1.0e7
SLOT_NAMES = ('keys', 'values')
SLOT_AXIS = 2
BEAM_SLOT_AXES = {'keys': 3, 'values': 2}  # beam search's slot arrays (to_beam_slots)
SHARED_NAMES = ('cross_keys', 'cross_values')
HISTORY_NAME = 'slot_beams'
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


def _is_slot(path, names=SLOT_NAMES) -> bool:
  key = path[-1]
  return isinstance(key, jax.tree_util.DictKey) and key.key in names


def to_beam_slots(cache, k: int):
  """`cache` for B rows after the first step -> for K beams per row: slot arrays
  [B, heads, W, H] -> W * K slots on their `BEAM_SLOT_AXES` axis, with the B rows'
  slots as beam 0's (every beam's history starts there); shared arrays kept; the rest
  repeated K times."""
  def convert(path, x):
    if _is_slot(path):
      axis = BEAM_SLOT_AXES[path[-1].key]
      x = jnp.expand_dims(jnp.moveaxis(x, SLOT_AXIS, axis), axis + 1)     # [..., W, 1, ...]
      padding = [(0, 0)] * x.ndim
      padding[axis + 1] = (0, k - 1)
      x = jnp.pad(x, padding)
      return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
    return x if _is_slot(path, SHARED_NAMES) else jnp.repeat(x, k, axis=0)
  return jax.tree_util.tree_map_with_path(convert, cache)


def with_history(cache, history):
  """`cache` with `history` under `HISTORY_NAME` in every dict that holds slot arrays
  (None: the key removed)."""
  if isinstance(cache, dict):
    cache = {key: with_history(value, history) for key, value in cache.items()
             if key != HISTORY_NAME}
    if history is not None and any(name in cache for name in SLOT_NAMES):
      cache[HISTORY_NAME] = history
    return cache
  if isinstance(cache, (list, tuple)):
    return type(cache)(with_history(value, history) for value in cache)
  return cache


def resize_slots(cache, length: int, slot_axes: dict | None = None):
  """`cache` with every position-slot array cut, or zero-padded, to `length` slots on
  the axis `slot_axes` names for it (None: SLOT_AXIS for all)."""
  def resize(path, array):
    if not _is_slot(path):
      return array
    axis = SLOT_AXIS if slot_axes is None else slot_axes[path[-1].key]
    if array.shape[axis] == length:
      return array
    if array.shape[axis] > length:
      return jax.lax.slice_in_dim(array, 0, length, axis=axis)
    padding = [(0, 0)] * array.ndim
    padding[axis] = (0, length - array.shape[axis])
    return jnp.pad(array, padding)
  return jax.tree_util.tree_map_with_path(resize, cache)


def _segmented_loop(not_done, body, state: dict, ends: list[int], finish,
                    slots_per_position: int = 1, slot_axes: dict | None = None):
  """`finish(lax.while_loop(not_done, body, state))`, run as one while_loop per
  window: the segment ending at `ends[i]` hands `body` the position slots of
  `state['cache']` (on `slot_axes`, as resize_slots) cut to ends[i] positions (of
  `slots_per_position` slots each). A later segment (and its growing of the slots)
  runs only if the search is not done."""
  def run(state, segment):
    end = ends[segment]
    state = {**state, 'cache': resize_slots(state['cache'], end * slots_per_position,
                                            slot_axes)}
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

  To continue a prompt whose first `start_index` tokens are already in `cache`, pass
  its last token as `first_tokens` [B]; the result then holds max_length - start_index
  new tokens. min_lengths: as `greedy`'s, lengths counted from position 0 (the prompt
  included), as max_lengths are."""
  def select(logits, step_key, eos_banned):
    if eos_banned is not None:
      logits = selection.ban(logits, eos_banned)
    filtered = filter_logits(logits / max(temperature, 1e-6), top_k, top_p)
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
    chosen = select(logits.astype(jnp.float32), jax.random.fold_in(key, index), eos_banned)
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
    slots and reads its history through an index (module docstring, "Beam slots");
    untouched arrays are never reordered, shared arrays never repeated for the beams;
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
  # Slot arrays W * K slots (BEAM_SLOT_AXES); shared arrays [B, ...]; others [B*K, ...].
  state.update(index=jnp.int32(1), cache=to_beam_slots(cache, k),
               history=jnp.zeros((batch_size * k, max_length), jnp.int32))
  own_beam = jnp.arange(batch_size * k, dtype=jnp.int32) % k

  def not_done(state):
    best_possible = state['live_logprobs'][:, 0] / length_penalty(max_lengths, alpha)
    improvable = (best_possible > state['finished_scores'].min(axis=1)).any()
    return (state['index'] < max_length) & improvable

  def body(state):
    index = state['index']
    previous = state['live_tokens'][:, :, index - 1]                     # [B, K]
    history = state['history'].at[:, index].set(own_beam)  # each row writes its own slot
    logits, cache = step_fn(with_history(state['cache'], history), previous.reshape(-1),
                            index)                                       # [B*K, V]
    cache = with_history(cache, None)
    new_state, source_beam = _extend(state, logits, index, k, max_lengths, min_lengths,
                                     eos_id, alpha)
    # Row b*K + j continues row b*K + source_beam[b, j]; rows are in range by construction.
    rows = (jnp.arange(batch_size)[:, None] * k + source_beam).reshape(-1)
    reorder = lambda path, old, new: (new if new is old or _is_slot(path) else
                                      jnp.take(new, rows, axis=0, mode='clip'))
    new_state.update(index=index + 1,
                     cache=jax.tree_util.tree_map_with_path(reorder, state['cache'], cache),
                     history=jnp.take(history, rows, axis=0, mode='clip'))
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

  return _segmented_loop(not_done, body, state, ends, finish, slots_per_position=k,
                         slot_axes=BEAM_SLOT_AXES)


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
