"""Host batches -> global device arrays, ahead of the step that uses them."""

import queue
import threading

import jax
import numpy as np

from jaxnmt.runtime import sharding


class DeviceFeeder:
  """Iterates global device batches of a host batch iterator, `depth` batches ahead:
  a background thread pulls the next host batches and starts their transfer to the
  devices while the current step computes (depth 0: in the caller, just in time).
  Yields (batch, slots): slots = token positions in the global batch. `iterator_state`
  is the host iterator's state after the last batch *yielded*, so a checkpoint resumes
  at the right batch however far ahead the thread has read; `last_positions` are the
  global positions of the pairs in this process's rows of that batch (None for
  iterators that do not report them)."""

  def __init__(self, iterator, batch_sharding, depth: int):
    self._iterator, self._sharding, self._depth = iterator, batch_sharding, depth
    self._state = iterator.get_state() if depth else None
    self.last_positions = None
    if depth:
      self._queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._fill, name='device-feeder', daemon=True)
      self._thread.start()

  def _load(self):
    host = next(self._iterator)
    positions = getattr(self._iterator, 'last_positions', None)
    slots = sum(host[key].size for key in ('inputs', 'targets') if key in host)
    return sharding.to_global(host, self._sharding), slots * jax.process_count(), positions

  def _fill(self) -> None:
    while not self._stop.is_set():
      try:
        item = (*self._load(), self._iterator.get_state())
      except BaseException as error:  # pylint: disable=broad-except  # re-raised in next()
        item = error
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if isinstance(item, BaseException):
        return

  def __iter__(self):
    return self

  def __next__(self):
    if not self._depth:
      batch, slots, self.last_positions = self._load()
      return batch, slots
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batch, slots, self.last_positions, self._state = item
    return batch, slots

  def iterator_state(self):
    return self._state if self._depth else self._iterator.get_state()

  def close(self) -> None:
    if self._depth:
      self._stop.set()
      self._thread.join(timeout=10)


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's slice of a batch that every process built whole."""
  rows = next(iter(batch.values())).shape[0]
  per_process = rows // jax.process_count()
  begin = jax.process_index() * per_process
  return {key: value[begin:begin + per_process] for key, value in batch.items()}


def global_eval_batches(batches, batch_sharding) -> list[dict]:
  """Whole evaluation batches (identical on every process) as global device arrays."""
  return [sharding.to_global(process_rows(batch), batch_sharding) for batch in batches]
