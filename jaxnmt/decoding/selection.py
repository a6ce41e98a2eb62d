"""Choosing the best entries of logits on XLA:CPU: `argmax` (greedy), `top_k`, and
`top_candidates` (beam search's 2K best of a sentence's K x V continuations), all by
one pass over the values for the maxima of small chunks and then a search of the best
chunks only, with an optional banned column (EOS before a minimum length) that never
rewrites the logits. Same results as `jnp.argmax` / `jax.lax.top_k`, ties included.
"""

import jax
import jax.numpy as jnp


def argmax(logits: jax.Array, banned: tuple[int, jax.Array] | None = None) -> jax.Array:
  """logits [..., V] -> int32 [...]: the index of the largest logit (the first of
  equal ones), as `jnp.argmax`, by `top_k` with k = 1: one pass over the logits for
  the maxima of small chunks, then a search of the best chunk (faster than XLA:CPU's
  fused (value, index) reduction, see BUILD_NOTES.md, 'Decoding'). `banned`: as
  `top_k`'s."""
  return top_k(logits, 1, banned)[1][..., 0]


def ban(values, banned, offsets=None):
  """`values` [..., C] with column `banned[0]` (at `offsets` [..., 1] + 0 ... C - 1,
  if given) set to -inf where bool `banned[1]` [...] is true."""
  column, rows = banned
  columns = jnp.arange(values.shape[-1])
  if offsets is not None:
    columns = offsets + columns
  return jnp.where((columns == column) & rows[..., None], -jnp.inf, values)


def top_k(values: jax.Array, k: int, banned: tuple[int, jax.Array] | None = None
          ) -> tuple[jax.Array, jax.Array]:
  """values [..., N] -> (the k largest [..., k], their int32 indices [..., k]), largest
  first, the lower index first among equal values: the same as `jax.lax.top_k`
  (NaNs aside) for small k, faster on XLA:CPU (see BUILD_NOTES.md, 'Decoding'):
  `top_candidates` with one row per item.

  banned: optional (column, rows bool [...]): `values[..., column]` counts as -inf in
  the rows where `rows` is true (e.g. EOS before a minimum length)."""
  leading, size = values.shape[:-1], values.shape[-1]
  if banned is not None:
    banned = (banned[0], jnp.broadcast_to(banned[1], leading).reshape(-1, 1))
  top, index = top_candidates(values.reshape(-1, 1, size), k, banned)
  return top.reshape(*leading, k), index.reshape(*leading, k)


def top_candidates(values: jax.Array, k: int,
                   banned: tuple[int, jax.Array] | None = None, key=None
                   ) -> tuple[jax.Array, jax.Array]:
  """The k largest keys among each item's R x N candidates: values [B, R, N] ->
  (keys [B, k], their int32 indices into the R * N [B, k]), largest first, the lower
  index first among equal keys: `jax.lax.top_k(key(values, None).reshape(B, R * N), k)`.

  key(x, rows): the keys of values x, elementwise and non-decreasing in x within a row
  (beam search: a hypothesis' log-probability, a log-softmax plus the row's score);
  x is [B, R, M] (rows None) or [B, k, M] taken from the rows `rows` int32 [B, k].
  None: the values themselves.

  Two stages over chunks of C values, C a divisor of N from 16 to 64, 32 and up first
  ([B, R * N / C, C]; 40 for N = 6,000): the k chunks with the
  largest maxima (in index order), then the k largest of their k C values. A value
  among the k largest lies in a chunk whose maximum is at least the k-th largest, and
  at most k chunks are needed (ties included), so the two stages find the same k; a
  non-decreasing key keeps each chunk's largest key at its largest value. One pass
  over `values` and then only the k C candidates; short rows, or N with no divisor
  near 32, use `jax.lax.top_k` on all the keys.

  banned: optional (column, rows bool [B, R]): `values[..., column]` counts as -inf in
  the rows where `rows` is true (e.g. EOS before a minimum length). Only the banned
  column's chunk is rewritten, not the whole of `values` (a pass over the logits that
  XLA:CPU would make up to once per consumer)."""
  key = key or (lambda x, rows: x)
  batch, rows, size = values.shape
  chunk = next((c for c in range(32, 65) if size % c == 0), None) or next(
      (c for c in range(31, 15, -1) if size % c == 0), None)
  if chunk is None or size <= 4 * k * chunk:
    keys = key(values if banned is None else ban(values, banned), None)
    top, index = jax.lax.top_k(keys.reshape(batch, rows * size), k)
    return top, index.astype(jnp.int32)
  per_row = size // chunk
  chunks = values.reshape(batch, rows, per_row, chunk)                  # [B, R, N/C, C]
  maxima = chunks.max(axis=-1)                                           # [B, R, N/C]
  if banned is not None:
    home = banned[0] // chunk  # the banned column's chunk: its maximum without it
    home_chunk = ban(chunks[..., home, :], banned, jnp.array(home * chunk))
    maxima = maxima.at[..., home].set(home_chunk.max(axis=-1))
  maxima = key(maxima, None).reshape(batch, rows * per_row)
  # A -inf column (never chosen before a real chunk): without it XLA merges the first
  # round's max over the maxima into a second full pass over `values`.
  maxima = jnp.concatenate([maxima, jnp.full((batch, 1), -jnp.inf, maxima.dtype)], axis=1)
  best = jnp.sort(_select(maxima, k)[1], axis=-1)                        # [B, k]
  row_of = best // per_row
  gathered = jnp.take_along_axis(chunks.reshape(batch, rows * per_row, chunk),
                                 best[..., None], axis=1)                # [B, k, C]
  if banned is not None:
    gathered = ban(gathered, (banned[0], jnp.take_along_axis(banned[1], row_of, axis=1)),
                    (best % per_row)[..., None] * chunk)
  top, index = _select(key(gathered, row_of).reshape(batch, k * chunk), k)
  chunk_of = jnp.take_along_axis(best, index // chunk, axis=-1)
  return top, (chunk_of * chunk + index % chunk).astype(jnp.int32)


def _select(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` over a few hundred values: for k <= 2 as rounds of argmax
  (`_small_top_k`), otherwise XLA's own (faster there, see BUILD_NOTES.md, 'Decoding')."""
  return _small_top_k(values, k) if k <= 2 else jax.lax.top_k(values, k)


def _small_top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` over a short last axis as k rounds of `argmax` and masking out
  the value found: cheaper on XLA:CPU than its top-k for a few hundred values at
  k <= 2 (`_select`)."""
  size = values.shape[-1]
  positions = jnp.arange(size, dtype=jnp.int32)
  tops, indices = [], []
  for _ in range(k):
    best = values.max(axis=-1, keepdims=True)
    index = jnp.where(values == best, positions, size).min(axis=-1)
    index = jnp.minimum(index, size - 1)  # NaN rows
    tops.append(best[..., 0])
    indices.append(index)
    values = jnp.where(positions == index[..., None], -jnp.inf, values)
  return jnp.stack(tops, axis=-1), jnp.stack(indices, axis=-1)
