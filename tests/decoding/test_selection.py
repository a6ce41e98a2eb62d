"""The chunked selections beam search and greedy decoding choose tokens with, against
`jnp.argmax` and `jax.lax.top_k`: ties, banned columns, several rows per item."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnmt.decoding import selection


def test_argmax_takes_the_first_of_equal_maxima():
  logits = jnp.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-2.0, -1.0, -7.0, -1.5]])
  np.testing.assert_array_equal(selection.argmax(logits), [1, 0, 1])
  noise = jax.random.normal(jax.random.key(0), (64, 300))
  np.testing.assert_array_equal(selection.argmax(noise), jnp.argmax(noise, -1))


def test_top_k_equals_lax_top_k_with_ties():
  rng = np.random.default_rng(0)
  values = rng.standard_normal((3, 5, 6000)).astype(np.float32)
  values[0, 0, :] = -1.0e7                               # all equal
  values[1, :, ::7] = 3.0                                # ties above the rest
  values[2, 1, 100:4000] = np.round(values[2, 1, 100:4000])  # many ties
  for size in (6000, 16000 // 2, 4096):
    for k in (1, 2, 8):
      expected = jax.lax.top_k(jnp.asarray(values[..., :size]), k)
      found = selection.top_k(jnp.asarray(values[..., :size]), k)
      np.testing.assert_array_equal(found[0], expected[0])
      np.testing.assert_array_equal(found[1], expected[1])


def test_top_candidates_equals_lax_top_k_over_all_rows_keys():
  """Beam search's selection: the best k of B items' R x N keys, a non-decreasing
  function of the values with per-row terms (a log-softmax plus the beam's score)."""
  rng = np.random.default_rng(1)
  values = rng.standard_normal((4, 4, 6000)).astype(np.float32)
  values[1, :, ::7] = 3.0                                # ties across and within rows
  values[2, 2, 100:4000] = np.round(values[2, 2, 100:4000])
  values[:3, :, 5] = 10.0                                # the best, where not banned,
  values[:3, :, 6] = 9.0                                 # and the next in its chunk
  # Item 3: a tie for the second place between an early chunk (flat index 50) and a
  # later one that holds the largest value, so its chunk is picked first.
  values[3] = -5.0 + 0.01 * rng.standard_normal((4, 6000)).astype(np.float32)
  values[3, 0, 50], values[3, 1, 130], values[3, 1, 125] = 7.0, 9.0, 7.0
  offsets = jnp.asarray(rng.standard_normal((4, 4, 1)).astype(np.float32))
  offsets = offsets.at[1].set(0.0).at[3].set(0.0)       # equal keys in different rows

  def key(x, rows):
    terms = offsets if rows is None else jnp.take_along_axis(offsets, rows[..., None], 1)
    return 2.0 * x - terms
  rows = jnp.asarray([[True, False, True, False], [False, True, False, True],
                      [False, False, True, False], [False] * 4])
  for size in (6000, 64):  # the chunked path and lax.top_k's
    for banned in (None, (5, rows)):
      plain = values[..., :size]
      if banned is not None:
        plain = np.where(np.asarray(rows)[..., None] & (np.arange(size) == 5), -np.inf, plain)
      for k in (1, 2, 8):
        expected = jax.lax.top_k(key(jnp.asarray(plain), None).reshape(4, -1), k)
        found = selection.top_candidates(jnp.asarray(values[..., :size]), k, banned, key)
        np.testing.assert_array_equal(found[0], expected[0])
        np.testing.assert_array_equal(found[1], expected[1])
  assert selection.top_candidates(jnp.asarray(values), 2, None, key)[1][3, 1] == 50


@pytest.mark.parametrize('column', [0, 3, 41, 5999])
def test_top_k_with_a_banned_column_equals_lax_top_k_without_it(column):
  rng = np.random.default_rng(column)
  values = rng.standard_normal((4, 3, 6000)).astype(np.float32)
  values[..., column] = 10.0                           # the best, where not banned
  values[1, :, ::7] = 3.0                              # ties
  rows = jnp.asarray(rng.random((4, 3)) < 0.5).at[0, 0].set(True).at[0, 1].set(False)
  plain = np.where(np.asarray(rows)[..., None] & (np.arange(6000) == column), -np.inf,
                   values)
  for size in (6000, 64):  # the chunked path and lax.top_k's
    if column >= size:
      continue
    for k in (1, 8):
      expected = jax.lax.top_k(jnp.asarray(plain[..., :size]), k)
      found = selection.top_k(jnp.asarray(values[..., :size]), k, (column, rows))
      np.testing.assert_array_equal(found[0], expected[0])
      np.testing.assert_array_equal(found[1], expected[1])
  assert selection.argmax(jnp.asarray(values), (column, rows))[0, 0] != column
  assert selection.argmax(jnp.asarray(values), (column, rows))[0, 1] == column
