"""The plain beam search `search.beam_search` is tested against: the algorithm as a
Python loop over steps and sentences, with lists of hypotheses, kept out of the package
so that only the fast one ships."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxnmt.decoding.search import NEG_INF, length_penalty


def beam_search(step_fn, cache, batch_size: int, beam_size: int, max_length: int,
                bos_id: int, eos_id: int, alpha: float = 0.6,
                max_lengths: jax.Array | None = None,
                min_lengths: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Same contract as `search.beam_search`. Every step runs all B*K rows over all
  max_length cache slots (the cache repeated for the K beams, every array of it
  gathered when the beams change); each sentence keeps lists of its live and finished
  hypotheses and runs until its cap, with no early stop.

  At a step, a sentence's candidates are every (live hypothesis, token) pair scored
  log p(hypothesis) + log p(token), best first (the lower beam, then the lower token,
  first among equal scores); of the best 2K, those ending in EOS are finished (scored
  log p / length_penalty) and the first K others live on. At its length cap a
  hypothesis can only end; before its floor (`min_lengths`) it cannot.
  """
  k = beam_size
  caps = np.full(batch_size, max_length) if max_lengths is None else np.asarray(max_lengths)
  floors = np.zeros(batch_size) if min_lengths is None else np.asarray(min_lengths)
  step_fn = jax.jit(step_fn)
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)   # row b*K + j: beam j
  live = [[(np.float32(0.0), [])] for _ in range(batch_size)]  # (log p, tokens) each
  finished = [[] for _ in range(batch_size)]                     # (score, tokens) each
  for index in range(max_length):
    if not any(live):
      break
    previous = np.full((batch_size, k), bos_id, np.int32)
    for b, beams in enumerate(live):
      for j, (_, tokens) in enumerate(beams if index else []):
        previous[b, j] = tokens[-1]
    logits, cache = step_fn(cache, jnp.asarray(previous.reshape(-1)), index)
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    vocab = log_probs.shape[-1]
    rows = np.arange(batch_size * k).reshape(batch_size, k)  # the row each new row continues
    for b, beams in enumerate(live):
      if not beams:
        continue
      scores = np.stack([log_p + log_probs[b * k + j] for j, (log_p, _) in enumerate(beams)])
      if index + 1 >= caps[b]:  # at its cap a hypothesis can only end
        scores[:, np.arange(vocab) != eos_id] = -np.inf
      elif index + 1 < floors[b]:  # before its floor it cannot
        scores[:, eos_id] = -np.inf
      best = np.argsort(-scores, axis=None, kind='stable')[:2 * k]  # ties: (beam, token) order
      kept = [(scores.flat[i], i // vocab, beams[i // vocab][1] + [i % vocab])
              for i in best if scores.flat[i] > -np.inf]
      finished[b] += [(log_p / length_penalty(index + 1, alpha), tokens)
                      for log_p, _, tokens in kept if tokens[-1] == eos_id]
      finished[b] = sorted(finished[b], key=lambda hypothesis: -hypothesis[0])[:k]
      continuing = [candidate for candidate in kept if candidate[2][-1] != eos_id][:k]
      live[b] = [(log_p, tokens) for log_p, _, tokens in continuing]
      rows[b, :len(continuing)] = [b * k + j for _, j, _ in continuing]
    cache = jax.tree.map(lambda x, rows=rows.reshape(-1): x[rows], cache)

  tokens = np.zeros((batch_size, k, max_length), np.int32)
  scores = np.full((batch_size, k), NEG_INF, np.float32)
  for b in range(batch_size):
    # A sentence with no finished hypothesis (cannot happen with a cap) keeps its live ones.
    for j, (score, sequence) in enumerate(finished[b] or live[b]):
      tokens[b, j, :len(sequence)] = sequence
      scores[b, j] = score
  return tokens, scores
