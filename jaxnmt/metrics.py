"""TensorBoard output (process 0 only) and throughput arithmetic."""

import os

import jax
import numpy as np
import tensorboardX


class Writer:
  """tensorboardX scalars and texts under WORKDIR/<name>; a no-op on processes > 0."""

  def __init__(self, workdir: str, name: str):
    self._writer = None
    if jax.process_index() == 0:
      self._writer = tensorboardX.SummaryWriter(os.path.join(workdir, name))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    for key, value in values.items():
      self._writer.add_scalar(key, float(value), step)

  def text(self, step: int, tag: str, value: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, value, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def summarize(step_metrics: list[dict]) -> dict[str, float]:
  """Sums per-step metric dicts (fetched to host) and turns sums into means."""
  total = {key: float(np.sum([m[key] for m in step_metrics])) for key in step_metrics[0]}
  tokens = max(total.get('tokens', 0.0), 1.0)
  summary = {'loss': total['loss'] / tokens, 'nll': total['nll'] / tokens,
             'accuracy': total['correct'] / tokens}
  if 'grad_norm' in total:
    summary['grad_norm'] = total['grad_norm'] / len(step_metrics)
  return summary
