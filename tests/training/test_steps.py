"""training/steps: the train step learns (a few batches overfitted, translation and
LM), gives the one-batch update under gradient accumulation and the fused (chunked)
loss, never holds the logits with the fused loss, keeps float32 master weights under
bfloat16, and moves the parameter average on its schedule."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import lm_char
from jaxnmt import config_lib
from jaxnmt.data import lm as lm_lib
from jaxnmt.model import transformer
from jaxnmt.runtime import sharding
from jaxnmt.training import fit
from jaxnmt.training import optim
from jaxnmt.training import steps
from tests.helpers import create_model, first_batches, new_state, train_step_fn
from tests.tiny_config import tiny_config


@pytest.fixture(scope='module', name='batches')
def _batches(small_corpus, tmp_path_factory) -> list[dict]:
  """The first two training batches of the tiny config on the small corpus."""
  return first_batches(tiny_config(small_corpus), str(tmp_path_factory.mktemp('run')), 2)


def _one_step(model_cfg, config, batch, **step_options):
  """(state, sums) of one train step from the seed-0 model."""
  tx, _ = optim.make_optimizer(config.optim, 100)
  graphdef, params, rest = create_model(model_cfg, seed=0)
  step = train_step_fn(graphdef, tx, label_smoothing=0.1, **step_options)
  return jax.device_get(step(new_state(params, tx), rest, batch))


def test_loss_falls_when_overfitting_a_few_batches(small_corpus, batches):
  config = tiny_config(small_corpus)
  config.model.dropout_rate = 0.0
  config.model.d_model = 64
  config.model.d_ff = 128
  config.optim.learning_rate = 3e-3
  tx, _ = optim.make_optimizer(config.optim, 100)
  graphdef, params, rest = create_model(
      config_lib.model_config(config, config.tokenizer.vocab_size), seed=0)
  state = new_state(params, tx)
  step = train_step_fn(graphdef, tx)
  losses = []
  for i in range(120):
    state, sums = step(state, rest, batches[i % 2])
    losses.append(float(sums['loss'] / sums['tokens']))
  assert int(state['step']) == 120
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_tiny_lm_overfits_one_batch():
  config = lm_char.get_config()
  config.optim.warmup_steps = 5
  config.optim.learning_rate = 3e-3
  model_cfg = transformer.ModelConfig(vocab_size=64, num_decoder_layers=2, d_model=32,
                                      num_heads=4, d_ff=64, dropout_rate=0.0,
                                      attention_dropout_rate=0.0, kind='decoder_lm',
                                      position_embedding='rope', max_length=32)
  tx, _ = optim.make_optimizer(config.optim, 200)
  graphdef, params, rest = create_model(model_cfg, 0)
  state = new_state(params, tx)
  step = train_step_fn(graphdef, tx)
  batch = lm_lib.lm_batch(np.random.default_rng(0).integers(4, 64, (4, 33)).astype(np.int32))
  losses = []
  for _ in range(120):
    state, sums = step(state, rest, batch)
    losses.append(float(sums['loss'] / sums['tokens']))
  # From about ln(60) (uniform over the used ids) to a memorised batch.
  assert losses[0] > 3.5 and losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


@pytest.mark.slow
def test_gradient_accumulation_gives_the_one_batch_update(small_corpus, batches):
  config = tiny_config(small_corpus)
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  batch = {key: value.copy() for key, value in batches[0].items()}
  # Empty two rows of the second micro-batch (rows 1, 3, 5, 7) so the micro-batches
  # hold very different numbers of target tokens: a mean of per-micro-batch means
  # would then differ from the token-weighted update.
  for key in batch:
    batch[key][[1, 3]] = 0
  tokens = (batch['targets_segment_ids'] > 0).sum(axis=1)
  assert tokens[0::2].sum() > 1.5 * tokens[1::2].sum()
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  results = {accumulate: _one_step(model_cfg, config, batch, accumulate=accumulate)
             for accumulate in (1, 2, 4)}
  for accumulate in (2, 4):
    (state, sums), (reference, reference_sums) = results[accumulate], results[1]
    for key in ('loss', 'tokens', 'source_tokens', 'grad_norm'):
      np.testing.assert_allclose(sums[key], reference_sums[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state['params'], reference['params'])


@pytest.mark.slow
@pytest.mark.parametrize('kind,shared', [('transformer', True), ('transformer', False),
                                         ('decoder_lm', True)])
def test_fused_loss_gives_the_plain_update(small_corpus, batches, kind, shared):
  config = tiny_config(small_corpus)
  model_cfg = dataclasses.replace(config_lib.model_config(config, config.tokenizer.vocab_size),
                                  kind=kind, share_embeddings=shared)
  # 5 slices of the 24-token rows: the last one padded.
  (state, sums), (reference, reference_sums) = (
      _one_step(model_cfg, config, batches[0], loss_chunks=chunks) for chunks in (5, 0))
  for key in ('loss', 'nll', 'correct', 'tokens', 'grad_norm'):
    np.testing.assert_allclose(sums[key], reference_sums[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state['params'], reference['params'])


@pytest.mark.slow
def test_fused_loss_never_holds_the_logits(small_corpus):
  config = tiny_config(small_corpus)
  mesh, rules = sharding.plan_mesh(config)
  # A vocabulary large enough for the logits to dominate the step's temporaries.
  model_cfg = dataclasses.replace(config_lib.model_config(config, 400), vocab_size=8000)
  rows_per_device = 8
  temporaries = {}
  for chunks in (0, 8):
    config.optim.loss_chunks = chunks
    compiled = fit.compile_train_step(config, model_cfg, mesh, rules,
                                      rows_per_device * mesh.size)
    temporaries[chunks] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = rows_per_device * config.data.max_target_length * 8000 * 4  # per device
  assert temporaries[8] + 2 * logits_bytes < temporaries[0]


@pytest.mark.slow
def test_bfloat16_training_step_keeps_float32_master_weights(small_corpus, batches):
  config = tiny_config(small_corpus)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    state, sums = _one_step(config_lib.model_config(config, config.tokenizer.vocab_size),
                            config, batches[0])
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state['params']))
    assert np.isfinite(sums['grad_norm']) and sums['grad_norm'] > 0
    losses[dtype] = sums['loss'] / sums['tokens']
  # Same parameters and batch: the bf16 loss is the float32 loss up to rounding.
  assert abs(losses['bfloat16'] - losses['float32']) < 0.02 * losses['float32']


def test_update_ema_follows_its_schedule():
  ema, params = {'w': np.zeros(3, np.float32)}, {'w': np.ones(3, np.float32)}
  # Step 0: rate min(0.99, 1/10) = 0.1, so the average moves 90% of the way.
  first = steps.update_ema(ema, params, np.int32(0), 0.99)
  np.testing.assert_allclose(first['w'], 0.9, rtol=1e-6)
  # Late: the rate is the decay itself.
  late = steps.update_ema(ema, params, np.int32(100_000), 0.99)
  np.testing.assert_allclose(late['w'], 0.01, rtol=1e-4)
