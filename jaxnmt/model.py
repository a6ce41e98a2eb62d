"""The encoder-decoder Transformer (Vaswani et al. 2017) and a decoder-only language
model (`DecoderLM`) in Flax NNX, built from the same layers.

Shapes: B batch, S source length, T target length, D model width, N heads,
H head width, V vocabulary. Segment ids (0 = padding, 1, 2, ... = packed pairs)
drive every mask, so padding and packed neighbours never see each other.

`ModelConfig.dtype` is the compute dtype (parameters stay float32, logits are float32),
`attention` picks the attention kernel and `remat` recomputes each layer's forward in
the backward pass of training; none of them changes the parameters.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnmt import layers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  d_model: int = 512
  num_heads: int = 8
  d_ff: int = 2048
  activation: str = 'relu'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pre_layer_norm: bool = True
  position_embedding: str = 'sinusoidal'
  share_embeddings: bool = True
  max_length: int = 256  # longest position a learned table covers
  norm: str = 'layernorm'  # or 'rmsnorm'
  kind: str = 'transformer'  # or 'decoder_lm'
  dtype: str = 'float32'  # compute dtype, or 'bfloat16'
  attention: str = 'einsum'  # or 'dot_product' (jax.nn.dot_product_attention)
  attention_implementation: str = ''  # for 'dot_product': '' (JAX picks), 'xla', 'cudnn'
  remat: str = 'none'  # or 'full' (save nothing), 'dots' (save matmul outputs)


# ----------------------------------------------------------------------------- masks


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


# ----------------------------------------------------------------------------- layers


def _attention(config: ModelConfig, *, rngs: nnx.Rngs) -> layers.Attention:
  return layers.Attention(config.d_model, config.num_heads, config.attention_dropout_rate,
                          rngs=rngs, dtype=config.dtype, kind=config.attention,
                          implementation=config.attention_implementation)


def _feed_forward(config: ModelConfig, *, rngs: nnx.Rngs) -> layers.FeedForward:
  return layers.FeedForward(config.d_model, config.d_ff, config.activation,
                            config.dropout_rate, rngs=rngs, dtype=config.dtype)


def _remat(function, mode: str):
  """`function(layer, *arrays)` rematerialised per `mode`: 'none' (as is), 'full'
  (saves only its inputs; the backward pass recomputes the layer's forward) or 'dots'
  (also saves the outputs of matmuls without batch dimensions, i.e. the projections;
  attention scores and everything elementwise are recomputed)."""
  if mode == 'none':
    return function
  policies = {'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  return nnx.remat(function, policy=policies[mode])


class EncoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.pre_layer_norm = config.pre_layer_norm
    self.attention_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.attention = _attention(config, rngs=rngs)
    self.mlp_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.mlp = _feed_forward(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, hidden: jax.Array, mask: jax.Array, *, deterministic: bool):
    """hidden: [B, S, D]; mask: [B, 1, S, S]."""
    def attend(normed):
      keys, values = self.attention.project_kv(normed)
      return self.attention(normed, keys, values, mask, deterministic=deterministic)
    hidden = _residual(hidden, attend, self.attention_norm, self.dropout,
                       self.pre_layer_norm, deterministic)
    return _residual(hidden, lambda x: self.mlp(x, deterministic=deterministic),
                     self.mlp_norm, self.dropout, self.pre_layer_norm, deterministic)


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.pre_layer_norm = config.pre_layer_norm
    self.self_attention_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.self_attention = _attention(config, rngs=rngs)
    self.cross_attention_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.cross_attention = _attention(config, rngs=rngs)
    self.mlp_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.mlp = _feed_forward(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, hidden, self_mask, cross_keys, cross_values, cross_mask, *,
               deterministic: bool, cache: dict | None = None, index=None):
    """hidden: [B, T, D]; cross_keys/values: [B, S, N, H]; masks [B, 1, T, T|S].

    With `cache` ({'keys', 'values'}: [B, T_max, N, H]) hidden is one step [B, 1, D]
    written at position `index`; returns (hidden, cache)."""
    new_cache = None

    def self_attend(normed):
      nonlocal new_cache
      keys, values = self.self_attention.project_kv(normed)
      if cache is not None:
        keys = jax.lax.dynamic_update_slice_in_dim(cache['keys'], keys, index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache['values'], values, index, axis=1)
        new_cache = {'keys': keys, 'values': values}
      return self.self_attention(normed, keys, values, self_mask,
                                 deterministic=deterministic)

    def cross_attend(normed):
      return self.cross_attention(normed, cross_keys, cross_values, cross_mask,
                                  deterministic=deterministic)

    for norm, sublayer in ((self.self_attention_norm, self_attend),
                           (self.cross_attention_norm, cross_attend),
                           (self.mlp_norm, lambda x: self.mlp(x, deterministic=deterministic))):
      hidden = _residual(hidden, sublayer, norm, self.dropout, self.pre_layer_norm,
                         deterministic)
    return hidden, new_cache


def _residual(hidden, sublayer, norm, dropout, pre_layer_norm: bool, deterministic: bool):
  if pre_layer_norm:
    return hidden + dropout(sublayer(norm(hidden)), deterministic=deterministic)
  return norm(hidden + dropout(sublayer(hidden), deterministic=deterministic))


# ----------------------------------------------------------------------------- output layer


class OutputLayer:
  """The output layer both models share: the target-side embedding (tied) or an
  untied `output_kernel` [D, V]. A model provides `final_states` (the normalised
  input of the output layer) and `_output_embed`."""

  def output_weight(self) -> jax.Array:
    """The output projection as [V, D] (the target-side embedding when tied)."""
    if self.output_kernel is None:
      return self._output_embed().embedding[...]
    return self.output_kernel[...].T

  def project(self, states) -> jax.Array:
    """Normalised final states [B, T, D] -> float32 logits [B, T, V]."""
    if self.output_kernel is None:
      return self._output_embed().attend(states)
    return _project_out(states, self.output_kernel)

  def logits(self, hidden):
    """hidden: [B, T, D] (the last layer's output) -> float32 logits [B, T, V]."""
    return self.project(self.final_states(hidden))


# ----------------------------------------------------------------------------- model


class Transformer(OutputLayer, nnx.Module):
  """Encoder-decoder. `encode` and `decode` are separate so decoding encodes once."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    d_model, vocab = config.d_model, config.vocab_size
    self.source_embed = layers.Embed(vocab, d_model, rngs=rngs, dtype=config.dtype)
    if config.share_embeddings:
      self.target_embed = self.source_embed
      self.output_kernel = None
    else:
      self.target_embed = layers.Embed(vocab, d_model, rngs=rngs, dtype=config.dtype)
      self.output_kernel = layers.param(rngs, nnx.initializers.lecun_normal(),
                                        (d_model, vocab), (layers.EMBED, layers.VOCAB))
    if config.position_embedding == 'learned':
      self.source_positions = layers.LearnedPositions(config.max_length, d_model, rngs=rngs)
      self.target_positions = layers.LearnedPositions(config.max_length, d_model, rngs=rngs)
    self.encoder_layers = nnx.List(
        [EncoderLayer(config, rngs=rngs) for _ in range(config.num_encoder_layers)])
    self.decoder_layers = nnx.List(
        [DecoderLayer(config, rngs=rngs) for _ in range(config.num_decoder_layers)])
    self.encoder_norm = layers.make_norm(config.norm, d_model, rngs=rngs)
    self.decoder_norm = layers.make_norm(config.norm, d_model, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def _embed(self, embed, position_table, ids, positions, deterministic):
    """-> [B, L, D] in the compute dtype."""
    hidden = embed(ids)
    if self.config.position_embedding == 'learned':
      encoding = position_table(positions)
    else:
      encoding = layers.sinusoidal_positions(positions, self.config.d_model)
    hidden = hidden + encoding.astype(hidden.dtype)
    return self.dropout(hidden, deterministic=deterministic)

  def encode(self, inputs, segment_ids, positions, *, deterministic: bool = True):
    """inputs, segment_ids, positions: int32 [B, S] -> encoded [B, S, D]."""
    hidden = self._embed(self.source_embed, getattr(self, 'source_positions', None),
                         inputs, positions, deterministic)
    mask = attention_mask(segment_ids, segment_ids)
    run = _remat(lambda layer, hidden, mask: layer(hidden, mask, deterministic=deterministic),
                 self.config.remat)
    for layer in self.encoder_layers:
      hidden = run(layer, hidden, mask)
    return self.encoder_norm(hidden) if self.config.pre_layer_norm else hidden

  def final_states(self, hidden):
    """The last decoder layer's output, normalised: what the output layer reads."""
    return self.decoder_norm(hidden) if self.config.pre_layer_norm else hidden

  def _output_embed(self) -> layers.Embed:
    return self.target_embed

  def decode(self, encoded, source_segment_ids, decoder_inputs, target_segment_ids,
             target_positions, *, deterministic: bool = True):
    """Teacher-forced decoder. encoded: [B, S, D]; the rest int32 -> logits [B, T, V]."""
    return self.logits(self._decoder_stack(encoded, source_segment_ids, decoder_inputs,
                                           target_segment_ids, target_positions,
                                           deterministic))

  def _decoder_stack(self, encoded, source_segment_ids, decoder_inputs, target_segment_ids,
                     target_positions, deterministic):
    hidden = self._embed(self.target_embed, getattr(self, 'target_positions', None),
                         decoder_inputs, target_positions, deterministic)
    self_mask = attention_mask(target_segment_ids, target_segment_ids, causal=True)
    cross_mask = attention_mask(target_segment_ids, source_segment_ids)

    def run(layer, hidden, encoded, self_mask, cross_mask):
      # Cross keys/values inside, so that remat recomputes rather than saves them.
      keys, values = layer.cross_attention.project_kv(encoded)
      return layer(hidden, self_mask, keys, values, cross_mask,
                   deterministic=deterministic)[0]

    run = _remat(run, self.config.remat)
    for layer in self.decoder_layers:
      hidden = run(layer, hidden, encoded, self_mask, cross_mask)
    return hidden

  def features(self, batch: dict, *, deterministic: bool = True):
    """A (packed) training batch -> the output layer's input [B, T, D]."""
    encoded = self.encode(batch['inputs'], batch['inputs_segment_ids'],
                          batch['inputs_positions'], deterministic=deterministic)
    return self.final_states(self._decoder_stack(
        encoded, batch['inputs_segment_ids'], batch['decoder_inputs'],
        batch['targets_segment_ids'], batch['targets_positions'], deterministic))

  def __call__(self, batch: dict, *, deterministic: bool = True):
    """A (packed) training batch -> logits [B, T, V]."""
    return self.project(self.features(batch, deterministic=deterministic))

  # --------------------------------------------------------------- cached decoding

  def init_cache(self, encoded, source_segment_ids, max_length: int) -> dict:
    """Cache for step-by-step decoding of up to `max_length` tokens: cross-attention
    keys/values computed once from `encoded` [B, S, D]; empty self-attention slots."""
    batch = encoded.shape[0]
    num_heads = self.config.num_heads
    head_dim = self.config.d_model // num_heads
    layers_cache = []
    for layer in self.decoder_layers:
      cross_keys, cross_values = layer.cross_attention.project_kv(encoded)
      empty = jnp.zeros((batch, max_length, num_heads, head_dim), encoded.dtype)
      layers_cache.append({'cross_keys': cross_keys, 'cross_values': cross_values,
                           'keys': empty, 'values': empty})
    return {'layers': layers_cache, 'source_segment_ids': source_segment_ids}

  def decode_step(self, cache: dict, tokens, index):
    """tokens: int32 [B] at position `index` -> (logits [B, V], updated cache)."""
    batch = tokens.shape[0]
    max_length = cache['layers'][0]['keys'].shape[1]
    positions = jnp.full((batch, 1), index, jnp.int32)
    hidden = self._embed(self.target_embed, getattr(self, 'target_positions', None),
                         tokens[:, None], positions, True)
    valid_keys = jnp.arange(max_length) <= index  # [T_max]
    self_mask = jnp.broadcast_to(valid_keys, (batch, 1, 1, max_length))
    source_segment_ids = cache['source_segment_ids']
    cross_mask = (source_segment_ids != 0)[:, None, None, :]  # [B, 1, 1, S]
    new_layers = []
    for layer, layer_cache in zip(self.decoder_layers, cache['layers']):
      hidden, self_cache = layer(hidden, self_mask, layer_cache['cross_keys'],
                                 layer_cache['cross_values'], cross_mask,
                                 deterministic=True, cache=layer_cache, index=index)
      new_layers.append({**layer_cache, **self_cache})
    logits = self.logits(hidden)[:, 0, :]
    return logits, {'layers': new_layers, 'source_segment_ids': source_segment_ids}

  # --------------------------------------------------------------- uncached decoding

  def init_uncached(self, encoded, source_segment_ids, max_length: int) -> dict:
    """State for `decode_step_uncached`: the encoder output and a token buffer. The
    baseline that recomputes the whole decoder every step (for tests and benchmarks)."""
    batch = encoded.shape[0]
    return {'encoded': encoded, 'source_segment_ids': source_segment_ids,
            'tokens': jnp.zeros((batch, max_length), jnp.int32)}

  def decode_step_uncached(self, state: dict, tokens, index):
    """Same contract as `decode_step`, recomputing all [B, T_max] positions."""
    buffer = jax.lax.dynamic_update_slice_in_dim(state['tokens'], tokens[:, None], index,
                                                 axis=1)
    batch, max_length = buffer.shape
    logits = self.decode(state['encoded'], state['source_segment_ids'], buffer,
                         jnp.ones((batch, max_length), jnp.int32),
                         jnp.broadcast_to(jnp.arange(max_length), (batch, max_length)))
    step_logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)
    return step_logits, {**state, 'tokens': buffer}


# ----------------------------------------------------------------------------- language model


class LMBlock(nnx.Module):
  """Pre-norm decoder block: causal self-attention (RoPE optional) and an MLP."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.rope = config.position_embedding == 'rope'
    self.attention_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.attention = _attention(config, rngs=rngs)
    self.mlp_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.mlp = _feed_forward(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, hidden, positions, mask, *, deterministic: bool,
               cache: dict | None = None, index=None):
    """hidden: [B, T, D]; positions: int32 [B, T]; mask: [B, 1, T, T or T_max].
    With `cache` ({'keys', 'values'}: [B, T_max, N, H]) T is 1 and the step's keys and
    values are written at `index`. Returns (hidden, cache or None)."""
    normed = self.attention_norm(hidden)
    keys, values = self.attention.project_kv(normed)
    if self.rope:
      keys = layers.apply_rope(keys, positions)
    new_cache = None
    if cache is not None:
      keys = jax.lax.dynamic_update_slice_in_dim(cache['keys'], keys, index, axis=1)
      values = jax.lax.dynamic_update_slice_in_dim(cache['values'], values, index, axis=1)
      new_cache = {'keys': keys, 'values': values}
    attended = self.attention(normed, keys, values, mask, deterministic=deterministic,
                              query_positions=positions if self.rope else None)
    hidden = hidden + self.dropout(attended, deterministic=deterministic)
    mlp_out = self.mlp(self.mlp_norm(hidden), deterministic=deterministic)
    return hidden + self.dropout(mlp_out, deterministic=deterministic), new_cache


class DecoderLM(OutputLayer, nnx.Module):
  """GPT-style language model: token embedding (tied to the output by default), RoPE or
  learned/sinusoidal positions, `num_decoder_layers` LMBlocks, a final norm.

  Its batches use the target-side keys of translation batches (`decoder_inputs`,
  `targets`, `targets_segment_ids`, `targets_positions`), so the trainer, losses and
  metrics are shared."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = layers.Embed(config.vocab_size, config.d_model, rngs=rngs,
                              dtype=config.dtype)
    if config.position_embedding == 'learned':
      self.positions = layers.LearnedPositions(config.max_length, config.d_model, rngs=rngs)
    self.blocks = nnx.List([LMBlock(config, rngs=rngs)
                            for _ in range(config.num_decoder_layers)])
    self.final_norm = layers.make_norm(config.norm, config.d_model, rngs=rngs)
    self.output_kernel = None if config.share_embeddings else layers.param(
        rngs, nnx.initializers.lecun_normal(), (config.d_model, config.vocab_size),
        (layers.EMBED, layers.VOCAB))
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def _embed(self, tokens, positions, deterministic):
    """-> [B, T, D] in the compute dtype."""
    hidden = self.embed(tokens)
    if self.config.position_embedding == 'learned':
      hidden = hidden + self.positions(positions).astype(hidden.dtype)
    elif self.config.position_embedding == 'sinusoidal':
      hidden = hidden + layers.sinusoidal_positions(positions, self.config.d_model).astype(
          hidden.dtype)
    return self.dropout(hidden, deterministic=deterministic)

  def final_states(self, hidden):
    """The last block's output, normalised: what the output layer reads."""
    return self.final_norm(hidden)

  def _output_embed(self) -> layers.Embed:
    return self.embed

  def __call__(self, batch: dict, *, deterministic: bool = True):
    """A batch -> logits [B, T, V] for its `targets`."""
    return self.project(self.features(batch, deterministic=deterministic))

  def features(self, batch: dict, *, deterministic: bool = True):
    """A batch -> the output layer's input [B, T, D] for its `targets`."""
    positions = batch['targets_positions']
    hidden = self._embed(batch['decoder_inputs'], positions, deterministic)
    segments = batch['targets_segment_ids']
    mask = attention_mask(segments, segments, causal=True)
    run = _remat(lambda block, hidden, positions, mask: block(
        hidden, positions, mask, deterministic=deterministic)[0], self.config.remat)
    for block in self.blocks:
      hidden = run(block, hidden, positions, mask)
    return self.final_states(hidden)

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
    """Empty key/value slots, in the compute dtype unless `dtype` says otherwise."""
    dtype = dtype or self.config.dtype
    num_heads = self.config.num_heads
    empty = jnp.zeros((batch_size, max_length, num_heads, self.config.d_model // num_heads),
                      dtype)
    return {'layers': [{'keys': empty, 'values': empty} for _ in self.blocks]}

  def decode_step(self, cache: dict, tokens, index):
    """tokens: int32 [B] at position `index` -> (logits [B, V], updated cache)."""
    batch = tokens.shape[0]
    max_length = cache['layers'][0]['keys'].shape[1]
    positions = jnp.full((batch, 1), index, jnp.int32)
    hidden = self._embed(tokens[:, None], positions, True)
    mask = jnp.broadcast_to(jnp.arange(max_length) <= index, (batch, 1, 1, max_length))
    new_layers = []
    for block, block_cache in zip(self.blocks, cache['layers']):
      hidden, block_cache = block(hidden, positions, mask, deterministic=True,
                                  cache=block_cache, index=index)
      new_layers.append(block_cache)
    return self.logits(hidden)[:, 0, :], {'layers': new_layers}


def _project_out(hidden, kernel) -> jax.Array:
  """hidden: [B, T, D] @ an untied output kernel [D, V] -> float32 logits [B, T, V]."""
  return layers.einsum_f32('BTD,DV->BTV', hidden, kernel[...].astype(hidden.dtype))


def build(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model `config.kind` names."""
  return {'transformer': Transformer, 'decoder_lm': DecoderLM}[config.kind](config, rngs=rngs)
