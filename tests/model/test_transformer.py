"""Masks, shapes, the loss, and cached decoding of the NNX Transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnmt.model import layers
from jaxnmt.model import losses
from jaxnmt.model import transformer

CONFIG = transformer.ModelConfig(vocab_size=40, num_encoder_layers=2, num_decoder_layers=2,
                               d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0,
                               attention_dropout_rate=0.0, max_length=16)


def make_model(**overrides):
  config = transformer.ModelConfig(**{**CONFIG.__dict__, **overrides})
  return transformer.build(config, rngs=nnx.Rngs(params=0, dropout=1))


def test_sinusoidal_positions_from_a_table_equal_the_direct_ones():
  """The table of a row's `bound` encodings, gathered, is the same as a sine and a
  cosine per element (packed rows: positions restart at each pair)."""
  rng = np.random.default_rng(0)
  positions = jnp.asarray(rng.integers(0, 24, (5, 24)).astype(np.int32))
  for d_model in (32, 33):
    direct = jax.jit(lambda p: layers.sinusoidal_positions(p, d_model))(positions)
    tabled = jax.jit(lambda p: layers.sinusoidal_positions(p, d_model, 24))(positions)
    np.testing.assert_array_equal(tabled, direct)
    assert direct.shape == (5, 24, d_model)
  np.testing.assert_allclose(direct[..., 0], np.sin(np.asarray(positions)), atol=1e-5)


def packed_batch():
  """Two rows; row 0 packs two pairs (segments 1, 2) then padding."""
  rng = np.random.default_rng(0)
  source_segments = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
  target_segments = np.array([[1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]])
  def positions(segments):
    out = np.zeros_like(segments)
    for row in range(len(segments)):
      for segment in set(segments[row]) - {0}:
        where = segments[row] == segment
        out[row][where] = np.arange(where.sum())
    return out
  batch = {
      'inputs': rng.integers(4, 40, source_segments.shape) * (source_segments > 0),
      'inputs_segment_ids': source_segments, 'inputs_positions': positions(source_segments),
      'decoder_inputs': rng.integers(4, 40, target_segments.shape) * (target_segments > 0),
      'targets_segment_ids': target_segments, 'targets_positions': positions(target_segments),
  }
  batch['targets'] = rng.integers(4, 40, target_segments.shape) * (target_segments > 0)
  return {key: jnp.asarray(value, jnp.int32) for key, value in batch.items()}


def test_attention_mask_padding_segments_and_causal():
  segments = jnp.array([[1, 1, 2, 0]])
  mask = np.asarray(layers.attention_mask(segments, segments))[0, 0]
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
  causal = np.asarray(layers.attention_mask(segments, segments, causal=True))[0, 0]
  np.testing.assert_array_equal(causal, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize('pre_layer_norm, positions, shared', [
    (True, 'sinusoidal', True), (False, 'learned', False)])
def test_output_shape(pre_layer_norm, positions, shared):
  model = make_model(pre_layer_norm=pre_layer_norm, position_embedding=positions,
                     share_embeddings=shared)
  assert model(packed_batch()).shape == (2, 7, 40)


def test_packed_pairs_do_not_see_each_other_or_padding():
  model = make_model()
  batch = packed_batch()
  logits = model(batch)
  # Change everything outside pair 1 of row 0 (pair 2 and the padding, both sides).
  changed = dict(batch)
  for side, key in (('inputs', 'inputs'), ('targets', 'decoder_inputs')):
    outside = batch[f'{side}_segment_ids'][0] != 1
    changed[key] = batch[key].at[0].set(jnp.where(outside, (batch[key][0] + 5) % 40, batch[key][0]))
  changed_logits = model(changed)
  pair_one = np.asarray(batch['targets_segment_ids'][0] == 1)
  np.testing.assert_allclose(changed_logits[0][pair_one], logits[0][pair_one], atol=1e-5)
  assert not np.allclose(changed_logits[0][~pair_one], logits[0][~pair_one])
  np.testing.assert_allclose(changed_logits[1], logits[1], atol=1e-5)


def test_decoder_is_causal():
  model = make_model()
  batch = packed_batch()
  logits = model(batch)
  changed = dict(batch, decoder_inputs=batch['decoder_inputs'].at[1, 3].set(7))
  changed_logits = model(changed)
  np.testing.assert_allclose(changed_logits[1, :3], logits[1, :3], atol=1e-5)
  assert not np.allclose(changed_logits[1, 3], logits[1, 3])


# Every switch of the block and the embeddings, each value at least once (the LM's
# counterpart is tests/model/test_transformer_lm.py::test_cached_generation_equals_full_recomputation).
TRANSFORMER_OPTIONS = [
    {},  # pre-LN, layernorm, relu, sinusoidal positions, shared embeddings
    dict(pre_layer_norm=False, norm='rmsnorm', activation='gelu',
         position_embedding='learned', share_embeddings=False),
    dict(pre_layer_norm=False, activation='swiglu', position_embedding='rope'),
    dict(norm='rmsnorm', activation='swiglu', share_embeddings=False),
    # Marian's (OPUS-MT's) architecture, and its switches beside others.
    dict(pre_layer_norm=False, activation='swish', attention_bias=True, output_bias=True,
         decoder_start='zeros'),
    dict(activation='gelu_sigmoid', attention_bias=True, output_bias=True,
         share_embeddings=False, decoder_start='zeros', position_embedding='rope'),
]


def perturb_biases(model, seed: int = 0):
  """Biases start at zero; random ones make the tests see them."""
  rng = np.random.default_rng(seed)
  for path, value in nnx.iter_graph(model):
    if isinstance(value, nnx.Param) and 'bias' in str(path[-1]):
      value[...] = value[...] + 0.3 * rng.standard_normal(value.shape).astype(np.float32)
  return model


@pytest.mark.parametrize('options', TRANSFORMER_OPTIONS)
def test_cached_decoding_matches_full_recomputation(options):
  model = perturb_biases(make_model(**options))
  batch = packed_batch()
  assert np.isfinite(model(batch)).all()
  source_segments = (batch['inputs_segment_ids'] > 0).astype(jnp.int32)  # one pair per row
  source_positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  encoded = model.encode(batch['inputs'], source_segments, source_positions)
  tokens = jnp.asarray(np.random.default_rng(1).integers(4, 40, (2, 6)), jnp.int32)
  full = model.decode(encoded, source_segments, tokens, jnp.ones_like(tokens),
                      jnp.broadcast_to(jnp.arange(6), (2, 6)))
  assert np.isfinite(full).all()
  cache = model.init_cache(encoded, source_segments, max_length=6)
  for index in range(6):
    step_logits, cache = model.decode_step(cache, tokens[:, index], index)
    np.testing.assert_allclose(step_logits, full[:, index], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', ['transformer', 'decoder_lm'])
def test_parameters_carry_logical_axes(kind):
  model = make_model(kind=kind, activation='swiglu', position_embedding='learned',
                     share_embeddings=False)
  state = nnx.state(model, nnx.Param)
  specs = nnx.get_partition_spec(state)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  for (path, spec), value in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec),
                                 jax.tree.leaves(state)):
    assert len(spec) == value.ndim and None not in spec, (path, spec)  # every dimension
  names = {tuple(leaf) for leaf in jax.tree.leaves(specs, is_leaf=is_spec)}
  assert {('vocab', 'embed'), ('embed', 'vocab'), ('length', 'embed'),
          ('embed', 'heads', 'head_dim'), ('heads', 'head_dim', 'embed'), ('embed', 'mlp'),
          ('mlp', 'embed'), ('mlp',), ('embed',)} <= names


def test_loss_ignores_padding_and_smooths():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 10))
  targets = jnp.array([[1, 2, 3], [4, 5, 0]])
  weights = jnp.array([[1, 1, 1], [1, 1, 0]])
  sums = losses.cross_entropy_sums(logits, targets, weights)
  log_probs = jax.nn.log_softmax(logits)
  expected = -sum(float(log_probs[b, t, targets[b, t]])
                  for b in range(2) for t in range(3) if weights[b, t])
  np.testing.assert_allclose(sums['nll'], expected, rtol=1e-5)
  np.testing.assert_allclose(sums['loss'], expected, rtol=1e-5)
  assert float(sums['tokens']) == 5
  # Hits: real positions whose target has the highest logit.
  hits = sum(int(weights[b, t]) * int(logits[b, t].argmax() == targets[b, t])
             for b in range(2) for t in range(3))
  assert float(sums['correct']) == hits
  onehot = jax.nn.one_hot(targets, 10)
  assert float(losses.cross_entropy_sums(logits + 20 * onehot, targets, weights)['correct']) == 5
  assert float(losses.cross_entropy_sums(logits - 20 * onehot, targets, weights)['correct']) == 0
  # Changing the logits of the padded position changes nothing.
  padded_changed = logits.at[1, 2].set(100.0)
  assert float(losses.cross_entropy_sums(padded_changed, targets, weights)['nll']) == float(sums['nll'])
  # With smoothing, the minimum (a perfect smoothed prediction) is 0.
  smoothing = 0.1
  perfect = jnp.log(jnp.full((1, 1, 10), smoothing / 9).at[0, 0, 3].set(1 - smoothing))
  smoothed = losses.cross_entropy_sums(perfect, jnp.array([[3]]), jnp.ones((1, 1)), smoothing)
  assert abs(float(smoothed['loss'])) < 1e-5


@pytest.mark.parametrize('chunks', [1, 3, 7])  # 7 and 3 do not divide the length 9
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_fused_loss_matches_the_plain_output_layer(chunks, smoothing):
  keys = jax.random.split(jax.random.key(1), 5)
  hidden = jax.random.normal(keys[0], (3, 9, 16))
  weight = 0.3 * jax.random.normal(keys[1], (50, 16))
  targets = jax.random.randint(keys[2], (3, 9), 0, 50)
  weights = jax.random.uniform(keys[3], (3, 9)) > 0.3
  # Make some hits, so that `correct` is tested beyond 0.
  hidden = hidden.at[0, :4].set(3 * weight[targets[0, :4]])
  weights = weights.at[0, :4].set(True)

  def plain(hidden, weight):
    sums = losses.cross_entropy_sums(jnp.einsum('BTD,VD->BTV', hidden, weight), targets,
                                     weights, smoothing)
    return sums['loss'], sums

  def fused(hidden, weight):
    sums = losses.fused_cross_entropy_sums(hidden, weight, targets, weights, smoothing, chunks)
    return sums['loss'], sums

  expected_grads, expected = jax.grad(plain, (0, 1), has_aux=True)(hidden, weight)
  grads, sums = jax.jit(jax.grad(fused, (0, 1), has_aux=True))(hidden, weight)
  assert float(expected['correct']) >= 4
  for name, values in ((' under grad', sums), (' alone', jax.jit(fused)(hidden, weight)[1])):
    for key in ('loss', 'nll', 'correct', 'tokens'):
      np.testing.assert_allclose(values[key], expected[key], rtol=1e-5, err_msg=key + name)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kind', ['transformer', 'decoder_lm'])
def test_fused_loss_includes_the_output_bias(kind):
  model = perturb_biases(make_model(kind=kind, output_bias=True))
  batch = packed_batch()
  weights = batch['targets_segment_ids'] > 0
  plain = losses.cross_entropy_sums(model(batch), batch['targets'], weights, 0.1)
  fused = losses.fused_cross_entropy_sums(*model.output_operands(model.features(batch)),
                                          batch['targets'], weights, 0.1, 3)
  for key in ('loss', 'nll'):
    np.testing.assert_allclose(fused[key], plain[key], rtol=1e-5)


@pytest.mark.parametrize('kind', ['transformer', 'decoder_lm'])
def test_decoder_start_zeros_ignores_the_bos_embedding(kind):
  batch = packed_batch()
  bos = 2  # every segment starts with it; no other position holds it
  batch['decoder_inputs'] = jnp.where(batch['targets_positions'] == 0, bos,
                                      batch['decoder_inputs'])
  for start, ignored in (('zeros', True), ('bos', False)):
    model = make_model(kind=kind, decoder_start=start)
    logits = model(batch)
    embed = model.target_embed if kind == 'transformer' else model.embed
    noise = jax.random.normal(jax.random.key(3), embed.embedding.shape[1:])
    embed.embedding[...] = embed.embedding[...].at[bos].add(noise)
    changed = model(batch)
    # Only the first position of each packed segment reads the BOS token; the logit of
    # the BOS token itself (tied embeddings) changes either way.
    others = np.arange(changed.shape[-1]) != bos
    assert np.allclose(changed[..., others], logits[..., others], atol=1e-5) == ignored, start


def test_fused_loss_passes_gradients_to_the_loss_only():
  hidden = jax.random.normal(jax.random.key(0), (2, 4, 8))
  weight = jax.random.normal(jax.random.key(1), (20, 8))
  targets, weights = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4))
  nll_grad = jax.grad(lambda h: losses.fused_cross_entropy_sums(
      h, weight, targets, weights, 0.1, 2)['nll'])(hidden)
  assert not np.any(np.asarray(nll_grad))
  scaled = jax.grad(lambda h: 3.0 * losses.fused_cross_entropy_sums(
      h, weight, targets, weights, 0.1, 2)['loss'])(hidden)
  once = jax.grad(lambda h: losses.fused_cross_entropy_sums(
      h, weight, targets, weights, 0.1, 2)['loss'])(hidden)
  np.testing.assert_allclose(scaled, 3.0 * once, rtol=1e-6)


# ----------------------------------------------------------------------------- switches:
# attention kernel, compute dtype, rematerialisation


def lm_model(**overrides):
  """A small DecoderLM (RoPE, RMSNorm, SwiGLU)."""
  return make_model(kind='decoder_lm', position_embedding='rope', norm='rmsnorm',
                    activation='swiglu', **overrides)


def loss_and_grads(model, batch, deterministic: bool = True):
  """(summed loss, logits, gradients w.r.t. the parameters), computed eagerly (cheaper
  than compiling each variant for models this small)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest, copy=True)(batch, deterministic=deterministic)
    sums = losses.cross_entropy_sums(logits, batch['targets'], batch['targets_segment_ids'] > 0)
    return sums['loss'], logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, logits, grads


