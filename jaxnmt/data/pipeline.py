"""From prepared shards to packed training batches, in an order that is global.

The training stream is defined once for the whole job, whatever the number of
processes. Row r of every global batch of B rows reads its own sub-stream of pairs,
whole blocks of BLOCK_PAIRS consecutive records at a time (a random read of one small
record costs about as much as reading a whole block; measured in BUILD_NOTES.md, Data):

  position g = r + B*k (k-th pair of row r)
     └─ block draw q = r + B * (k // BLOCK_PAIRS), offset k % BLOCK_PAIRS
     └─ mixture: q -> (corpus c, its j-th block drawn)   fixed quotas in every span of
        MIX_SPAN draws, shuffled per span from the seed: the weights hold everywhere
     └─ epoch e = j // blocks_c: a new permutation of corpus c's blocks each epoch (a
        keyed Feistel bijection: no index array is ever held, whatever the corpus
        size), and a new order of the pairs inside each block
     └─ record of an ArrayRecord shard (ShardedRecords)

So every global batch draws B blocks spread over the corpus, each process reads only
the blocks of its own rows, and every pair is read once per epoch. Packing: first fit
into the row's source and target slots; a pair that does not fit is carried (at most
MAX_CARRY of them) to the same row of the next batch, where it goes first. Row r's
contents depend only on (next k, carried positions): that pair is the iterator state
of the row. A process produces only its rows [p*B/n, (p+1)*B/n), and the state of all
rows is a global position: the batches are the same on any number of processes, and
a checkpoint saved by one topology resumes on another.

A batch is a dict of int32 numpy arrays:
  inputs, inputs_segment_ids, inputs_positions                          [B, S]
  decoder_inputs, targets, targets_segment_ids, targets_positions       [B, T]
Segment id 0 marks padding; ids 1, 2, ... number the pairs of a row, and positions
restart at 0 for each pair.
"""

import logging
import multiprocessing
import queue as queue_lib
from typing import Sequence

import grain
import numpy as np

from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.data.order import GlobalOrder
from jaxnmt.data.records import BLOCK_PAIRS, decode_record
from jaxnmt.errors import DataError, RuntimeFailure

MAX_CARRY = 16  # pairs a row may defer to its next batch


# ----------------------------------------------------------------------------- packing


