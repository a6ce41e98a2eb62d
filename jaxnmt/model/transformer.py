"""The encoder-decoder Transformer (Vaswani et al. 2017) and a decoder-only language
model (`DecoderLM`) in Flax NNX, both stacks of the same `Block`.

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

from jaxnmt.model import cache as cache_lib
from jaxnmt.model import layers


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
  attention_bias: bool = False  # biases on the query/key/value/output projections
  output_bias: bool = False  # a bias on the output layer's logits
  # What the decoder reads at position 0: the BOS token's embedding ('bos'), or a zero
  # vector ('zeros', as Marian: only the position encoding is seen there).
  decoder_start: str = 'bos'


# ----------------------------------------------------------------------------- blocks


class Block(nnx.Module):
  """One Transformer layer: self-attention, cross-attention over an encoder's keys and
  values (with `cross_attention`: the translation decoder), then the MLP. Each sublayer
  sits in a residual connection with dropout on its output: pre-LN `x + f(norm(x))` or
  post-LN `norm(x + f(x))`, per `config.pre_layer_norm`. With `rope` the self-attention
  rotates its queries and keys by their positions (RoPE)."""

  def __init__(self, config: ModelConfig, *, cross_attention: bool, rope: bool,
               rngs: nnx.Rngs):
    self.pre_layer_norm = config.pre_layer_norm
    self.rope = rope
    make_norm = lambda: layers.make_norm(config.norm, config.d_model, rngs=rngs)
    make_attention = lambda: layers.Attention(
        config.d_model, config.num_heads, config.attention_dropout_rate, rngs=rngs,
        dtype=config.dtype, kind=config.attention,
        implementation=config.attention_implementation, bias=config.attention_bias)
    self.self_attention_norm = make_norm()
    self.self_attention = make_attention()
    self.cross_attention_norm = make_norm() if cross_attention else None
    self.cross_attention = make_attention() if cross_attention else None
    self.mlp_norm = make_norm()
    self.mlp = layers.FeedForward(config.d_model, config.d_ff, config.activation,
                                  config.dropout_rate, rngs=rngs, dtype=config.dtype)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, hidden, positions, self_mask, cross=None, *, deterministic: bool,
               cache: cache_lib.LayerCache | None = None,
               layout: cache_lib.Layout = cache_lib.ROWS, index=None):
    """hidden: [B, T, D]; positions: int32 [B, T]; self_mask: bool [B, 1, T, T or slots];
    cross (layers with cross-attention): (keys, values, mask [B, 1, T, S]); keys and
    values [B, S, N, H], or the cache's [B', N, S, H] with `cache`.
    With `cache` (cached decoding, T = 1; slots in `layout`, cache.py) the step's keys
    and values are written at position `index` and both attentions take the one-query
    path (`Attention.attend_one`). Returns (hidden [B, T, D], updated cache or None)."""
    attended, new_cache = self._self_attend(
        self._sublayer_input(hidden, self.self_attention_norm), positions, self_mask, cache,
        layout, index, deterministic)
    hidden = self._residual(hidden, attended, self.self_attention_norm, deterministic)
    if self.cross_attention is not None:
      keys, values, mask = cross
      inputs = self._sublayer_input(hidden, self.cross_attention_norm)
      if cache is None:
        attended = self.cross_attention(inputs, keys, values, mask,
                                        deterministic=deterministic)
      else:
        attended = self.cross_attention.attend_one(inputs, keys, values, mask)
      hidden = self._residual(hidden, attended, self.cross_attention_norm, deterministic)
    transformed = self.mlp(self._sublayer_input(hidden, self.mlp_norm),
                           deterministic=deterministic)
    return self._residual(hidden, transformed, self.mlp_norm, deterministic), new_cache

  def _self_attend(self, inputs, positions, mask, cache, layout, index, deterministic):
    """inputs: [B, T, D] -> (attended [B, T, D], cache with this step's keys and values,
    or None)."""
    query_positions = positions if self.rope else None
    if cache is None:  # every position at once: training, teacher forcing
      keys, values = self.self_attention.project_kv(inputs)  # [B, T, N, H]
      if self.rope:
        keys = layers.apply_rope(keys, positions)
      return self.self_attention(inputs, keys, values, mask, deterministic=deterministic,
                                 query_positions=query_positions), None
    # One query a row against the cached slots (a row's own, or its beams' under beam
    # slots: `mask` tells them apart), read in the layout they are stored in.
    query, keys, values = self.self_attention.project_qkv(inputs)  # [B, 1, N, H]
    if self.rope:
      keys = layers.apply_rope(keys, positions)
    cache = cache.write(keys, values, index, layout)
    attended = self.self_attention.attend_one(inputs, cache.keys, cache.values, mask,
                                              query_positions, query=query,
                                              keys_axes=layout.keys)
    return attended, cache

  def _sublayer_input(self, hidden, norm):
    """What a sublayer reads: the normalised residual stream under pre-LN."""
    return norm(hidden) if self.pre_layer_norm else hidden

  def _residual(self, hidden, output, norm, deterministic: bool):
    """Adds a sublayer's output to the residual stream (and normalises under post-LN)."""
    hidden = hidden + self.dropout(output, deterministic=deterministic)
    return hidden if self.pre_layer_norm else norm(hidden)


