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
        implementation=config.attention_implementation)
    self.self_attention_norm = make_norm()
    self.self_attention = make_attention()
    self.cross_attention_norm = make_norm() if cross_attention else None
    self.cross_attention = make_attention() if cross_attention else None
    self.mlp_norm = make_norm()
    self.mlp = layers.FeedForward(config.d_model, config.d_ff, config.activation,
                                  config.dropout_rate, rngs=rngs, dtype=config.dtype)
    self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

  def __call__(self, hidden, positions, self_mask, cross=None, *, deterministic: bool,
               cache: dict | None = None, index=None):
    """hidden: [B, T, D]; positions: int32 [B, T]; self_mask: bool [B, 1, T, T or T_max];
    cross (layers with cross-attention): (keys, values, mask [B, 1, T, S]); keys and
    values [B, S, N, H], or [B, N, S, H] with `cache`.
    With `cache` ({'keys', 'values'}: [B, N, T_max, H], or beam slots as
    `_attend_beam_slots` says; cached decoding, T = 1) the step's keys and values are
    written at position `index` and both attentions take the one-query path
    (`Attention.attend_one`). Returns (hidden [B, T, D], updated cache or None)."""
    attended, new_cache = self._self_attend(
        self._sublayer_input(hidden, self.self_attention_norm), positions, self_mask, cache,
        index, deterministic)
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

  def _self_attend(self, inputs, positions, mask, cache, index, deterministic):
    """inputs: [B, T, D] -> (attended [B, T, D], cache with this step's keys and values,
    or None)."""
    query_positions = positions if self.rope else None
    if cache is None:
      keys, values = self.self_attention.project_kv(inputs)  # [B, T, N, H]
      if self.rope:
        keys = layers.apply_rope(keys, positions)
      return self.self_attention(inputs, keys, values, mask, deterministic=deterministic,
                                 query_positions=query_positions), None
    query, keys, values = self.self_attention.project_qkv(inputs)  # [B, 1, N, H]
    if self.rope:
      keys = layers.apply_rope(keys, positions)
    if 'slot_beams' in cache:
      return self._attend_beam_slots(inputs, query, keys, values, query_positions, cache,
                                     index)
    write = lambda slots, new: jax.lax.dynamic_update_slice_in_dim(
        slots, jnp.swapaxes(new, 1, 2).astype(slots.dtype), index, axis=2)
    keys, values = write(cache['keys'], keys), write(cache['values'], values)
    attended = self.self_attention.attend_one(inputs, keys, values, mask, query_positions,
                                              query=query)
    return attended, {'keys': keys, 'values': values}  # [B, N, T_max, H]

  def _attend_beam_slots(self, inputs, query, keys, values, query_positions, cache, index):
    """Beam search's cache (decode.py, "Beam slots"): slots 'keys' [B, N, H, T_max * G]
    and 'values' [B, N, T_max * G, H], G per position, shared by the G beams of a
    sentence; cache['slot_beams'] int32
    [B*G, >= T_max] names, for each beam row, the beam whose slot holds each of its
    positions. Row b*G + g writes its keys and values at slot index * G + g of
    sentence b and attends over the sentence's T_max * G slots with every slot outside
    its history masked: one grouped `attend_one`, as cross-attention's, and no
    reordering of the cache when beams change."""
    batch, heads, slots, head_dim = cache['values'].shape
    group = cache['slot_beams'].shape[0] // batch
    length = slots // group
    def write(slots, new, order, axis):  # new [B*G, 1, N, H] -> slots index * G + g
      new = jnp.transpose(new.reshape(batch, group, heads, head_dim), order)
      return jax.lax.dynamic_update_slice_in_dim(slots, new.astype(slots.dtype),
                                                 index * group, axis=axis)
    keys = write(cache['keys'], keys, (0, 2, 3, 1), 3)                  # [B, N, H, G]
    values = write(cache['values'], values, (0, 2, 1, 3), 2)            # [B, N, G, H]
    history = cache['slot_beams'][:, :length]                            # [B*G, T_max]
    mask = ((history[:, :, None] == jnp.arange(group)) &
            (jnp.arange(length) <= index)[:, None])                      # [B*G, T_max, G]
    attended = self.self_attention.attend_one(
        inputs, keys, values, mask.reshape(batch * group, 1, 1, slots), query_positions,
        query=query, keys_last=True)
    return attended, {'keys': keys, 'values': values}

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
  for block in blocks:
    hidden = run(block, hidden, positions, self_mask, encoded, cross_mask)
  return hidden


def _empty_self_cache(config: ModelConfig, batch: int, max_length: int, dtype) -> dict:
  head_dim = config.d_model // config.num_heads
  empty = jnp.zeros((batch, config.num_heads, max_length, head_dim), dtype)
  return {'keys': empty, 'values': empty}  # [B, N, T_max, H]: heads before positions


