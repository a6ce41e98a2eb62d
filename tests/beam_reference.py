"""The plain beam search `decode.beam_search` is tested against: the algorithm without
its optimisations, kept out of the package so that only the fast one ships."""

import jax
import jax.numpy as jnp

from jaxnmt.decoding.search import NEG_INF, length_penalty


def beam_search(step_fn, cache, batch_size: int, beam_size: int, max_length: int,
                bos_id: int, eos_id: int, alpha: float = 0.6,
                max_lengths: jax.Array | None = None,
                min_lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The plain beam search `beam_search` is tested against (same contract): every
  step runs all B*K rows over all max_length cache slots, takes the top 2K of the
  K*V candidates and gathers the whole cache.

  A hypothesis that emits EOS is finished: it is kept (scored log p / length_penalty)
  and never extended. The search stops when no live beam can beat the finished ones.
  `cache` is for B rows; it is repeated for the K beams here.
  """
  k = beam_size
  if max_lengths is None:
    max_lengths = jnp.full((batch_size,), max_length, jnp.int32)
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)  # [B*K, ...]
  # Only beam 0 is live at first, so the K beams do not start as K copies.
  live_logprobs = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch_size, 1))
  state = dict(
      index=jnp.int32(0),
      live_tokens=jnp.zeros((batch_size, k, max_length), jnp.int32),  # [B, K, L]
      live_logprobs=live_logprobs,                                     # [B, K]
      finished_tokens=jnp.zeros((batch_size, k, max_length), jnp.int32),
      finished_scores=jnp.full((batch_size, k), NEG_INF),              # [B, K]
      cache=cache)

  def not_done(state):
    index = state['index']
    best_possible = state['live_logprobs'][:, 0] / length_penalty(max_length, alpha)
    worst_finished = state['finished_scores'].min(axis=1)
    improvable = (best_possible > worst_finished).any()
    return (index < max_length) & improvable

  def body(state):
    index = state['index']
    previous = jnp.where(index == 0, bos_id,
                         state['live_tokens'][:, :, jnp.maximum(index - 1, 0)])  # [B, K]
    logits, cache = step_fn(state['cache'], previous.reshape(-1), index)  # [B*K, V]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = log_probs.shape[-1]
    log_probs = log_probs.reshape(batch_size, k, vocab)                  # [B, K, V]
    if min_lengths is not None:  # EOS is no candidate before min_lengths (max_lengths wins)
      banned = ((index + 1 < min_lengths) & (index + 1 < max_lengths))[:, None, None]
      log_probs = jnp.where(banned & (jnp.arange(vocab) == eos_id), NEG_INF, log_probs)
    must_end = (index + 1 >= max_lengths)[:, None, None]
    eos_only = jnp.full((vocab,), NEG_INF).at[eos_id].set(0.0)
    log_probs = jnp.where(must_end, jnp.maximum(log_probs + eos_only, NEG_INF), log_probs)
    candidates = (state['live_logprobs'][:, :, None] + log_probs).reshape(batch_size, -1)
    # 2K candidates always leave K that do not end in EOS.
    top_logprobs, top_index = jax.lax.top_k(candidates, 2 * k)           # [B, 2K]
    beam_of = top_index // vocab
    token_of = (top_index % vocab).astype(jnp.int32)
    sequences = jnp.take_along_axis(state['live_tokens'], beam_of[:, :, None], axis=1)
    sequences = sequences.at[:, :, index].set(token_of)                  # [B, 2K, L]
    is_eos = token_of == eos_id

    # Finished: merge new EOS hypotheses with the old finished ones, keep the best K.
    real_eos = is_eos & (top_logprobs > NEG_INF / 2)  # not a forced end of a dead beam
    new_scores = jnp.where(real_eos, top_logprobs / length_penalty(index + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([state['finished_scores'], new_scores], axis=1)
    all_tokens = jnp.concatenate([state['finished_tokens'], sequences], axis=1)
    finished_scores, keep = jax.lax.top_k(all_scores, k)
    finished_tokens = jnp.take_along_axis(all_tokens, keep[:, :, None], axis=1)

    # Live: the best K candidates that did not end.
    live_candidates = jnp.where(is_eos, NEG_INF, top_logprobs)
    live_logprobs, keep = jax.lax.top_k(live_candidates, k)              # [B, K]
    live_tokens = jnp.take_along_axis(sequences, keep[:, :, None], axis=1)
    source_beam = jnp.take_along_axis(beam_of, keep, axis=1)             # [B, K]
    rows = (jnp.arange(batch_size)[:, None] * k + source_beam).reshape(-1)
    cache = jax.tree.map(lambda x: x[rows], cache)                       # [B*K, ...]
    return dict(index=index + 1, live_tokens=live_tokens, live_logprobs=live_logprobs,
                finished_tokens=finished_tokens, finished_scores=finished_scores,
                cache=cache)

  state = jax.lax.while_loop(not_done, body, state)
  # A batch row with no finished hypothesis (cannot happen with a forced EOS) keeps
  # its live beams.
  none_finished = (state['finished_scores'] <= NEG_INF / 2).all(axis=1)
  tokens = jnp.where(none_finished[:, None, None], state['live_tokens'],
                     state['finished_tokens'])
  scores = jnp.where(none_finished[:, None], state['live_logprobs'], state['finished_scores'])
  return tokens, scores