def _final_norm(config: ModelConfig, *, rngs: nnx.Rngs):
  """The norm after the last layer: pre-LN only (a post-LN layer ends normalised)."""
  return layers.make_norm(config.norm, config.d_model, rngs=rngs) if (
      config.pre_layer_norm) else None


def _run_blocks(blocks, remat: str, hidden, positions, self_mask, encoded=None,
                cross_mask=None, *, deterministic: bool):
  """All positions at once (training, full recomputation). hidden: [B, T, D];
  positions: int32 [B, T]; encoded: [B, S, D] for cross-attention, else None."""

  def run(block, hidden, positions, self_mask, encoded, cross_mask):
    # Cross keys/values inside, so that remat recomputes rather than saves them.
    cross = None if encoded is None else (*block.cross_attention.project_kv(encoded),
                                          cross_mask)
    return block(hidden, positions, self_mask, cross, deterministic=deterministic)[0]

  run = layers.remat(run, remat)
  hidden = layers.constrain_batch(hidden)
  encoded = None if encoded is None else layers.constrain_batch(encoded)
  for block in blocks:
    hidden = layers.constrain_batch(run(block, hidden, positions, self_mask, encoded,
                                        cross_mask))
  return hidden


def _decode_tokens(model, embed, position_table, cache: cache_lib.DecoderCache, tokens,
                   index, cross_mask=None):
  """One step of `model.decoder_layers`: tokens int32 [R] at position `index` -> (logits
  [R, V], the cache with the step's keys and values). cross_mask: [B or R, 1, 1, S] for
  cross-attention over the layers' cross arrays. The number of slots is read from the
  cache (cache.py: a search may hand in the first W)."""
  batch = tokens.shape[0]
  positions = jnp.full((batch, 1), index, jnp.int32)
  # Every row is at `index`: its position encoding is computed once ([1, 1, D]).
  hidden = _embed(model.config, embed, position_table, model.dropout, tokens[:, None],
                  positions[:1], True, decoder=True)  # [R, 1, D]
  self_mask = cache.visible(index)  # [R, 1, 1, slots]
  new_layers = []
  for block, layer in zip(model.decoder_layers, cache.layers):
    cross = None if cross_mask is None else (layer.cross_keys, layer.cross_values,
                                             cross_mask)
    hidden, layer = block(hidden, positions, self_mask, cross, deterministic=True,
                          cache=layer, layout=cache.layout, index=index)
    new_layers.append(layer)
  return model.logits(hidden)[:, 0, :], cache._replace(layers=tuple(new_layers))


def _embed(config: ModelConfig, embed: layers.Embed, position_table, dropout, ids,
           positions, deterministic: bool, *, within_rows: bool = False,
           decoder: bool = False):
  """ids, positions: int32 [B, L] -> [B, L, D] in the compute dtype: token embeddings
  plus learned or sinusoidal positions (RoPE adds none: attention rotates instead).
  within_rows: every position is below L (whole or packed rows, not a decoding step),
  so sinusoidal encodings are computed for L positions, not for every row.
  decoder: the target side, whose token embedding at position 0 is a zero vector when
  `config.decoder_start` is 'zeros'."""
  hidden = embed(ids)
  if decoder and config.decoder_start == 'zeros':
    hidden = jnp.where((positions == 0)[..., None], jnp.zeros((), hidden.dtype), hidden)
  if config.position_embedding == 'learned':
    hidden = hidden + position_table(positions).astype(hidden.dtype)
  elif config.position_embedding == 'sinusoidal':
    encoding = layers.sinusoidal_positions(positions, config.d_model,
                                           ids.shape[1] if within_rows else None)
    hidden = hidden + encoding.astype(hidden.dtype)
  return dropout(hidden, deterministic=deterministic)


