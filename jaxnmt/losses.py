"""Label-smoothed cross entropy as pure functions that return sums, so metrics
combine across steps, devices and hosts by adding (divide once, on the host)."""

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """logits: [B, T, V]; targets: int32 [B, T]; weights: [B, T] (0 on padding).

  Returns sums over real tokens: `loss` (label-smoothed, shifted so that a perfect
  prediction of the smoothed distribution scores 0), `nll` (plain negative
  log-likelihood), `correct` (argmax hits) and `tokens` (the weight sum).
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  # A hit is a target scored at the row's maximum: one max-reduction, where argmax's
  # (value, index) reduction cost ~4% of a CPU training step. Exact ties (measure
  # zero for float logits) count as hits.
  values = jax.lax.stop_gradient(logits)
  hits = jnp.take_along_axis(values, targets[..., None], axis=-1)[..., 0] >= values.max(-1)
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  smoothed = -(confidence * target_log_probs
               + low * (log_probs.sum(-1) - target_log_probs))
  # Entropy of the smoothed target distribution: the minimum of `smoothed`.
  normalizer = -(confidence * np.log(confidence)
                 + (vocab - 1) * low * np.log(low + 1e-20)) if label_smoothing else 0.0
  weights = weights.astype(jnp.float32)
  return {
      'loss': ((smoothed - normalizer) * weights).sum(),
      'nll': (-target_log_probs * weights).sum(),
      'correct': (hits * weights).sum(),
      'tokens': weights.sum(),
  }
