"""Label-smoothed cross entropy as pure functions that return sums, so metrics
combine across steps, devices and hosts by adding (divide once, on the host)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxnmt.model import layers


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """logits: [B, T, V]; targets: int32 [B, T]; weights: [B, T] (0 on padding).

  Returns sums over real tokens: `loss` (label-smoothed, shifted so that a perfect
  prediction of the smoothed distribution scores 0), `nll` (plain negative
  log-likelihood), `correct` (argmax hits) and `tokens` (the weight sum).
  """
  return _sums_and_log_probs(logits, targets, weights, label_smoothing)[0]


def _sums_and_log_probs(logits, targets, weights, label_smoothing):
  """(`cross_entropy_sums`, the float32 log-softmax it was computed from)."""
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  # A hit is a target scored at the row's maximum: one max-reduction, cheaper than
  # argmax's (value, index) reduction (BUILD_NOTES.md, "Speed"). Exact ties (measure
  # zero for float logits) count as hits.
  values = jax.lax.stop_gradient(logits)
  hits = jnp.take_along_axis(values, targets[..., None], axis=-1)[..., 0] >= values.max(-1)
  confidence, low, normalizer = _smoothing(vocab, label_smoothing)
  smoothed = -(confidence * target_log_probs
               + low * (log_probs.sum(-1) - target_log_probs))
  weights = weights.astype(jnp.float32)
  return {
      'loss': ((smoothed - normalizer) * weights).sum(),
      'nll': (-target_log_probs * weights).sum(),
      'correct': (hits * weights).sum(),
      'tokens': weights.sum(),
  }, log_probs


# ------------------------------------------------------------ fused output layer + loss


def _smoothing(vocab: int, label_smoothing: float) -> tuple[float, float, float]:
  """(probability of the target, of every other token, entropy of that distribution:
  the minimum of the smoothed loss)."""
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  normalizer = -(confidence * np.log(confidence)
                 + (vocab - 1) * low * np.log(low + 1e-20)) if label_smoothing else 0.0
  return confidence, low, float(normalizer)


def _chunked(x: jax.Array, chunks: int) -> jax.Array:
  """[B, T, ...] -> [chunks, B, T / chunks, ...]: slices along T, so that every chunk
  keeps the batch axis (and its data-parallel sharding)."""
  rows, length = x.shape[:2]
  return jnp.moveaxis(x.reshape(rows, chunks, length // chunks, *x.shape[2:]), 1, 0)


def _pad_length(chunks: int, *arrays):
  """Pads axis 1 (length) of each array with zeros to a multiple of `chunks`."""
  length = arrays[0].shape[1]
  extra = -length % chunks
  if not extra:
    return arrays
  return tuple(jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) for x in arrays)


def _chunk_sums(hidden, weight, targets, weights, label_smoothing, dtype, with_grads):
  """(loss, nll, correct) sums of one chunk and, `with_grads`, the gradients of the
  loss sum for the chunk's hidden states and for the [D, V] transposed output weight."""
  cast_hidden, cast_weight = hidden.astype(dtype), weight.astype(dtype)
  logits = layers.einsum_f32('BTD,VD->BTV', cast_hidden, cast_weight)
  sums, log_probs = _sums_and_log_probs(logits, targets, weights, label_smoothing)
  sums = sums['loss'], sums['nll'], sums['correct']
  if not with_grads:
    return sums
  # d(smoothed)/d(logits) = softmax - q, q the smoothed one-hot target distribution.
  vocab = weight.shape[0]
  confidence, low, _ = _smoothing(vocab, label_smoothing)
  is_target = targets[..., None] == jnp.arange(vocab, dtype=targets.dtype)
  d_logits = (jnp.exp(log_probs) - jnp.where(is_target, confidence, low)) * weights[..., None]
  d_logits = d_logits.astype(dtype)
  d_hidden = layers.einsum_f32('BTV,VD->BTD', d_logits, cast_weight)
  # [D, V] = hidden^T d_logits: only the small [B*T, D] operand is transposed.
  d_weight_t = layers.einsum_f32('BTD,BTV->DV', cast_hidden, d_logits)
  return sums, d_hidden.astype(hidden.dtype), d_weight_t


def _fused_sums(hidden, weight, targets, weights, label_smoothing, chunks, dtype,
                with_grads):
  rows, length = targets.shape
  hidden, targets, weights = _pad_length(chunks, hidden, targets, weights)

  def body(carry, inputs):
    chunk_hidden, chunk_targets, chunk_weights = inputs
    outputs = _chunk_sums(chunk_hidden, weight, chunk_targets, chunk_weights,
                          label_smoothing, dtype, with_grads)
    if not with_grads:
      return jax.tree.map(jnp.add, carry, outputs), None
    sums, d_hidden, d_weight_t = outputs
    return jax.tree.map(jnp.add, carry, (sums, d_weight_t)), d_hidden

  zero = jnp.zeros((), jnp.float32)
  carry = (zero, zero, zero)
  if with_grads:
    carry = (carry, jnp.zeros(weight.shape[::-1], jnp.float32))
  carry, d_hidden = jax.lax.scan(body, carry, (_chunked(hidden, chunks),
                                               _chunked(targets, chunks),
                                               _chunked(weights, chunks)))
  if not with_grads:
    return carry
  sums, d_weight_t = carry
  d_hidden = jnp.moveaxis(d_hidden, 0, 1).reshape(rows, hidden.shape[1], -1)
  return sums, d_hidden[:, :length], d_weight_t.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, weight, targets, weights, label_smoothing, chunks, dtype):
  return _fused_sums(hidden, weight, targets, weights, label_smoothing, chunks, dtype,
                     with_grads=False)


def _fused_forward(hidden, weight, targets, weights, label_smoothing, chunks, dtype):
  sums, d_hidden, d_weight = _fused_sums(hidden, weight, targets, weights, label_smoothing,
                                         chunks, dtype, with_grads=True)
  return sums, (d_hidden, d_weight)


def _fused_backward(label_smoothing, chunks, dtype, residuals, cotangents):
  del label_smoothing, chunks, dtype
  d_hidden, d_weight = residuals
  scale = cotangents[0]  # the loss's; nll and correct leave as stop_gradient below
  return (d_hidden * scale.astype(d_hidden.dtype), d_weight * scale, None, None)


_fused.defvjp(_fused_forward, _fused_backward)


def fused_cross_entropy_sums(hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                             weights: jax.Array, label_smoothing: float = 0.0,
                             chunks: int = 1, dtype=jnp.float32) -> dict[str, jax.Array]:
  """`cross_entropy_sums` of the logits `hidden @ weight.T`, without ever holding the
  [B, T, V] logits: T is cut into `chunks` slices, and each slice's logits are made,
  reduced to the sums and (under `jax.grad`) turned into the gradients of `loss` for
  the slice's hidden states and for `weight`, then dropped. The backward pass only
  scales those saved gradients, so the FLOPs are those of the plain output layer.

  hidden: [B, T, D] final (normalised) decoder states; weight: [V, D] output
  projection (the embedding table when tied); targets int32 [B, T]; weights [B, T].
  Matmuls run in `dtype` with float32 results; softmax and sums are float32. Only
  `loss` carries a gradient (`nll`, `correct`, `tokens` are metrics).
  """
  weights = weights.astype(jnp.float32)
  loss, nll, correct = _fused(hidden, weight, targets, weights, float(label_smoothing),
                              int(chunks), jnp.dtype(dtype))
  return {'loss': loss, 'nll': jax.lax.stop_gradient(nll),
          'correct': jax.lax.stop_gradient(correct), 'tokens': weights.sum()}
