"""Building blocks shared by the encoder and decoder: embeddings, positions, layer norm,
multi-head attention and the feed-forward block.

Every parameter carries logical axis names (the `out_sharding` metadata) from the
vocabulary below; `runtime/sharding.py` maps them onto mesh axes.
Shapes: B batch, L/Q/K lengths (queries, keys), D model width, N heads, H head width,
F feed-forward width, V vocabulary.

Mixed precision: parameters are always float32 (the optimizer's master copy); layers
given a compute `dtype` (e.g. bfloat16) cast parameters and activations to it for their
matmuls. Norm statistics, the attention softmax and the output logits stay float32.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.model import cache as cache_lib

# Logical axis names of parameters.
VOCAB, EMBED, HEADS, HEAD_DIM, MLP, LENGTH = 'vocab', 'embed', 'heads', 'head_dim', 'mlp', 'length'


def param(rngs: nnx.Rngs, initializer, shape: tuple[int, ...],
          axes: tuple[str | None, ...]) -> nnx.Param:
  """A float32 parameter annotated with its logical axes."""
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(initializer(rngs.params(), shape, jnp.float32),
                   out_sharding=axes, eager_sharding=False)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """An einsum with a float32 result. On GPU/TPU a bfloat16 product accumulates
  straight into float32; XLA:CPU has no bf16 x bf16 -> f32 dot, so there the product
  is computed in the inputs' dtype and then cast."""
  if a.dtype == jnp.float32 or jax.default_backend() == 'cpu':
    return jnp.einsum(spec, a, b).astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


class Embed(nnx.Module):
  """Token embedding; `attend` reuses it as the output projection (tied weights)."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.d_model = d_model
    self.dtype = jnp.dtype(dtype)
    self.embedding = param(rngs, nnx.initializers.normal(d_model**-0.5),
                           (vocab_size, d_model), (VOCAB, EMBED))

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids: int32 [B, L] -> [B, L, D] in the compute dtype, scaled by sqrt(D)."""
    embedded = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
    return embedded * math.sqrt(self.d_model)

  def attend(self, hidden: jax.Array) -> jax.Array:
    """hidden: [B, L, D] -> float32 logits [B, L, V]."""
    return tied_logits(hidden, self.embedding[...], self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def tied_logits(hidden: jax.Array, embedding: jax.Array, dtype) -> jax.Array:
  """hidden [B, L, D] x embedding [V, D] -> float32 logits [B, L, V].

  Same value and gradients as the einsum; the backward pass is written out because
  XLA's own one computes the embedding gradient from a transposed copy of the whole
  [B*L, V] logits gradient (measured in BUILD_NOTES.md, "Speed")."""
  return einsum_f32('BLD,VD->BLV', hidden.astype(dtype), embedding.astype(dtype))


def _tied_logits_forward(hidden, embedding, dtype):
  return tied_logits(hidden, embedding, dtype), (hidden, embedding)


def _tied_logits_backward(dtype, residuals, grad):
  hidden, embedding = residuals
  grad = grad.astype(dtype)
  d_hidden = einsum_f32('BLV,VD->BLD', grad, embedding.astype(dtype))
  # [D, V] = hidden^T grad: only the small [B*L, D] operand is transposed.
  d_embedding = einsum_f32('BLD,BLV->DV', hidden.astype(dtype), grad).T
  return d_hidden.astype(hidden.dtype), d_embedding.astype(embedding.dtype)


tied_logits.defvjp(_tied_logits_forward, _tied_logits_backward)


def sinusoidal_positions(positions: jax.Array, d_model: int,
                         bound: int | None = None) -> jax.Array:
  """positions: int32 [B, L] -> [B, L, D] (sin on the first half, cos on the second).

  bound: a static bound the positions lie below (a packed row's length bounds the
  positions in it). Then the `bound` encodings are computed once and gathered, rather
  than a sine and a cosine for every element of every row."""
  if bound is not None:
    table = sinusoidal_positions(jnp.arange(bound)[None], d_model)[0]   # [bound, D]
    return jnp.take(table, positions, axis=0)
  half = d_model // 2
  inverse_frequency = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / max(half - 1, 1))
  angles = positions[..., None].astype(jnp.float32) * inverse_frequency  # [B, L, D/2]
  encoding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(encoding, [(0, 0), (0, 0), (0, d_model - 2 * half)])


