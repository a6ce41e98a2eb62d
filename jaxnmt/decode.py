"""Decoding over a cached step function, independent of the model class.

`step_fn(cache, tokens [B], index) -> (logits [B, V], cache)` is any cached decoder;
the loop runs under `lax.while_loop` with static shapes and stops as soon as every
sequence has produced EOS.
"""

import jax
import jax.numpy as jnp


def greedy(step_fn, cache, batch_size: int, max_length: int, bos_id: int, eos_id: int,
           max_lengths: jax.Array | None = None) -> jax.Array:
  """Greedy decoding -> int32 [B, max_length] tokens (EOS then padding 0 after the end).

  max_lengths: optional int32 [B]; sequence b is ended (EOS forced) at that length.
  """
  if max_lengths is None:
    max_lengths = jnp.full((batch_size,), max_length, jnp.int32)
  tokens = jnp.zeros((batch_size, max_length), jnp.int32)
  finished = jnp.zeros((batch_size,), bool)
  previous = jnp.full((batch_size,), bos_id, jnp.int32)

  def not_done(carry):
    index, _, finished, _, _ = carry
    return (index < max_length) & ~finished.all()

  def body(carry):
    index, tokens, finished, previous, cache = carry
    logits, cache = step_fn(cache, previous, index)
    chosen = logits.argmax(-1).astype(jnp.int32)
    chosen = jnp.where(index + 1 >= max_lengths, eos_id, chosen)
    chosen = jnp.where(finished, 0, chosen)
    tokens = tokens.at[:, index].set(chosen)
    finished = finished | (chosen == eos_id)
    return index + 1, tokens, finished, chosen, cache

  _, tokens, _, _, _ = jax.lax.while_loop(
      not_done, body, (jnp.int32(0), tokens, finished, previous, cache))
  return tokens