def _decode_tokens(model, embed, position_table, caches: list, tokens, index,
                   cross_mask=None):
  """One step of `model.decoder_layers`: tokens int32 [B] at position `index`; caches:
  one dict per layer, {'keys', 'values'} [B, N, T_max, H] (plus 'cross_keys',
  'cross_values' [B, N, S, H] with cross_mask [B, 1, 1, S] for cross-attention)
  -> (logits [B, V], updated caches). T_max is read from the cache: decode.py hands
  in windows of the slots (any T_max > index) and leaves the cross arrays untouched.
  The cross arrays may have B / G rows, each shared by G consecutive token rows (beam
  search: decode.SHARED_NAMES); cross_mask has B or B / G rows. Under beam search the
  self-attention slots hold T_max * G positions for B / G rows ('keys' [B / G, N, H,
  T_max * G], positions last), with 'slot_beams' beside them (decode.py, "Beam
  slots"), which `Block._attend_beam_slots` builds its mask from."""
  batch, max_length = tokens.shape[0], caches[0]['values'].shape[2]
  positions = jnp.full((batch, 1), index, jnp.int32)
  # Every row is at `index`: its position encoding is computed once ([1, 1, D]).
  hidden = _embed(model.config, embed, position_table, model.dropout, tokens[:, None],
                  positions[:1], True)  # [B, 1, D]
  self_mask = None if 'slot_beams' in caches[0] else jnp.broadcast_to(
      jnp.arange(max_length) <= index, (batch, 1, 1, max_length))
  new_caches = []
  for block, cache in zip(model.decoder_layers, caches):
    cross = None if cross_mask is None else (cache['cross_keys'], cache['cross_values'],
                                             cross_mask)
    hidden, self_cache = block(hidden, positions, self_mask, cross, deterministic=True,
                               cache=cache, index=index)
    new_caches.append({**cache, **self_cache})
  return model.logits(hidden)[:, 0, :], new_caches


def _embed(config: ModelConfig, embed: layers.Embed, position_table, dropout, ids,
           positions, deterministic: bool, *, within_rows: bool = False):
  """ids, positions: int32 [B, L] -> [B, L, D] in the compute dtype: token embeddings
  plus learned or sinusoidal positions (RoPE adds none: attention rotates instead).
  within_rows: every position is below L (whole or packed rows, not a decoding step),
  so sinusoidal encodings are computed for L positions, not for every row."""
  hidden = embed(ids)
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

  def project(self, states) -> jax.Array:
    """Normalised final states [B, T, D] -> float32 logits [B, T, V]."""
    if self.output_kernel is None:
      return self._output_embed().attend(states)
    kernel = self.output_kernel[...].astype(states.dtype)  # [D, V]
    return layers.einsum_f32('BTD,DV->BTV', states, kernel)

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
                    decoder_inputs, target_positions, deterministic, within_rows=True)
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

  def init_cache(self, encoded, source_segment_ids, max_length: int) -> dict:
    """Cache for step-by-step decoding of up to `max_length` tokens: cross-attention
    keys/values computed once from `encoded` [B, S, D]; empty self-attention slots."""
    empty = _empty_self_cache(self.config, encoded.shape[0], max_length, encoded.dtype)
    layers_cache = []
    for layer in self.decoder_layers:
      cross_keys, cross_values = (jnp.swapaxes(array, 1, 2)  # [B, N, S, H]
                                  for array in layer.cross_attention.project_kv(encoded))
      layers_cache.append({'cross_keys': cross_keys, 'cross_values': cross_values, **empty})
    return {'layers': layers_cache, 'source_segment_ids': source_segment_ids}

  def decode_step(self, cache: dict, tokens, index):
    """tokens: int32 [B] at position `index` -> (logits [B, V], updated cache)."""
    source_segment_ids = cache['source_segment_ids']
    cross_mask = (source_segment_ids != 0)[:, None, None, :]  # [B, 1, 1, S]
    logits, new_layers = _decode_tokens(self, self.target_embed, self.target_positions,
                                        cache['layers'], tokens, index, cross_mask)
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
                    batch['decoder_inputs'], positions, deterministic, within_rows=True)
    hidden = _run_blocks(self.decoder_layers, self.config.remat, hidden, positions,
                         layers.attention_mask(segments, segments, causal=True),
                         deterministic=deterministic)
    return self.final_states(hidden)

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict:
    """Empty key/value slots, in the compute dtype unless `dtype` says otherwise."""
    empty = _empty_self_cache(self.config, batch_size, max_length,
                              dtype or self.config.dtype)
    return {'layers': [dict(empty) for _ in self.decoder_layers]}

  def decode_step(self, cache: dict, tokens, index):
    """tokens: int32 [B] at position `index` -> (logits [B, V], updated cache)."""
    logits, new_layers = _decode_tokens(self, self.embed, self.positions, cache['layers'],
                                        tokens, index)
    return logits, {'layers': new_layers}


def _position_table(config: ModelConfig, *, rngs: nnx.Rngs):
  """A learned position table, or None for sinusoidal positions and RoPE."""
  if config.position_embedding != 'learned':
    return None
  return layers.LearnedPositions(config.max_length, config.d_model, rngs=rngs)


def _output_kernel(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Param:
  """An untied output projection [D, V]."""
  return layers.param(rngs, nnx.initializers.lecun_normal(),
                      (config.d_model, config.vocab_size), (layers.EMBED, layers.VOCAB))


def build(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model `config.kind` names."""
  return {'transformer': Transformer, 'decoder_lm': DecoderLM}[config.kind](config, rngs=rngs)