def assert_trees_close(actual, expected, rtol: float):
  """Every leaf within rtol of the largest magnitude of its expected leaf."""
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(actual),
                               jax.tree.leaves(expected)):
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all(), path
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(np.abs(want).max(), 1e-6),
                               err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['transformer', 'decoder_lm'])
def test_dot_product_attention_matches_einsum(kind):
  build = make_model if kind == 'transformer' else lm_model
  batch = packed_batch()  # packed pairs and padding rows (all-False mask rows)
  loss, logits, grads = loss_and_grads(build(), batch)
  dot_loss, dot_logits, dot_grads = loss_and_grads(build(attention='dot_product'), batch)
  assert np.isfinite(dot_logits).all()  # padding positions included
  np.testing.assert_allclose(dot_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dot_loss, loss, rtol=1e-6)
  assert_trees_close(dot_grads, grads, rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_fully_masked_query_rows_stay_finite(dtype):
  """A padding query (segment id 0) may attend nothing: both kernels give finite
  outputs (uniform weights) and finite gradients for it."""
  hidden = jax.random.normal(jax.random.key(0), (1, 3, 32))
  segments = jnp.array([[1, 1, 0]])
  mask = layers.attention_mask(segments, segments)
  assert not mask[0, 0, 2].any()
  outputs = {}
  for kind in ('einsum', 'dot_product'):
    attention = transformer.layers.Attention(32, 4, 0.0, rngs=nnx.Rngs(0), dtype=dtype,
                                           kind=kind)

    def total(hidden, attention=attention):
      keys, values = attention.project_kv(hidden)
      out = attention(hidden, keys, values, mask, deterministic=True)
      return out.astype(jnp.float32).sum(), out

    (_, outputs[kind]), grad = jax.value_and_grad(total, has_aux=True)(hidden)
    assert outputs[kind].dtype == dtype
    assert np.isfinite(np.asarray(outputs[kind], np.float32)).all(), kind
    assert np.isfinite(grad).all(), kind
  np.testing.assert_allclose(np.asarray(outputs['dot_product'], np.float32),
                             np.asarray(outputs['einsum'], np.float32),
                             atol=1e-5 if dtype == jnp.float32 else 5e-2)


@pytest.mark.slow
@pytest.mark.parametrize('kind, mode, dropout', [
    ('transformer', 'full', 0.0), ('transformer', 'dots', 0.0),
    ('decoder_lm', 'full', 0.1), ('decoder_lm', 'dots', 0.1)])
def test_remat_keeps_loss_and_gradients(kind, mode, dropout):
  # With dropout (on the cheaper LM) the recomputed forward must draw the same masks.
  build = make_model if kind == 'transformer' else lm_model
  rates = dict(dropout_rate=dropout, attention_dropout_rate=dropout)
  batch = packed_batch()
  loss, _, grads = loss_and_grads(build(**rates), batch, deterministic=not dropout)
  remat_loss, _, remat_grads = loss_and_grads(build(remat=mode, **rates), batch,
                                              deterministic=not dropout)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  assert_trees_close(remat_grads, grads, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('attention', ['einsum', 'dot_product'])
def test_bfloat16_compute_keeps_float32_params_and_logits(attention):
  batch = packed_batch()
  _, reference, _ = loss_and_grads(make_model(), batch)
  model = make_model(dtype='bfloat16', attention=attention)
  loss, logits, grads = loss_and_grads(model, batch)
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
      jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))
  assert logits.dtype == jnp.float32 and loss.dtype == jnp.float32
  assert np.isfinite(logits).all()
  # The activations really are bfloat16 ...
  encoded = model.encode(batch['inputs'], batch['inputs_segment_ids'],
                         batch['inputs_positions'])
  assert encoded.dtype == jnp.bfloat16
  # ... and the logits are those of float32 up to bfloat16 rounding (~1% of their
  # spread: the logits here span about +-5, their differences stay near 0.03).
  difference = np.abs(np.asarray(logits) - np.asarray(reference))
  assert 0 < difference.max() < 0.02 * np.ptp(np.asarray(reference)), (
      difference.max(), np.ptp(np.asarray(reference)))


