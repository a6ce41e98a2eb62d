"""Prepared pairs on disk: the record format of a pair of token-id sequences, and the
random-access sources the training stream reads them from (`__len__` and Grain's
batched `__getitems__`)."""

from typing import Sequence

import numpy as np

BLOCK_PAIRS = 64  # consecutive records the stream reads at once: one ArrayRecord chunk

def record_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_record(source_ids: Sequence[int], target_ids: Sequence[int],
                  dtype: np.dtype) -> bytes:
  """One pair as stored in a shard: [len(source), *source, *target] (no BOS/EOS)."""
  return np.asarray([len(source_ids), *source_ids, *target_ids], dtype).tobytes()


def decode_record(record: bytes, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
  ids = np.frombuffer(record, dtype)
  split = 1 + int(ids[0])
  return ids[1:split], ids[split:]


class InMemorySource:
  """A random-access list of records with Grain's batched read (tests, small data)."""

  def __init__(self, records: Sequence[bytes]):
    self._records = list(records)

  def __len__(self) -> int:
    return len(self._records)

  def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
    return [self._records[i] for i in indices]


class ShardedRecords:
  """One corpus's ArrayRecord shards as a single random-access sequence of records
  (the `__len__` / `__getitems__` protocol of Grain's sources).

  Shards are written with one chunk per BLOCK_PAIRS records, the unit rows read, so a
  block is one chunk to decode: much faster to read, and smaller on disk, than Grain's
  ArrayRecordDataSource layout of one record per chunk (BUILD_NOTES.md, Data); that
  source also logs an error for any other layout and starts a thread per shard per
  read. Readers open lazily, single-threaded, and are not pickled (worker processes
  open their own). Record counts come from the manifest: opening touches no file."""

  def __init__(self, paths: Sequence[str], counts: Sequence[int]):
    self._paths = list(paths)
    self._ends = np.cumsum(np.asarray(counts, np.int64))
    self._starts = self._ends - np.asarray(counts, np.int64)
    self._readers = {}

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _reader(self, shard: int):
    if shard not in self._readers:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      self._readers[shard] = array_record_module.ArrayRecordReader(
          self._paths[shard], 'readahead_buffer_size:0,max_parallelism:0',
          file_reader_buffer_size=1 << 16)
    return self._readers[shard]

  def __getitems__(self, indices: Sequence[int]) -> list[bytes]:
    indices = np.asarray(indices, np.int64)
    shards = np.searchsorted(self._ends, indices, side='right')
    records = [b''] * len(indices)
    for shard in np.unique(shards):
      where = np.flatnonzero(shards == shard)
      read = self._reader(int(shard)).read(
          [int(i) for i in indices[where] - self._starts[shard]])
      for index, record in zip(where, read):
        records[index] = record
    return records

  def __getstate__(self):
    return {'paths': self._paths, 'counts': (self._ends - self._starts).tolist()}

  def __setstate__(self, state):
    self.__init__(state['paths'], state['counts'])