class LearnedPositions(nnx.Module):

  def __init__(self, max_length: int, d_model: int, *, rngs: nnx.Rngs):
    self.table = param(rngs, nnx.initializers.normal(0.02), (max_length, d_model),
                       (LENGTH, EMBED))

  def __call__(self, positions: jax.Array) -> jax.Array:
    """positions: int32 [B, L] -> [B, L, D]."""
    return jnp.take(self.table[...], positions, axis=0)


class LayerNorm(nnx.Module):

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6):
    self.epsilon = epsilon
    self.scale = param(rngs, nnx.initializers.ones, (d_model,), (EMBED,))
    self.bias = param(rngs, nnx.initializers.zeros, (d_model,), (EMBED,))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """Statistics in float32; returns hidden's dtype."""
    values = hidden.astype(jnp.float32)
    mean = values.mean(-1, keepdims=True)
    variance = jnp.square(values - mean).mean(-1, keepdims=True)
    normed = (values - mean) * jax.lax.rsqrt(variance + self.epsilon)
    return (normed * self.scale[...] + self.bias[...]).astype(hidden.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6):
    self.epsilon = epsilon
    self.scale = param(rngs, nnx.initializers.ones, (d_model,), (EMBED,))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """Statistics in float32; returns hidden's dtype."""
    values = hidden.astype(jnp.float32)
    mean_square = jnp.square(values).mean(-1, keepdims=True)
    normed = values * jax.lax.rsqrt(mean_square + self.epsilon) * self.scale[...]
    return normed.astype(hidden.dtype)


