"""data/order: the global order of training pairs, a keyed bijection over each
corpus that holds the mixture's weights and covers every corpus once an epoch."""

import numpy as np

from jaxnmt.data import order as order_lib
from jaxnmt.data import records as records_lib


def test_permute_is_a_bijection_that_changes_with_the_key():
  for size in (1, 2, 3, 7, 100, 1000, 4097):
    for key in (0, 12345):
      out = order_lib.permute(np.arange(size), size, np.full(size, key, np.uint64))
      assert sorted(out.tolist()) == list(range(size))
  a = order_lib.permute(np.arange(1000), 1000, np.full(1000, 1, np.uint64))
  b = order_lib.permute(np.arange(1000), 1000, np.full(1000, 2, np.uint64))
  assert (a != b).mean() > 0.9


def test_global_order_holds_the_mixture_and_every_epoch_covers_each_corpus():
  block = records_lib.BLOCK_PAIRS
  # Two corpora: 1,000 pairs (16 blocks, the last one short) and 100 pairs (2 blocks).
  order = order_lib.GlobalOrder([1000, 100], [0.9, 0.1], seed=3, batch_size=4)
  positions = np.arange(4 * block * 1024)
  corpus_of, record = order.locate(positions)
  shares = np.bincount(corpus_of) / len(corpus_of)
  np.testing.assert_allclose(shares, [0.9, 0.1], atol=0.01)
  # Row r reads block draws r, r + 4, ...: group positions by draw and check that each
  # run of a corpus's draws covers that corpus once (a new order every epoch).
  row, k = positions % 4, positions // 4
  draw = row + 4 * (k // block)
  for c, size in ((0, 1000), (1, 100)):
    draws = np.unique(draw[corpus_of == c])
    epochs = []
    for first in range(0, len(draws) - len(draws) % (16 if c == 0 else 2),
                       16 if c == 0 else 2):
      chosen = np.isin(draw, draws[first:first + (16 if c == 0 else 2)])
      records = record[chosen & (record >= 0)]
      assert sorted(records.tolist()) == list(range(size)), (c, first)
      epochs.append(tuple(records))
    assert len(set(epochs)) == len(epochs) > 3
  # Consecutive pairs of a row come from one block of consecutive records.
  row_zero = record[(row == 0) & (record >= 0)][:block]
  assert row_zero.max() - row_zero.min() < block
  # Deterministic: the same positions give the same records.
  again = order_lib.GlobalOrder([1000, 100], [0.9, 0.1], seed=3, batch_size=4).locate(
      np.arange(100, 200))
  np.testing.assert_array_equal(again[1], record[100:200])
