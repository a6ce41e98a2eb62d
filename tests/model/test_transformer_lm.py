"""model/transformer as a decoder-only language model: cached generation gives the
logits of full recomputation, under every switch of the LM."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnmt.data import lm as lm_lib
from jaxnmt.model import transformer


def lm_model(**overrides):
  settings = dict(vocab_size=40, num_decoder_layers=2, d_model=32, num_heads=4, d_ff=64,
                  dropout_rate=0.0, attention_dropout_rate=0.0, kind='decoder_lm',
                  norm='rmsnorm', position_embedding='rope', activation='swiglu',
                  max_length=32)
  config = transformer.ModelConfig(**{**settings, **overrides})
  return transformer.build(config, rngs=nnx.Rngs(params=0, dropout=1))


# Every switch of the LM, each value at least once: the defaults of `lm_model` are
# pre-LN, rmsnorm, swiglu, RoPE and shared embeddings.
@pytest.mark.parametrize('overrides', [
    {},
    {'position_embedding': 'learned', 'norm': 'layernorm', 'activation': 'gelu',
     'share_embeddings': False},
    {'pre_layer_norm': False, 'position_embedding': 'sinusoidal', 'norm': 'layernorm',
     'activation': 'relu'},
    {'pre_layer_norm': False, 'share_embeddings': False},
    {'pre_layer_norm': False, 'activation': 'swish', 'attention_bias': True,
     'output_bias': True, 'decoder_start': 'zeros', 'position_embedding': 'sinusoidal',
     'norm': 'layernorm'},
    {'activation': 'gelu_sigmoid', 'attention_bias': True, 'share_embeddings': False,
     'output_bias': True},
])
def test_cached_generation_equals_full_recomputation(overrides):
  model = lm_model(**overrides)
  rng = np.random.default_rng(0)
  for path, value in nnx.iter_graph(model):  # biases start at zero: make them count
    if isinstance(value, nnx.Param) and 'bias' in str(path[-1]):
      value[...] = value[...] + 0.3 * rng.standard_normal(value.shape).astype(np.float32)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (2, 10)), jnp.int32)
  batch = lm_lib.lm_batch(np.concatenate([np.asarray(tokens), np.zeros((2, 1), np.int32)], 1))
  full = model({k: jnp.asarray(v) for k, v in batch.items()})
  assert np.isfinite(full).all()
  cache = model.init_cache(2, 10)
  for index in range(10):
    logits, cache = model.decode_step(cache, tokens[:, index], index)
    np.testing.assert_allclose(logits, full[:, index], rtol=1e-4, atol=1e-4)
