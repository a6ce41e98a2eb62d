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
  line of `metrics.jsonl` for tools without TensorBoard. A no-op on processes > 0."""

  def __init__(self, workdir: str, name: str):
    self._writer = self._jsonl = None
    if jax.process_index() == 0:
      directory = os.path.join(workdir, name)
      self._writer = tensorboardX.SummaryWriter(directory)
      self._jsonl = open(os.path.join(directory, workdir_lib.METRICS), 'a', encoding='utf-8')

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
  """The records a Writer appended to `path` (a missing file reads as none)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as handle:
    return [json.loads(line) for line in handle if line.strip()]


def summarize(step_metrics: list[dict]) -> dict[str, float]:
  """Sums per-step metric dicts (fetched to host) and turns sums into means."""
  total = {key: float(np.sum([m[key] for m in step_metrics])) for key in step_metrics[0]}
  tokens = max(total.get('tokens', 0.0), 1.0)
  summary = {'loss': total['loss'] / tokens, 'nll': total['nll'] / tokens,
             'accuracy': total['correct'] / tokens}
  if 'grad_norm' in total:
    summary['grad_norm'] = total['grad_norm'] / len(step_metrics)
  return summary
