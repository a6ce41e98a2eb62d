"""TensorBoard output (process 0 only) and host-side metric arithmetic."""

import json
import time

import jax
import numpy as np
import tensorboardX

from jaxnmt.runtime import files


class Writer:
  """Scalars and texts under WORKDIR/<name>: TensorBoard events, plus every scalar as a
  line of `metrics.jsonl` for tools without TensorBoard. A no-op on processes > 0.

  `purge_step`: a run resumed from checkpoint step S passes S + 1. The killed run may
  have logged steps after S, which this run logs again: their lines leave
  metrics.jsonl (rewritten whole, then swapped in), and TensorBoard hides their events
  (tensorboardX writes a restart marker at `purge_step`), so no step appears twice.

  On a gs:// workdir tensorboardX writes through google-cloud-storage itself (it holds
  the event file in memory and uploads it whole on each flush), and metrics.jsonl is
  uploaded whole on each `scalars` call: fine for the few lines a run logs."""

  def __init__(self, workdir: str, name: str, purge_step: int | None = None):
    self._writer = self._jsonl = None
    if jax.process_index() == 0:
      directory = files.join(workdir, name)
      files.makedirs(directory)
      target = files.join(directory, files.METRICS)
      if purge_step is not None:
        _trim_jsonl(target, purge_step)
      # The event file's name holds the second it was opened, and tensorboardX opens
      # it with 'wb': a unique, time-ordered suffix keeps a writer opened in the same
      # second (a quick restart) from overwriting the last one's events, and keeps
      # TensorBoard reading the files in the order they were written.
      self._writer = tensorboardX.SummaryWriter(
          directory, purge_step=purge_step, filename_suffix=f'.{time.time_ns()}')
      self._jsonl = files.AppendFile(target)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    values = {key: float(value) for key, value in values.items()}
    for key, value in values.items():
      self._writer.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({'step': step, 'time': time.time(), **values}) + '\n')
    self._jsonl.flush()

  def text(self, step: int, tag: str, value: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, value, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      record_writers = _gcs_record_writers(self._writer)
      self._writer.close()
      for record_writer in record_writers:
        # tensorboardX's gs:// writer uploads its whole buffer once more when garbage
        # collected, long after close (retrying for minutes if the store is gone):
        # everything is uploaded by now.
        record_writer.flush = lambda: None
      self._jsonl.close()


def _gcs_record_writers(writer) -> list:
  """The gs:// record writers under a tensorboardX SummaryWriter (none for local logs)."""
  found = []
  for file_writer in (getattr(writer, 'all_writers', None) or {}).values():
    events = getattr(getattr(file_writer, 'event_writer', None), '_ev_writer', None)
    record = getattr(getattr(events, '_py_recordio_writer', None), '_writer', None)
    if type(record).__name__ == 'GCSRecordWriter':
      found.append(record)
  return found


def read_jsonl(path: str) -> list[dict]:
  """The records a Writer appended to `path` (a missing file reads as none; a line cut
  short by a crash is skipped)."""
  try:
    text = files.read_text(path)
  except FileNotFoundError:
    return []
  records = []
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      pass
  return records


def _trim_jsonl(path: str, purge_step: int) -> None:
  """Drops the records of steps >= `purge_step` (and a line cut short) from `path`."""
  try:
    lines = files.read_text(path).splitlines(keepends=True)
  except FileNotFoundError:
    return
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    step = record.get('step') if isinstance(record, dict) else None
    if line.endswith('\n') and isinstance(step, int) and step < purge_step:
      kept.append(line)
  if len(kept) != len(lines):
    files.write_text(path, ''.join(kept))


def summarize(step_metrics: list[dict]) -> dict[str, float]:
  """Sums per-step metric dicts (fetched to host) and turns sums into means."""
  total = {key: float(np.sum([m[key] for m in step_metrics])) for key in step_metrics[0]}
  tokens = max(total.get('tokens', 0.0), 1.0)
  summary = {'loss': total['loss'] / tokens, 'nll': total['nll'] / tokens,
             'accuracy': total['correct'] / tokens}
  if 'grad_norm' in total:
    summary['grad_norm'] = total['grad_norm'] / len(step_metrics)
  return summary