def test_bfloat16_cached_decoding_matches_full_recomputation():
  model = make_model(dtype='bfloat16')
  batch = packed_batch()
  source_segments = (batch['inputs_segment_ids'] > 0).astype(jnp.int32)
  source_positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  encoded = model.encode(batch['inputs'], source_segments, source_positions)
  tokens = jnp.asarray(np.random.default_rng(1).integers(4, 40, (2, 6)), jnp.int32)
  full = model.decode(encoded, source_segments, tokens, jnp.ones_like(tokens),
                      jnp.broadcast_to(jnp.arange(6), (2, 6)))
  cache = model.init_cache(encoded, source_segments, max_length=6)
  assert cache.layers[0].keys.dtype == jnp.bfloat16
  for index in range(6):
    step_logits, cache = model.decode_step(cache, tokens[:, index], index)
    assert step_logits.dtype == jnp.float32 and step_logits.shape == (2, 40)
    np.testing.assert_allclose(step_logits, full[:, index], atol=5e-2)


def test_bfloat16_language_model_decodes_with_a_bfloat16_cache():
  model = lm_model(dtype='bfloat16', attention='dot_product')
  cache = model.init_cache(2, 4)
  assert cache.layers[0].keys.dtype == jnp.bfloat16
  tokens = jnp.array([5, 6], jnp.int32)
  for index in range(4):
    logits, cache = model.decode_step(cache, tokens, index)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 40)
    assert np.isfinite(logits).all()
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)


