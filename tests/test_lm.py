"""Decoder-only language models: RoPE, the char tokenizer, LM batches, cached generation,
and training + generation end to end on Tiny Shakespeare."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_char
from jaxnmt.data import lm as data
from jaxnmt.model import layers
from jaxnmt.model import transformer
from jaxnmt.training import steps
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.model import initialize
from tests.conftest import SHARED_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(SHARED_DATA, 'tinyshakespeare.txt')


def test_rope_scores_depend_only_on_relative_position():
  query, key = jax.random.normal(jax.random.key(0), (2, 1, 1, 2, 16))
  def score(query_position, key_position):
    rotated_query = layers.apply_rope(query, jnp.array([[query_position]]))
    rotated_key = layers.apply_rope(key, jnp.array([[key_position]]))
    return jnp.einsum('BLNH,BLNH->N', rotated_query, rotated_key)
  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(score(0, 0), score(57, 57), rtol=1e-4, atol=1e-5)
  assert not np.allclose(score(3, 1), score(3, 2), atol=1e-3)
  # Rotation keeps norms.
  np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(query, jnp.array([[9]]))),
                             jnp.linalg.norm(query), rtol=1e-5)


def test_char_tokenizer_round_trips_the_training_text(tmp_path):
  text = open(SHAKESPEARE, encoding='utf-8').read()
  train_text, valid_text = data.split_text(text, 0.1)
  assert len(train_text) + len(valid_text) == 1_115_394
  tokenizer = tokenizer_lib.train_chars(train_text, str(tmp_path / 'chars.json'))
  assert tokenizer.vocab_size == len(set(train_text)) + 4
  assert tokenizer.decode(tokenizer.encode(train_text)) == train_text
  reloaded = tokenizer_lib.load(str(tmp_path / 'chars.json'), 'char')
  assert reloaded.encode('ROMEO:') == tokenizer.encode('ROMEO:')
  assert tokenizer.encode('€')[0] == tokenizer_lib.UNK_ID


def test_lm_batches_are_shifted_contiguous_blocks_and_resume():
  ids = np.arange(10, 1010, dtype=np.int32)
  dataset = data.make_lm_dataset(ids, batch_size=4, block_length=16, seed=0)
  iterator = iter(dataset)
  batches = [next(iterator) for _ in range(3)]
  state = iterator.get_state()
  following = next(iterator)
  for batch in batches:
    np.testing.assert_array_equal(batch['decoder_inputs'][:, 1:], batch['targets'][:, :-1])
    np.testing.assert_array_equal(np.diff(batch['targets'], axis=1), 1)  # contiguous
    assert batch['targets'].shape == (4, 16)
  resumed = iter(dataset)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['targets'], following['targets'])
  iterator.close()
  resumed.close()


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
])
def test_cached_generation_equals_full_recomputation(overrides):
  model = lm_model(**overrides)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (2, 10)), jnp.int32)
  batch = data.lm_batch(np.concatenate([np.asarray(tokens), np.zeros((2, 1), np.int32)], 1))
  full = model({k: jnp.asarray(v) for k, v in batch.items()})
  assert np.isfinite(full).all()
  cache = model.init_cache(2, 10)
  for index in range(10):
    logits, cache = model.decode_step(cache, tokens[:, index], index)
    np.testing.assert_allclose(logits, full[:, index], rtol=1e-4, atol=1e-4)


def test_tiny_lm_overfits_one_batch():
  import functools  # pylint: disable=g-import-not-at-top
  from jaxnmt.training import optim  # pylint: disable=g-import-not-at-top
  config = lm_char.get_config()
  config.optim.warmup_steps = 5
  config.optim.learning_rate = 3e-3
  model_cfg = transformer.ModelConfig(vocab_size=64, num_decoder_layers=2, d_model=32,
                                    num_heads=4, d_ff=64, dropout_rate=0.0,
                                    attention_dropout_rate=0.0, kind='decoder_lm',
                                    position_embedding='rope', max_length=32)
  tx, _ = optim.make_optimizer(config.optim, 200)
  graphdef, params, rest = initialize.create_model(model_cfg, 0)
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
  step = jax.jit(functools.partial(steps.train_step, graphdef, tx, 0.0, 0, 1))
  blocks = np.random.default_rng(0).integers(4, 64, (4, 33)).astype(np.int32)
  batch = data.lm_batch(blocks)
  losses = []
  for _ in range(120):
    state, sums = step(state, rest, batch)
    losses.append(float(sums['loss'] / sums['tokens']))
  # From about ln(60) (uniform over the used ids) to a memorised batch.
  assert losses[0] > 3.5 and losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


@pytest.mark.slow
def test_char_lm_trains_evaluates_and_generates(tmp_path):
  workdir = str(tmp_path / 'lm')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  common = [sys.executable, '-m', 'jaxnmt.main', f'--workdir={workdir}']
  train_result = subprocess.run(
      common + ['--config=configs/lm_char.py', f'--config.data.path={SHAKESPEARE}',
                '--config.num_train_steps=30', '--config.model.num_decoder_layers=1',
                '--config.model.d_model=32', '--config.model.d_ff=64',
                '--config.data.max_target_length=32', '--config.data.batch_size=8',
                '--config.data.eval_batch_size=64', '--config.eval_every_steps=30',
                '--config.checkpoint_every_steps=30', '--config.mesh.tensor=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert train_result.returncode == 0, train_result.stderr[-3000:]
  assert 'validation loss' in train_result.stderr
  generated = subprocess.run(
      common + ['--mode=generate', '--prompt=ROMEO:', '--num_tokens=45', '--top_k=5',
                '--num_samples=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert generated.returncode == 0, generated.stderr[-3000:]
  assert generated.stdout.count('ROMEO:') == 2
  evaluated = subprocess.run(common + ['--mode=eval'], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'bits_per_char' in evaluated.stderr
