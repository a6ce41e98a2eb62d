"""The global order of the training stream: stream position -> (corpus, record), for
any corpus size and mixture, without holding an index array (see pipeline.py)."""

from typing import Sequence

import numpy as np

from jaxnmt.data.records import BLOCK_PAIRS
from jaxnmt.errors import DataError

MIX_SPAN = 4096  # mixture quotas hold exactly in every span of this many block draws


def _mix64(values: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a well-spread 64-bit hash, elementwise on uint64."""
  z = values.astype(np.uint64)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, size: int, keys: np.ndarray) -> np.ndarray:
  """A keyed bijection of [0, size), elementwise: 4 rounds of an unbalanced Feistel
  network on the smallest power-of-two domain >= size (each round xors one half with a
  hash of the other, so each is invertible), cycle-walked back into range."""
  bits = max(2, max(size - 1, 1).bit_length())
  left_bits = bits // 2
  right_bits = bits - left_bits
  left_mask, right_mask = np.uint64((1 << left_bits) - 1), np.uint64((1 << right_bits) - 1)
  shift = np.uint64(right_bits)
  keys = keys.astype(np.uint64)
  out = index.astype(np.uint64)
  pending = np.ones(len(out), bool)
  while pending.any():
    value, key = out[pending], keys[pending]
    left, right = value >> shift, value & right_mask
    for round_index in range(4):
      salt = np.uint64((round_index + 1) * 0x9E3779B97F4A7C15 & 2**64 - 1)
      if round_index % 2 == 0:
        left = left ^ (_mix64(right ^ key ^ salt) & left_mask)
      else:
        right = right ^ (_mix64(left ^ key ^ salt) & right_mask)
    out[pending] = (left << shift) | right
    pending = out >= np.uint64(size)
  return out.astype(np.int64)


class GlobalOrder:
  """Global stream position -> (corpus, record index) for corpora of `sizes` pairs
  drawn with `weights`, for batches of `batch_size` rows; deterministic in `seed`,
  endless (epochs reshuffle). A record of -1 marks a position past the end of a
  corpus's short last block: it holds no pair."""

  def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int,
               batch_size: int):
    if not sizes or min(sizes) < 1:
      raise DataError(f'every corpus needs at least one training pair, got {list(sizes)}')
    self.sizes = np.asarray(sizes, np.int64)
    self.blocks = -(-self.sizes // BLOCK_PAIRS)
    self.seed, self.batch_size = int(seed), int(batch_size)
    weights = np.asarray(weights, np.float64) / np.sum(weights)
    exact = weights * MIX_SPAN
    quotas = np.floor(exact).astype(np.int64)
    for index in np.argsort(-(exact - quotas), kind='stable')[:MIX_SPAN - quotas.sum()]:
      quotas[index] += 1  # largest remainder: the quotas sum to MIX_SPAN
    self.quotas = quotas
    self._spans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _span(self, span: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus of each draw in the span, its rank among that corpus's draws)."""
    cached = self._spans.get(span)
    if cached is None:
      labels = np.repeat(np.arange(len(self.quotas)), self.quotas)
      labels = np.random.default_rng([self.seed, span, 1]).permutation(labels)
      order = np.argsort(labels, kind='stable')
      starts = np.concatenate([[0], np.cumsum(self.quotas)[:-1]])
      rank = np.empty(MIX_SPAN, np.int64)
      rank[order] = np.arange(MIX_SPAN) - starts[labels[order]]
      cached = (labels, rank)
      if len(self._spans) > 64:
        self._spans.clear()
      self._spans[span] = cached
    return cached

  def _draws(self, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block draw q -> (corpus, how many blocks of that corpus were drawn before)."""
    if len(self.sizes) == 1:
      return np.zeros(len(draws), np.int64), draws
    spans, offsets = np.divmod(draws, MIX_SPAN)
    corpus, count = np.empty_like(draws), np.empty_like(draws)
    for span in np.unique(spans):
      where = spans == span
      labels, rank = self._span(int(span))
      corpus[where] = labels[offsets[where]]
      count[where] = span * self.quotas[corpus[where]] + rank[offsets[where]]
    return corpus, count

  def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positions = np.asarray(positions, np.int64)
    row, k = np.divmod(positions, self.batch_size)[::-1]
    draw = row + self.batch_size * (k // BLOCK_PAIRS)
    corpus, count = self._draws(draw)
    epoch, index = np.divmod(count, self.blocks[corpus])
    keys = _mix64(np.uint64(self.seed) * np.uint64(1_000_003) +
                  corpus.astype(np.uint64) * np.uint64(7919) + epoch.astype(np.uint64))
    block = np.empty_like(index)
    for c in np.unique(corpus):
      where = corpus == c
      block[where] = permute(index[where], int(self.blocks[c]), keys[where])
    inside = permute(k % BLOCK_PAIRS, BLOCK_PAIRS, _mix64(keys ^ block.astype(np.uint64)))
    record = block * BLOCK_PAIRS + inside
    record[record >= self.sizes[corpus]] = -1
    return corpus, record