@pytest.mark.parametrize('pre_layer_norm', [True, False])
def test_language_model_follows_pre_layer_norm(pre_layer_norm):
  """The LM's logits are those of a hand-written stack over its own parameters: pre-LN
  `x + f(norm(x))` and a final norm, or post-LN `norm(x + f(x))` and no final norm."""
  model = lm_model(pre_layer_norm=pre_layer_norm)  # RoPE: no position embedding
  batch = packed_batch()
  segments, positions = batch['targets_segment_ids'], batch['targets_positions']
  mask = layers.attention_mask(segments, segments, causal=True)

  def self_attention(block, normed):
    keys, values = block.self_attention.project_kv(normed)
    return block.self_attention(normed, transformer.layers.apply_rope(keys, positions), values,
                                mask, deterministic=True, query_positions=positions)

  mlp = lambda block, normed: block.mlp(normed, deterministic=True)
  hidden = model.embed(batch['decoder_inputs'])
  for block in model.decoder_layers:
    for norm, sublayer in ((block.self_attention_norm, self_attention),
                           (block.mlp_norm, mlp)):
      if pre_layer_norm:
        hidden = hidden + sublayer(block, norm(hidden))
      else:
        hidden = norm(hidden + sublayer(block, hidden))
  if pre_layer_norm:
    hidden = model.final_norm(hidden)
  else:
    assert model.final_norm is None
  np.testing.assert_allclose(model(batch), model.embed.attend(hidden), rtol=1e-5, atol=1e-5)


def test_dot_product_attention_refuses_attention_dropout():
  with pytest.raises(ValueError, match='no attention dropout'):
    make_model(attention='dot_product', attention_dropout_rate=0.1)
