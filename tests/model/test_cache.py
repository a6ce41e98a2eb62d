"""The decoder cache's contract (jaxnmt/model/cache.py): the model's cached step and the
searches' handling of the cache (windows, beam slots, history) agree through it."""

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnmt.model import cache as cache_lib
from jaxnmt.model import transformer
from tests import helpers

PACKAGE = os.path.join(helpers.ROOT, 'jaxnmt')
BOS = 2


@pytest.fixture(scope='module')
def encoded():
  """A small translation model (4 heads of 8) and 2 encoded sentences, one padded."""
  config = transformer.ModelConfig(vocab_size=30, num_encoder_layers=1, num_decoder_layers=2,
                                   d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0,
                                   attention_dropout_rate=0.0, position_embedding='rope')
  model = transformer.Transformer(config, rngs=nnx.Rngs(params=1, dropout=2))
  inputs = jnp.asarray(np.random.default_rng(0).integers(4, 30, (2, 5)), jnp.int32)
  inputs = inputs.at[1, 3:].set(0)
  segments = (inputs > 0).astype(jnp.int32)
  return model, model.encode(inputs, segments, jnp.broadcast_to(jnp.arange(5), (2, 5))), segments


def test_beam_slots_read_what_reordered_rows_read(encoded):
  """Steps through beam slots, in growing windows, with the history moved as beams
  change, give the logits of per-row caches that are reordered instead: the model
  writes and reads the slots where the contract puts them."""
  model, states, segments = encoded
  k, length = 3, 7
  step = jax.jit(model.decode_step)
  _, cache = step(model.init_cache(states, segments, length).resized(2),
                  jnp.full((2,), BOS, jnp.int32), 0)
  rows = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache.resized(length))  # ROWS
  beams = cache.for_beams(k, length)
  assert beams.layout == cache_lib.BEAMS and beams.group == k
  own_beam = jnp.arange(2 * k) % k
  rng = np.random.default_rng(3)
  for index, window in zip(range(1, length), [2, 4, 4, 7, 7, 7]):
    tokens = jnp.asarray(rng.integers(4, 30, 2 * k), jnp.int32)
    beams = beams.resized(window)
    beams = beams._replace(history=beams.history.at[:, index].set(own_beam))
    beam_logits, beams = step(beams, tokens, index)
    row_logits, rows = step(rows, tokens, index)
    np.testing.assert_allclose(beam_logits, row_logits, rtol=1e-5, atol=1e-5)
    # New beam j of sentence b continues old beam parents[b, j] (some twice, some not).
    parents = rng.integers(0, k, (2, k))
    order = (np.arange(2)[:, None] * k + parents).reshape(-1)
    beams = beams._replace(history=beams.history[order])
    rows = jax.tree.map(lambda x, order=order: x[order], rows)
  assert beams.layers[0].keys.shape == (2, 4, 8, length * k)  # [B, N, H, T * K]
  assert beams.layers[0].cross_keys.shape[0] == 2  # shared, never repeated


def test_beam_keys_in_the_rows_order_are_refused(encoded):
  model, states, segments = encoded
  cache = model.init_cache(states, segments, 6)
  _, cache = model.decode_step(cache, jnp.full((2,), BOS, jnp.int32), 0)
  beams = cache.for_beams(3, 6)
  wrong = beams._replace(layers=tuple(
      layer._replace(keys=jnp.swapaxes(layer.keys, 2, 3)) for layer in beams.layers))
  with pytest.raises(ValueError, match='BNHT'):
    model.decode_step(wrong, jnp.full((6,), 5, jnp.int32), 1)


def test_for_beams_keeps_each_rows_slots_as_beam_zero():
  rng = np.random.default_rng(0)
  keys, values, cross = (jnp.asarray(rng.standard_normal((2, 4, 5, 8)), jnp.float32)
                         for _ in range(3))
  source = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.int32)
  cache = cache_lib.DecoderCache((cache_lib.LayerCache(keys, values, cross, cross),), source)
  beams = cache.for_beams(3, 9)
  layer = beams.layers[0]
  assert layer.keys.shape == (2, 4, 8, 15) and layer.values.shape == (2, 4, 15, 8)
  np.testing.assert_array_equal(layer.keys[..., ::3], jnp.swapaxes(keys, 2, 3))  # slot t*K
  np.testing.assert_array_equal(layer.values[:, :, ::3], values)
  assert not np.asarray(layer.keys[..., 1::3]).any() and not np.asarray(
      layer.values[:, :, 2::3]).any()
  assert layer.cross_keys is cross and layer.cross_values is cross
  np.testing.assert_array_equal(beams.source_segment_ids, np.repeat(source, 3, axis=0))
  assert beams.history.shape == (6, 9) and not np.asarray(beams.history).any()
  # Windows: cut or zero-padded on the slot axis of each layout, written slots kept.
  assert beams.resized(2).layers[0].keys.shape == (2, 4, 8, 6)
  padded = beams.resized(7).layers[0]
  assert padded.values.shape == (2, 4, 21, 8) and not np.asarray(padded.values[:, :, 15:]).any()
  np.testing.assert_array_equal(padded.keys[..., :15], layer.keys)
  assert cache.resized(3).layers[0].keys.shape == (2, 4, 3, 8)


def test_a_row_sees_the_slots_its_history_names():
  empty = cache_lib.LayerCache.empty(1, 1, 3 * 2, 4, jnp.float32)  # 1 sentence, 2 beams
  beams = cache_lib.DecoderCache((empty,), history=jnp.array([[0, 1, 0], [0, 0, 1]]))
  visible = np.asarray(beams.visible(1))[:, 0, 0]                   # [2 rows, 6 slots]
  # Slot t*2 + g is beam g's position t: row 0 reads beam 0 at 0, beam 1 at 1.
  np.testing.assert_array_equal(visible, [[1, 0, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0]])
  rows = cache_lib.DecoderCache((cache_lib.LayerCache.empty(2, 1, 4, 4, jnp.float32),))
  np.testing.assert_array_equal(np.asarray(rows.visible(2))[:, 0, 0],
                                [[1, 1, 1, 0], [1, 1, 1, 0]])


def test_no_module_names_a_cache_entry_by_a_string():
  """The model and the searches reach the cache's slots, cross arrays and history as
  fields of cache.py's types, never by string keys (as the 'slot_beams' of an earlier
  layout was)."""
  names = set(cache_lib.LayerCache._fields) | {'layers', 'history', 'slot_beams'}
  for module in ('model/transformer.py', 'model/layers.py', 'decoding/search.py',
                 'decoding/translation.py'):
    with open(os.path.join(PACKAGE, module), encoding='utf-8') as handle:
      tree = ast.parse(handle.read())
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}
    assert not strings & names, (module, strings & names)