def make_norm(kind: str, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
  return {'layernorm': LayerNorm, 'rmsnorm': RMSNorm}[kind](d_model, rngs=rngs)


def apply_rope(vectors: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding. vectors: [B, L, N, H] (H even); positions: int32 [B, L].
  Rotates pairs (i, i + H/2) by angle position * base^(-2i/H), so that the dot product
  of a rotated query and key depends on their positions only through the difference."""
  half = vectors.shape[-1] // 2
  frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * frequencies  # [B, L, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  first, second = vectors[..., :half], vectors[..., half:]
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin],
                         axis=-1).astype(vectors.dtype)


ATTENTION_KINDS = ('einsum', 'dot_product')


def attention_problem(kind: str, dropout_rate: float) -> str | None:
  """Why attention `kind` cannot run at attention dropout `dropout_rate` (None: it can).
  The rule lives here only: `Attention` raises it, `config_lib` reports it for a config."""
  if kind not in ATTENTION_KINDS:
    return f'unknown attention kind {kind!r} (one of {", ".join(ATTENTION_KINDS)})'
  if kind == 'dot_product' and dropout_rate > 0:
    return (f"attention 'dot_product' has no attention dropout: the rate must be 0, got "
            f'{dropout_rate!r}')
  return None


class Attention(nnx.Module):
  """Multi-head attention. Keys/values are projected by `project_kv` so a decoder can
  compute them once (cross-attention) or append them to a cache (self-attention).

  `kind` 'einsum' spells attention out (softmax in float32, attention dropout);
  'dot_product' calls `jax.nn.dot_product_attention` with `implementation` (None: JAX
  picks, 'xla', or 'cudnn': the fused GPU kernel), which has no attention dropout."""

  def __init__(self, d_model: int, num_heads: int, dropout_rate: float, *, rngs: nnx.Rngs,
               dtype=jnp.float32, kind: str = 'einsum', implementation: str | None = None,
               bias: bool = False):
    problem = attention_problem(kind, dropout_rate)
    if problem:
      raise ValueError(problem)
    self.dtype = jnp.dtype(dtype)
    self.kind = kind
    self.implementation = implementation or None
    head_dim = d_model // num_heads
    init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=0,
                                             out_axis=(1, 2))
    self.query = param(rngs, init, (d_model, num_heads, head_dim), (EMBED, HEADS, HEAD_DIM))
    self.key = param(rngs, init, (d_model, num_heads, head_dim), (EMBED, HEADS, HEAD_DIM))
    self.value = param(rngs, init, (d_model, num_heads, head_dim), (EMBED, HEADS, HEAD_DIM))
    out_init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=(0, 1),
                                                 out_axis=2)
    self.out = param(rngs, out_init, (num_heads, head_dim, d_model), (HEADS, HEAD_DIM, EMBED))
    # Biases of the four projections (Marian's, OPUS-MT's): `bias=True`.
    make_bias = lambda shape, axes: (param(rngs, nnx.initializers.zeros, shape, axes)
                                     if bias else None)
    self.query_bias = make_bias((num_heads, head_dim), (HEADS, HEAD_DIM))
    self.key_bias = make_bias((num_heads, head_dim), (HEADS, HEAD_DIM))
    self.value_bias = make_bias((num_heads, head_dim), (HEADS, HEAD_DIM))
    self.out_bias = make_bias((d_model,), (EMBED,))
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def _project(self, hidden: jax.Array, kernel: nnx.Param, bias) -> jax.Array:
    """hidden [B, T, D] (compute dtype) x kernel [D, N, H] (+ bias [N, H]) -> [B, T, N, H]."""
    projected = jnp.einsum('BTD,DNH->BTNH', hidden, kernel[...].astype(self.dtype))
    return projected if bias is None else projected + bias[...].astype(self.dtype)

  def _output(self, attended: jax.Array) -> jax.Array:
    """attended [B, Q, N, H] -> [B, Q, D] through the output projection (+ bias)."""
    out = jnp.einsum('BQNH,NHD->BQD', attended, self.out[...].astype(self.dtype))
    return out if self.out_bias is None else out + self.out_bias[...].astype(self.dtype)

  def project_kv(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    """hidden: [B, K, D] -> keys, values: [B, K, N, H] in the compute dtype."""
    hidden = hidden.astype(self.dtype)
    return (self._project(hidden, self.key, self.key_bias),
            self._project(hidden, self.value, self.value_bias))

  def project_qkv(self, hidden: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden: [B, T, D] -> query, keys, values [B, T, N, H] by one matmul with the
    three kernels side by side (self-attention in cached decoding, where three small
    matmuls would each run far below the machine's peak). The query is unscaled."""
    hidden = hidden.astype(self.dtype)
    kernel = jnp.concatenate([self.query[...], self.key[...], self.value[...]],
                             axis=1).astype(self.dtype)                  # [D, 3N, H]
    projected = jnp.einsum('BTD,DNH->BTNH', hidden, kernel)
    if self.query_bias is not None:
      projected = projected + jnp.concatenate(
          [self.query_bias[...], self.key_bias[...], self.value_bias[...]]).astype(self.dtype)
    return tuple(jnp.split(projected, 3, axis=2))

  def __call__(self, hidden: jax.Array, keys: jax.Array, values: jax.Array,
               mask: jax.Array, *, deterministic: bool,
               query_positions: jax.Array | None = None) -> jax.Array:
    """hidden: [B, Q, D] queries; keys/values: [B, K, N, H]; mask: bool [B, 1, Q, K].
    With `query_positions` [B, Q] the queries are rotated (RoPE); rotate keys with
    `apply_rope` before caching them. A query row whose mask is all False (padding)
    gets finite output (uniform weights), in both kinds."""
    hidden = hidden.astype(self.dtype)
    keys, values = keys.astype(self.dtype), values.astype(self.dtype)
    query = self._project(hidden, self.query, self.query_bias)
    if query_positions is not None:
      query = apply_rope(query, query_positions)
    if self.kind == 'dot_product':
      # Scales by 1/sqrt(H) itself; masks with a large finite negative number and
      # takes the softmax in float32 (XLA and cuDNN alike).
      attended = jax.nn.dot_product_attention(query, keys, values, mask=mask,
                                              implementation=self.implementation)
    else:
      query = query * (query.shape[-1] ** -0.5)
      logits = einsum_f32('BQNH,BKNH->BNQK', query, keys)
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      weights = self.dropout(weights, deterministic=deterministic)
      attended = jnp.einsum('BNQK,BKNH->BQNH', weights, values)
    return self._output(attended)

  def attend_one(self, hidden: jax.Array, keys: jax.Array, values: jax.Array,
                 mask: jax.Array, query_positions: jax.Array | None = None, *,
                 query: jax.Array | None = None,
                 keys_axes: str = cache_lib.SLOTS) -> jax.Array:
    """Cached decoding, one query per row: hidden [G*B, 1, D]; keys and values in the
    cache's axis orders (cache.py: values [B, N, T, H], keys as `keys_axes` says); mask
    bool [B or G*B, 1, 1, T] -> [G*B, 1, D].
    G = 1 but for keys shared by a group of G consecutive query rows (beam search's
    cross-attention and beam slots: row r reads the keys of sentence r // G, which are
    then stored once, not G times). `query` [G*B, 1, N, H]: the projected query
    (`project_qkv`), if already computed.

    The same function as `__call__` without dropout (float32 scores and softmax), for
    either kind. Both products are batched matmuls over (B, N) that read the cache
    where it lies; the [B, T, N, H] layout of `__call__` would have to be transposed
    or reduced across its inner axes at every step and layer (slower, see
    BUILD_NOTES.md, 'Decoding')."""
    assert hidden.shape[1] == 1, f'one query per row, got {hidden.shape}'
    batch, group = keys.shape[0], hidden.shape[0] // keys.shape[0]
    assert batch * group == hidden.shape[0], (hidden.shape, keys.shape)
    if query is None:
      query = self._project(hidden.astype(self.dtype), self.query, self.query_bias)
    if query_positions is not None:
      query = apply_rope(query, query_positions)
    query = query.astype(jnp.float32) * (query.shape[-1] ** -0.5)
    query = query.reshape(batch, group, *query.shape[2:])                # [B, G, N, H]
    logits = jnp.einsum(f'BGNH,{keys_axes}->BNGT', query, keys.astype(jnp.float32))
    mask = mask.reshape(batch, -1, mask.shape[-1])[:, None]              # [B, 1, G or 1, T]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    # [B, N, G, H]: with G before H the matmul writes rows as it computes them (for
    # beam search's cross-attention faster than [B, G, N, H], see BUILD_NOTES.md,
    # 'Decoding').
    attended = jnp.einsum(f'BNGT,{cache_lib.SLOTS}->BNGH', weights,
                          values.astype(jnp.float32))
    attended = jnp.swapaxes(attended, 1, 2).reshape(batch * group, -1)   # [G*B, N*H]
    out = self.out[...].astype(self.dtype)
    output = attended.astype(self.dtype) @ out.reshape(-1, out.shape[-1])
    if self.out_bias is not None:
      output = output + self.out_bias[...].astype(self.dtype)
    return output[:, None, :]


def gelu_sigmoid(x: jax.Array) -> jax.Array:
  """GELU in its sigmoid form, x * sigmoid(1.702 x) (Marian's 'gelu')."""
  return x * jax.nn.sigmoid(1.702 * x)


# model.activation -> the function; 'gelu' is jax.nn.gelu's tanh form, 'swish' is
# x * sigmoid(x) ungated, 'swiglu' gates silu(x W_gate) into the inner projection.
ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': jax.nn.gelu, 'gelu_sigmoid': gelu_sigmoid,
               'swish': jax.nn.silu, 'swiglu': jax.nn.silu}


class FeedForward(nnx.Module):
  """Position-wise MLP. 'relu', 'gelu', 'gelu_sigmoid' or 'swish' (ACTIVATIONS):
  act(x W_in + b_in) W_out + b_out; 'swiglu':
  (silu(x W_gate) * (x W_in + b_in)) W_out + b_out. Every activation has the biases
  b_in (`bi`) and b_out (`bo`); the gate W_gate (`wg`) has none."""

  def __init__(self, d_model: int, d_ff: int, activation: str, dropout_rate: float, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    init = nnx.initializers.xavier_uniform()
    self.dtype = jnp.dtype(dtype)
    self.gated = activation == 'swiglu'
    self.wi = param(rngs, init, (d_model, d_ff), (EMBED, MLP))
    self.bi = param(rngs, nnx.initializers.zeros, (d_ff,), (MLP,))
    self.wo = param(rngs, init, (d_ff, d_model), (MLP, EMBED))
    self.bo = param(rngs, nnx.initializers.zeros, (d_model,), (EMBED,))
    if self.gated:
      self.wg = param(rngs, init, (d_model, d_ff), (EMBED, MLP))
    self.activation = ACTIVATIONS[activation]
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, hidden: jax.Array, *, deterministic: bool) -> jax.Array:
    """hidden: [B, L, D] -> [B, L, D] in the compute dtype."""
    cast = lambda weight: weight[...].astype(self.dtype)
    hidden = hidden.astype(self.dtype)
    inner = jnp.einsum('BLD,DF->BLF', hidden, cast(self.wi)) + cast(self.bi)
    if self.gated:
      inner = self.activation(jnp.einsum('BLD,DF->BLF', hidden, cast(self.wg))) * inner
    else:
      inner = self.activation(inner)
    inner = self.dropout(inner, deterministic=deterministic)
    return jnp.einsum('BLF,FD->BLD', inner, cast(self.wo)) + cast(self.bo)


# ----------------------------------------------------------------------------- masks, remat


def attention_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array,
                   causal: bool = False) -> jax.Array:
  """bool [B, 1, Q, K]: query i may attend key j iff both belong to the same non-pad
  segment (and j <= i when causal)."""
  mask = (query_segment_ids[:, :, None] == key_segment_ids[:, None, :]) & (
      key_segment_ids[:, None, :] != 0)
  if causal:
    query_index = jnp.arange(query_segment_ids.shape[1])[:, None]
    key_index = jnp.arange(key_segment_ids.shape[1])[None, :]
    mask &= key_index <= query_index
  return mask[:, None, :, :]


