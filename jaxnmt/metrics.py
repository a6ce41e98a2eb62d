"""TensorBoard output (process 0 only) and host-side metric arithmetic."""

import json
import os
import time

import jax
import numpy as np
import tensorboardX

from jaxnmt import workdir as workdir_lib


class Writer:
  """Scalars and texts under WORKDIR/<name>: TensorBoard events, plus every scalar as a
  line of `metrics.jsonl` for tools without TensorBoard. A no-op on processes > 0.

  `purge_step`: a run resumed from checkpoint step S passes S + 1. The killed run may
  have logged steps after S, which this run logs again: their lines leave
  metrics.jsonl (rewritten whole, then swapped in), and TensorBoard hides their events
  (tensorboardX writes a restart marker at `purge_step`), so no step appears twice."""

  def __init__(self, workdir: str, name: str, purge_step: int | None = None):
    self._writer = self._jsonl = None
    if jax.process_index() == 0:
      directory = os.path.join(workdir, name)
      os.makedirs(directory, exist_ok=True)
      target = os.path.join(directory, workdir_lib.METRICS)
      if purge_step is not None:
        _trim_jsonl(target, purge_step)
      # The event file's name holds the second it was opened, and tensorboardX opens
      # it with 'wb': a unique, time-ordered suffix keeps a writer opened in the same
      # second (a quick restart) from overwriting the last one's events, and keeps
      # TensorBoard reading the files in the order they were written.
      self._writer = tensorboardX.SummaryWriter(
          directory, purge_step=purge_step, filename_suffix=f'.{time.time_ns()}')
      self._jsonl = open(target, 'a', encoding='utf-8')

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
      self._writer.close()
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict]:
  """The records a Writer appended to `path` (a missing file reads as none; a line cut
  short by a crash is skipped)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path, encoding='utf-8') as handle:
    for line in handle:
      try:
        records.append(json.loads(line))
      except ValueError:
        pass
  return records


def _trim_jsonl(path: str, purge_step: int) -> None:
  """Drops the records of steps >= `purge_step` (and a line cut short) from `path`."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as handle:
    lines = handle.read().splitlines(keepends=True)
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
    workdir_lib.write_text(path, ''.join(kept))


def summarize(step_metrics: list[dict]) -> dict[str, float]:
  """Sums per-step metric dicts (fetched to host) and turns sums into means."""
  total = {key: float(np.sum([m[key] for m in step_metrics])) for key in step_metrics[0]}
  tokens = max(total.get('tokens', 0.0), 1.0)
  summary = {'loss': total['loss'] / tokens, 'nll': total['nll'] / tokens,
             'accuracy': total['correct'] / tokens}
  if 'grad_norm' in total:
    summary['grad_norm'] = total['grad_norm'] / len(step_metrics)
  return summary