# ----------------------------------------------------------------------------- output layer


class OutputLayer:
  """The output layer both models share: the target-side embedding (tied) or an
  untied `output_kernel` [D, V]. A model provides `features` (a batch -> the output
  layer's input), `final_states` (the last layer's output -> that input) and
  `_output_embed`."""

  def __call__(self, batch: dict, *, deterministic: bool = True):
    """A (packed) training batch -> logits [B, T, V] for its `targets`."""
    return self.project(self.features(batch, deterministic=deterministic))

  def output_weight(self) -> jax.Array:
    """The output projection as [V, D] (the target-side embedding when tied)."""
    if self.output_kernel is None:
      return self._output_embed().embedding[...]
    return self.output_kernel[...].T

  def output_operands(self, states) -> tuple[jax.Array, jax.Array]:
    """(states', weight') whose product states' @ weight'.T is `project(states)`:
    the final states [B, T, D] and `output_weight()` [V, D], each with a column of
    ones / of the bias appended when the logits have a bias (for the fused loss,
    which takes one matmul)."""
    weight = self.output_weight()
    if self.output_bias is None:
      return states, weight
    ones = jnp.ones((*states.shape[:-1], 1), states.dtype)
    return (jnp.concatenate([states, ones], -1),
            jnp.concatenate([weight, self.output_bias[...][:, None]], -1))

  def project(self, states) -> jax.Array:
    """Normalised final states [B, T, D] -> float32 logits [B, T, V]."""
    if self.output_kernel is None:
      logits = self._output_embed().attend(states)
    else:
      kernel = self.output_kernel[...].astype(states.dtype)  # [D, V]
      logits = layers.einsum_f32('BTD,DV->BTV', states, kernel)
    return logits if self.output_bias is None else logits + self.output_bias[...]

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
      self.output_kernel = _output_kernel(config, rngs=rngs)
    self.source_positions = _position_table(config, rngs=rngs)
    self.target_positions = _position_table(config, rngs=rngs)
    rope = config.position_embedding == 'rope'
    self.encoder_layers = nnx.List([Block(config, cross_attention=False, rope=rope, rngs=rngs)
                                    for _ in range(config.num_encoder_layers)])
    self.decoder_layers = nnx.List([Block(config, cross_attention=True, rope=rope, rngs=rngs)
                                    for _ in range(config.num_decoder_layers)])
    self.encoder_norm = _final_norm(config, rngs=rngs)
    self.decoder_norm = _final_norm(config, rngs=rngs)
    self.output_bias = _output_bias(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def encode(self, inputs, segment_ids, positions, *, deterministic: bool = True):
    """inputs, segment_ids, positions: int32 [B, S] -> encoded [B, S, D]."""
    hidden = _embed(self.config, self.source_embed, self.source_positions, self.dropout,
                    inputs, positions, deterministic, within_rows=True)
    hidden = _run_blocks(self.encoder_layers, self.config.remat, hidden, positions,
                         layers.attention_mask(segment_ids, segment_ids),
                         deterministic=deterministic)
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
    """-> the last decoder layer's output [B, T, D]."""
    hidden = _embed(self.config, self.target_embed, self.target_positions, self.dropout,
                    decoder_inputs, target_positions, deterministic, within_rows=True,
                    decoder=True)
    self_mask = layers.attention_mask(target_segment_ids, target_segment_ids, causal=True)
    cross_mask = layers.attention_mask(target_segment_ids, source_segment_ids)
    return _run_blocks(self.decoder_layers, self.config.remat, hidden, target_positions,
                       self_mask, encoded, cross_mask, deterministic=deterministic)

  def features(self, batch: dict, *, deterministic: bool = True):
    """A (packed) training batch -> the output layer's input [B, T, D]."""
    encoded = self.encode(batch['inputs'], batch['inputs_segment_ids'],
                          batch['inputs_positions'], deterministic=deterministic)
    return self.final_states(self._decoder_stack(
        encoded, batch['inputs_segment_ids'], batch['decoder_inputs'],
        batch['targets_segment_ids'], batch['targets_positions'], deterministic))

  # --------------------------------------------------------------- cached decoding

  def init_cache(self, encoded, source_segment_ids, max_length: int
                 ) -> cache_lib.DecoderCache:
    """Cache for step-by-step decoding of up to `max_length` tokens: cross-attention
    keys/values computed once from `encoded` [B, S, D]; empty self-attention slots."""
    heads, head_dim = self.config.num_heads, self.config.d_model // self.config.num_heads
    layer_caches = []
    for layer in self.decoder_layers:
      cross_keys, cross_values = (jnp.swapaxes(array, 1, 2)  # [B, S, N, H] -> SLOTS
                                  for array in layer.cross_attention.project_kv(encoded))
      layer_caches.append(cache_lib.LayerCache.empty(
          encoded.shape[0], heads, max_length, head_dim, encoded.dtype, cross_keys,
          cross_values))
    return cache_lib.DecoderCache(tuple(layer_caches), source_segment_ids)

  def decode_step(self, cache: cache_lib.DecoderCache, tokens, index):
    """tokens: int32 [R] at position `index` -> (logits [R, V], updated cache)."""
    cross_mask = (cache.source_segment_ids != 0)[:, None, None, :]  # [R, 1, 1, S]
    return _decode_tokens(self, self.target_embed, self.target_positions, cache, tokens,
                          index, cross_mask)

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


class DecoderLM(OutputLayer, nnx.Module):
  """GPT-style language model: token embedding (tied to the output by default), RoPE or
  learned/sinusoidal positions, `num_decoder_layers` Blocks without cross-attention and,
  when pre-LN, a final norm.

  Its batches use the target-side keys of translation batches (`decoder_inputs`,
  `targets`, `targets_segment_ids`, `targets_positions`), so the trainer, losses and
  metrics are shared."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = layers.Embed(config.vocab_size, config.d_model, rngs=rngs,
                              dtype=config.dtype)
    self.positions = _position_table(config, rngs=rngs)
    rope = config.position_embedding == 'rope'
    self.decoder_layers = nnx.List([Block(config, cross_attention=False, rope=rope, rngs=rngs)
                                    for _ in range(config.num_decoder_layers)])
    self.final_norm = _final_norm(config, rngs=rngs)
    self.output_kernel = None if config.share_embeddings else _output_kernel(config,
                                                                             rngs=rngs)
    self.output_bias = _output_bias(config, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def final_states(self, hidden):
    """The last layer's output, normalised: what the output layer reads."""
    return self.final_norm(hidden) if self.config.pre_layer_norm else hidden

  def _output_embed(self) -> layers.Embed:
    return self.embed

  def features(self, batch: dict, *, deterministic: bool = True):
    """A batch -> the output layer's input [B, T, D] for its `targets`."""
    positions, segments = batch['targets_positions'], batch['targets_segment_ids']
    hidden = _embed(self.config, self.embed, self.positions, self.dropout,
                    batch['decoder_inputs'], positions, deterministic, within_rows=True,
                    decoder=True)
    hidden = _run_blocks(self.decoder_layers, self.config.remat, hidden, positions,
                         layers.attention_mask(segments, segments, causal=True),
                         deterministic=deterministic)
    return self.final_states(hidden)

  def init_cache(self, batch_size: int, max_length: int, dtype=None
                 ) -> cache_lib.DecoderCache:
    """Empty key/value slots, in the compute dtype unless `dtype` says otherwise."""
    config = self.config
    empty = cache_lib.LayerCache.empty(batch_size, config.num_heads, max_length,
                                       config.d_model // config.num_heads,
                                       dtype or config.dtype)
    return cache_lib.DecoderCache(tuple(empty for _ in self.decoder_layers))

  def decode_step(self, cache: cache_lib.DecoderCache, tokens, index):
    """tokens: int32 [R] at position `index` -> (logits [R, V], updated cache)."""
    return _decode_tokens(self, self.embed, self.positions, cache, tokens, index)


def _position_table(config: ModelConfig, *, rngs: nnx.Rngs):
  """A learned position table, or None for sinusoidal positions and RoPE."""
  if config.position_embedding != 'learned':
    return None
  return layers.LearnedPositions(config.max_length, config.d_model, rngs=rngs)


def _output_kernel(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Param:
  """An untied output projection [D, V]."""
  return layers.param(rngs, nnx.initializers.lecun_normal(),
                      (config.d_model, config.vocab_size), (layers.EMBED, layers.VOCAB))


def _output_bias(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Param | None:
  """The logits' bias [V] with `config.output_bias`, else None."""
  if not config.output_bias:
    return None
  return layers.param(rngs, nnx.initializers.zeros, (config.vocab_size,), (layers.VOCAB,))


def build(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model `config.kind` names."""
  return {'transformer': Transformer, 'decoder_lm': DecoderLM}[config.kind](config, rngs=rngs)