class RowPacker:
  """Packs rows `slots` of every global batch of `batch_size` rows (see the module
  docstring); `state()` / `set_state()` are the per-row (next, carried) positions."""

  def __init__(self, sources: Sequence, order: GlobalOrder, dtype: np.dtype, *,
               batch_size: int, slots: Sequence[int], max_source_length: int,
               max_target_length: int, packing: bool = True):
    self.sources, self.order, self.dtype = list(sources), order, np.dtype(dtype)
    self.batch_size, self.slots = batch_size, list(slots)
    self.lengths = (max_source_length, max_target_length)
    self.packing = packing
    self._next = {slot: 0 for slot in self.slots}
    self._carry = {slot: [] for slot in self.slots}
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._lookahead = 8
    self.last_positions: list[list[int]] = []  # per row of the last batch: pairs placed

  def state(self) -> dict:
    return {str(slot): [self._next[slot], list(self._carry[slot])] for slot in self.slots}

  def set_state(self, rows: dict) -> None:
    missing = [slot for slot in self.slots if str(slot) not in rows]
    if missing:
      raise DataError(f'the data position holds no state for rows {missing[:5]} of the '
                      f'batch: was it saved with another data.batch_size?')
    for slot in self.slots:
      next_index, carry = rows[str(slot)]
      self._next[slot], self._carry[slot] = int(next_index), [int(g) for g in carry]
    self._cache.clear()

  def _fetch(self, positions: list[int]) -> None:
    """Reads the records at `positions` into the cache, one read call per corpus."""
    corpus, record = self.order.locate(np.asarray(positions, np.int64))
    source_limit, target_limit = self.lengths[0] - 1, self.lengths[1] - 1
    for c in np.unique(corpus):
      where = np.flatnonzero((corpus == c) & (record >= 0))
      records = self.sources[c].__getitems__([int(r) for r in record[where]])
      for index, raw in zip(where, records):
        source, target = decode_record(raw, self.dtype)
        source, target = source[:source_limit], target[:target_limit]
        self._cache[positions[index]] = (source, target, len(source) + 1, len(target) + 1)
    for index in np.flatnonzero(record < 0):
      self._cache[positions[index]] = None  # past a short last block: no pair

  def _block(self, slot: int, k: int) -> list[int]:
    """The positions of the block holding the k-th pair of row `slot`."""
    first = k - k % BLOCK_PAIRS
    return [slot + self.batch_size * i for i in range(first, first + BLOCK_PAIRS)]

  def _prefetch(self) -> None:
    """Reads, in one call, every block the rows may enter in the next batch (and
    carried pairs no longer cached, after a restore)."""
    wanted = []
    for slot in self.slots:
      wanted += [g for g in self._carry[slot] if g not in self._cache]
      start = self._next[slot]
      for k in (start, start + self._lookahead):
        if slot + self.batch_size * k not in self._cache and \
            (not wanted or wanted[-1] != self._block(slot, k)[-1]):
          wanted += self._block(slot, k)
    if wanted:
      self._fetch(wanted)

  def _lengths(self, position: int) -> tuple[int, int] | None:
    """Source (+ EOS) and target (+ BOS/EOS shift) lengths of a pair, truncated; None
    for a position that holds no pair."""
    if position not in self._cache:  # the row ran past its read-ahead
      self._fetch(self._block(position % self.batch_size, position // self.batch_size))
    entry = self._cache[position]
    return None if entry is None else (entry[2], entry[3])

  def next_batch(self) -> dict[str, np.ndarray]:
    self._prefetch()
    placements = []  # (row, position, source offset, target offset, segment)
    self.last_positions, most = [], 0
    for row, slot in enumerate(self.slots):
      placed, fresh = self._pack_row(slot, row, placements)
      self.last_positions.append(placed)
      most = max(most, fresh)
    # Read ahead what the hungriest row took: few rows then read on demand.
    self._lookahead = max(4, min(BLOCK_PAIRS, most + 2))
    batch = self._assemble(placements)
    for _, position, _, _, _ in placements:
      del self._cache[position]
    return batch

  def _pack_row(self, slot: int, row: int, placements: list) -> tuple[list[int], int]:
    """First-fit of carried, then fresh, pairs into row `row`; returns the positions
    placed and the number of fresh positions taken from the row's sub-stream."""
    source_used, target_used = 0, 0
    pending, self._carry[slot] = list(self._carry[slot]), []
    placed, fresh = [], 0
    while True:
      if pending:
        position = pending.pop(0)
      else:
        position = slot + self.batch_size * self._next[slot]
        self._next[slot] += 1
        fresh += 1
      lengths = self._lengths(position)
      if lengths is None:  # no pair at this position
        del self._cache[position]
        continue
      source_length, target_length = lengths
      if source_used + source_length <= self.lengths[0] and \
          target_used + target_length <= self.lengths[1]:
        placed.append(position)
        placements.append((row, position, source_used, target_used, len(placed)))
        source_used += source_length
        target_used += target_length
      else:
        self._carry[slot].append(position)
      # One pair per row without packing; else stop when no pair can fit (each side
      # holds at least one token + EOS) or the row has deferred enough pairs.
      if (not self.packing and placed) or source_used > self.lengths[0] - 2 or \
          target_used > self.lengths[1] - 2 or len(self._carry[slot]) >= MAX_CARRY:
        self._carry[slot] += pending  # never lose a carried pair
        return placed, fresh

  def _assemble(self, placements: list) -> dict[str, np.ndarray]:
    """The batch arrays from the placements, in a few vectorised writes."""
    rows, (source_length, target_length) = len(self.slots), self.lengths
    eos, bos = np.asarray([tokenizer_lib.EOS_ID]), np.asarray([tokenizer_lib.BOS_ID])
    sources, decoder_inputs, targets = [], [], []
    for _, position, _, _, _ in placements:
      source, target, _, _ = self._cache[position]
      sources += [source, eos]
      decoder_inputs += [bos, target]
      targets += [target, eos]
    meta = np.asarray([(row, s, t, seg) for row, _, s, t, seg in placements],
                      np.int64).reshape(-1, 4)
    batch = {}
    for side, width, pieces, offset_column in (
        ('inputs', source_length, [sources], 1),
        ('targets', target_length, [decoder_inputs, targets], 2)):
      tokens = [np.concatenate(p) if p else np.zeros(0, np.int32) for p in pieces]
      lengths = np.asarray([len(p) for p in pieces[-1][::2]], np.int64) + 1
      starts = meta[:, 0] * width + meta[:, offset_column]
      first = np.cumsum(lengths) - lengths
      within = np.arange(lengths.sum()) - np.repeat(first, lengths)
      where = np.repeat(starts, lengths) + within
      for name, values in ((f'{side}_segment_ids', np.repeat(meta[:, 3], lengths)),
                           (f'{side}_positions', within)):
        batch[name] = np.zeros(rows * width, np.int32)
        batch[name][where] = values
      names = ['inputs'] if side == 'inputs' else ['decoder_inputs', 'targets']
      for name, values in zip(names, tokens):
        batch[name] = np.zeros(rows * width, np.int32)
        batch[name][where] = values
    return {key: value.reshape(rows, -1) for key, value in batch.items()}


# ----------------------------------------------------------------------------- the stream


class TrainStream(grain.IterDataset):
  """Endless packed training batches of this process's rows, as a Grain IterDataset
  whose iterator state is the global data position (see the module docstring).

  `sources` are random-access record sequences, one per corpus (ShardedRecords, or
  InMemorySource for small data); `weights` the mixture (empty: proportional to size).
  `num_workers` > 0 packs in that many worker processes (each owns some rows; the
  sources are pickled to them and reopen their files).
  """

  def __init__(self, sources: Sequence, dtype, *, batch_size: int, max_source_length: int,
               max_target_length: int, seed: int, weights: Sequence[float] = (),
               process_index: int = 0, process_count: int = 1, packing: bool = True,
               num_workers: int = 0):
    super().__init__()
    if batch_size % process_count:
      raise DataError(f'batch_size={batch_size} must divide by the {process_count} '
                      f'processes')
    rows = batch_size // process_count
    sizes = [len(source) for source in sources]
    self.spec = dict(
        sizes=sizes, weights=list(weights) or [float(n) for n in sizes],
        seed=seed, dtype=np.dtype(dtype).str, batch_size=batch_size,
        max_source_length=max_source_length, max_target_length=max_target_length,
        packing=packing, slots=list(range(process_index * rows, (process_index + 1) * rows)))
    self.num_workers = min(num_workers, rows)
    self._sources = list(sources)

  def __iter__(self) -> '_StreamIterator':
    return _StreamIterator(self.spec, self.num_workers, self._sources)


def _make_packer(spec: dict, slots: Sequence[int], sources: Sequence) -> RowPacker:
  order = GlobalOrder(spec['sizes'], spec['weights'], spec['seed'], spec['batch_size'])
  return RowPacker(sources, order, np.dtype(spec['dtype']), batch_size=spec['batch_size'],
                   slots=slots, max_source_length=spec['max_source_length'],
                   max_target_length=spec['max_target_length'], packing=spec['packing'])


def _worker_main(spec: dict, slots: list[int], state: dict, out_queue, stop,
                 sources: Sequence) -> None:
  """A packing worker: batches of rows `slots` from `state` on, until told to stop."""
  packer = _make_packer(spec, slots, sources)
  packer.set_state(state)
  while not stop.is_set():
    item = (packer.next_batch(), packer.state(), packer.last_positions)
    while not stop.is_set():
      try:
        out_queue.put(item, timeout=0.5)
        break
      except queue_lib.Full:
        pass


class _StreamIterator(grain.DatasetIterator):
  """Iterator of TrainStream: packs in this process or in worker processes."""

  WORKER_TIMEOUT_S = 300

  def __init__(self, spec: dict, num_workers: int, sources):
    super().__init__()
    self._spec, self._num_workers, self._sources = spec, num_workers, sources
    self._packer = _make_packer(spec, spec['slots'], sources)
    self._state = self._packer.state()
    self.last_positions: list[list[int]] = []
    self._workers = []

  # A worker owns a contiguous run of this process's rows; batches come back in order.
  def _start_workers(self) -> None:
    context = multiprocessing.get_context('spawn')
    slots = np.array_split(np.asarray(self._spec['slots']), self._num_workers)
    self._stop = context.Event()
    for worker_slots in slots:
      worker_slots = [int(s) for s in worker_slots]
      out_queue = context.Queue(maxsize=4)
      process = context.Process(
          target=_worker_main, daemon=True,
          args=(self._spec, worker_slots, {s: self._state[s] for s in map(str, worker_slots)},
                out_queue, self._stop, self._sources))
      process.start()
      self._workers.append((process, out_queue))

  def _stop_workers(self) -> None:
    if self._workers:
      self._stop.set()
      for process, out_queue in self._workers:
        process.join(timeout=5)
        if process.is_alive():
          process.terminate()
        out_queue.cancel_join_thread()
    self._workers = []

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._num_workers:
      batch = self._packer.next_batch()
      self._state, self.last_positions = self._packer.state(), self._packer.last_positions
      return batch
    if not self._workers:
      self._start_workers()
    parts = [self._receive(process, out_queue) for process, out_queue in self._workers]
    for _, state, _ in parts:
      self._state.update(state)
    self.last_positions = [rows for _, _, positions in parts for rows in positions]
    return {key: np.concatenate([batch[key] for batch, _, _ in parts])
            for key in parts[0][0]}

  def _receive(self, process, out_queue):
    waited = 0.0
    while True:
      try:
        return out_queue.get(timeout=1.0)
      except queue_lib.Empty:
        waited += 1.0
        if not process.is_alive():
          raise RuntimeFailure(f'data worker process {process.pid} died (exit code '
                               f'{process.exitcode})') from None
        if waited > self.WORKER_TIMEOUT_S:
          raise RuntimeFailure(f'data worker process {process.pid} sent nothing for '
                               f'{self.WORKER_TIMEOUT_S} s') from None

  def get_state(self) -> dict:
    return {'batch_size': self._spec['batch_size'], 'rows': dict(self._state)}

  def set_state(self, state: dict) -> None:
    if state.get('batch_size') != self._spec['batch_size']:
      raise DataError(f'the saved data position is for batches of '
                      f'{state.get("batch_size")} rows, this run uses '
                      f'{self._spec["batch_size"]}: resume with the same data.batch_size')
    self._stop_workers()
    self._packer.set_state(state['rows'])
    self._state = self._packer.state()

  def close(self) -> None:
    self._stop_workers()


def merge_states(per_process: Sequence[dict]) -> dict | None:
  """The global data position from every process's iterator state (any process count);
  None (with a warning) for a state this pipeline did not write."""
  if not all(isinstance(state, dict) and 'rows' in state for state in per_process):
    logging.warning('The checkpoint holds a data position of an earlier data pipeline: '
                    'the training data restarts from its seed')
    return None
  rows = {}
  for state in per_process:
    rows.update(state['rows'])
  return {'batch_size': per_process[0]['batch_size'], 'rows': rows}


def real_token_fraction(batch: dict[str, np.ndarray]) -> float:
  """Fraction of source + target slots holding a real (non-pad) token."""
  real = np.count_nonzero(batch['inputs_segment_ids']) + np.count_nonzero(
      batch['targets_segment_ids'])
  return real / (batch['inputs_segment_ids'].size + batch['targets_segment_ids'].size)