def remat(function, mode: str):
  """`function(layer, *arrays)` rematerialised per `mode`: 'none' (as is), 'full'
  (saves only its inputs; the backward pass recomputes the layer's forward) or 'dots'
  (also saves the outputs of matmuls without batch dimensions, i.e. the projections;
  attention scores and everything elementwise are recomputed)."""
  if mode == 'none':
    return function
  policies = {'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  return nnx.remat(function, policy=policies[mode])


# (mesh, the mesh axes of the batch) while a sharded step is traced (`batch_sharded`).
_BATCH_LAYOUT = []


@contextlib.contextmanager
def batch_sharded(mesh, batch_axes: tuple[str, ...]):
  """While a step is traced inside: the residual stream between blocks is laid out with
  its batch split over `batch_axes` of `mesh` and every other axis whole
  (`constrain_batch`). The weights of a layer then come to the activations (FSDP:
  all-gathered, layer by layer) rather than the activations being split like the
  weights: left to itself the partitioner splits the activations' d_model like the
  fsdp-split kernels and all-reduces every matmul's output."""
  _BATCH_LAYOUT.append((mesh, tuple(batch_axes)))
  try:
    yield
  finally:
    _BATCH_LAYOUT.pop()


def constrain_batch(x: jax.Array) -> jax.Array:
  """x [B, ...] laid out as `batch_sharded` says (unchanged outside it)."""
  if not _BATCH_LAYOUT:
    return x
  mesh, axes = _BATCH_LAYOUT[-1]
  spec = PartitionSpec(axes or None, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
