"""The speed features: gradient accumulation, device prefetch, packing, memory fit, the
FLOPs formula and `--mode=bench`."""

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnmt.commands import bench
from jaxnmt import config_lib
from jaxnmt.data import pipeline
from jaxnmt.data import records as records_lib
from jaxnmt import errors
from jaxnmt.training import feeding
from jaxnmt.data import inputs
from jaxnmt.training import fit
from jaxnmt.training import optim
from jaxnmt.runtime import sharding
from jaxnmt.training import steps
from jaxnmt.model import initialize
from jaxnmt.runtime import files
from tests.conftest import real_pairs
from tests.tiny_config import tiny_config


def _first_batches(config, workdir, count):
  iterator = iter(inputs.training_inputs(config, workdir).train_data)
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  return batches


@pytest.mark.slow
def test_gradient_accumulation_gives_the_one_batch_update(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  batch = _first_batches(config, str(tmp_path), 1)[0]
  # Empty two rows of the second micro-batch (rows 1, 3, 5, 7) so the micro-batches
  # hold very different numbers of target tokens: a mean of per-micro-batch means
  # would then differ from the token-weighted update.
  for key in batch:
    batch[key][[1, 3]] = 0
  tokens = (batch['targets_segment_ids'] > 0).sum(axis=1)
  assert tokens[0::2].sum() > 1.5 * tokens[1::2].sum()
  tx, _ = optim.make_optimizer(config.optim, 100)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  graphdef, params, rest = initialize.create_model(model_cfg, seed=0)
  results = {}
  for accumulate in (1, 2, 4):
    state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
    step = jax.jit(functools.partial(steps.train_step, graphdef, tx, 0.1, 0, accumulate))
    results[accumulate] = jax.device_get(step(state, rest, batch))
  for accumulate in (2, 4):
    (state, sums), (reference, reference_sums) = results[accumulate], results[1]
    for key in ('loss', 'tokens', 'source_tokens', 'grad_norm'):
      np.testing.assert_allclose(sums[key], reference_sums[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state['params'], reference['params'])


@pytest.mark.slow
@pytest.mark.parametrize('kind,shared', [('transformer', True), ('transformer', False),
                                         ('decoder_lm', True)])
def test_fused_loss_gives_the_plain_update(small_corpus, tmp_path, kind, shared):
  config = tiny_config(small_corpus)
  batch = _first_batches(config, str(tmp_path), 1)[0]
  tx, _ = optim.make_optimizer(config.optim, 100)
  model_cfg = dataclasses.replace(config_lib.model_config(config, config.tokenizer.vocab_size),
                                  kind=kind, share_embeddings=shared)
  graphdef, params, rest = initialize.create_model(model_cfg, seed=0)
  results = {}
  for chunks in (0, 5):  # 5 slices of the 24-token rows: the last one padded
    state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
    step = jax.jit(functools.partial(steps.train_step, graphdef, tx, 0.1, 0, 1,
                                     loss_chunks=chunks))
    results[chunks] = jax.device_get(step(state, rest, batch))
  (state, sums), (reference, reference_sums) = results[5], results[0]
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


def test_loss_chunks_must_fit_the_target_length(small_corpus):
  from jaxnmt import config_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(small_corpus)
  for bad in (-1, 25):
    config.optim.loss_chunks = bad
    with pytest.raises(errors.ConfigError, match='loss_chunks'):
      config_lib.validate(config)


def test_accumulation_steps_must_divide_the_batch(small_corpus):
  from jaxnmt import config_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(small_corpus)
  config.optim.grad_accum_steps = 3
  with pytest.raises(errors.ConfigError, match='grad_accum_steps'):
    config_lib.validate(config)
  config.optim.grad_accum_steps = 2  # 8 rows / 2 = 4 per micro-batch, 8 devices
  with pytest.raises(errors.MeshError, match='batch=4'):
    config_lib.check_mesh(config, 8, 1)


def _pairs(count):
  return real_pairs(count)


def _dataset(tokenizer, packing=True):
  # The row lengths of configs/base.py.
  dtype = records_lib.record_dtype(tokenizer.vocab_size)
  pairs = _pairs(400)
  records = [records_lib.encode_record(source, target, dtype) for source, target in zip(
      tokenizer.encode_batch([s for s, _ in pairs]),
      tokenizer.encode_batch([t for _, t in pairs]))]
  return pipeline.TrainStream([records_lib.InMemorySource(records)], dtype, batch_size=8,
                              max_source_length=56, max_target_length=64, seed=0,
                              packing=packing)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  from jaxnmt.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  tokenizer_lib.train([side for pair in _pairs(400) for side in pair], path, vocab_size=600)
  return tokenizer_lib.load(path, 'unigram')


@pytest.mark.parametrize('depth', [0, 3])
def test_device_feeder_checkpoints_the_consumed_batch(tokenizer, depth):
  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  where = sharding.batch_sharding(mesh, [('batch', ('data',))])
  iterator = iter(_dataset(tokenizer))
  feeder = feeding.DeviceFeeder(iterator, where, depth)
  consumed = [next(feeder) for _ in range(2)]
  time.sleep(0.5)  # let the thread read ahead
  state = feeder.iterator_state()
  expected, slots = next(feeder)
  feeder.close()
  assert slots == 8 * 120 and consumed[0][0]['inputs'].sharding == where
  resumed = iter(_dataset(tokenizer))
  resumed.set_state(state)
  again = next(resumed)
  for key, value in again.items():
    np.testing.assert_array_equal(np.asarray(expected[key]), value)


def test_device_feeder_reraises_pipeline_errors():
  class Broken:
    def get_state(self):
      return {}

    def __next__(self):
      raise ValueError('bad line 7')

  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  feeder = feeding.DeviceFeeder(Broken(), sharding.batch_sharding(mesh, []), 2)
  with pytest.raises(ValueError, match='bad line 7'):
    next(feeder)
  feeder.close()


def test_packing_fills_most_slots_and_padding_does_not(tokenizer):
  fractions = {}
  for packing in (True, False):
    iterator = iter(_dataset(tokenizer, packing))
    fractions[packing] = np.mean([pipeline.real_token_fraction(next(iterator))
                                  for _ in range(5)])
    iterator.close()
  assert fractions[True] >= 0.85
  assert fractions[False] < 0.6 * fractions[True]


@pytest.mark.slow
def test_memory_fit_takes_the_largest_batch_that_fits(small_corpus):
  config = tiny_config(small_corpus)
  mesh, rules = sharding.plan_mesh(config)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  sizes = {rows: fit.step_bytes(fit.compile_train_step(config, model_cfg, mesh, rules, rows))
           for rows in (16, 32)}
  assert sizes[32] > sizes[16]
  config.data.device_memory_gb = (sizes[16] + sizes[32]) / 2 / 2**30
  rows, tried = fit.fit_batch_size(config, model_cfg, mesh, rules)
  assert rows == 16 and tried[16] <= config.data.device_memory_gb * 2**30 < tried[32]
  config.data.device_memory_gb = 1e-4  # 100 KiB: nothing fits
  with pytest.raises(errors.MeshError, match='no batch size fits'):
    fit.fit_batch_size(config, model_cfg, mesh, rules)


@pytest.mark.slow
def test_flops_formula_agrees_with_xla_on_a_full_batch(small_corpus):
  config = tiny_config(small_corpus)
  config.model.d_model, config.model.d_ff, config.model.num_heads = 128, 512, 4
  config.model.num_encoder_layers = config.model.num_decoder_layers = 2
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding_rules)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  rows, length = 16, config.data.max_source_length
  compiled = fit.compile_train_step(config, model_cfg, mesh, rules, rows)
  cost = compiled.cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)['flops']
  formula = bench.model_flops(model_cfg, rows * length, rows * length, length, length)
  # XLA also counts softmax, norms, the loss and AdamW: a few percent more.
  assert 0.85 < formula / xla_flops < 1.02, formula / xla_flops


@pytest.mark.slow
def test_bench_mode_reports_and_writes_json(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  result = bench.run(config, str(tmp_path), steps=2, warmup=1, decode_sentences=4,
                     decode_batch_size=8)
  saved = json.load(open(os.path.join(tmp_path, files.BENCH)))
  assert saved['real_tokens_per_sec'] == pytest.approx(result['real_tokens_per_sec'])
  assert saved['batch_rows'] == 8 and saved['parameters'] > 0
  assert 0.5 < saved['real_token_fraction'] <= 1.0
  assert saved['real_tokens_per_sec'] <= saved['padded_tokens_per_sec']
  assert saved['compile_seconds'] > 0 and saved['median_step_seconds'] > 0
  assert 0 < saved['mfu'] < 1 and saved['peak_flops_per_sec'] > 1e9
  assert saved['compiled_step_bytes_per_device'] > 0
  for name in ('greedy', 'beam4'):
    assert saved['decode'][name]['sentences_per_sec'] > 0
  assert saved['decode']['sentences'] == 4


def test_dropout_rng_auto_picks_philox_on_one_device_only():
  assert config_lib.dropout_rng('auto', 1) == 'philox4x32'
  assert config_lib.dropout_rng('auto', 8) == 'threefry2x32'
  assert config_lib.dropout_rng('rbg', 8) == 'rbg'
  with pytest.raises(errors.MeshError, match='one device only'):
    config_lib.dropout_rng('philox4x32', 2)


@pytest.mark.slow
def test_bfloat16_training_step_keeps_float32_master_weights(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  batch = _first_batches(config, str(tmp_path), 1)[0]
  tx, _ = optim.make_optimizer(config.optim, 100)
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    graphdef, params, rest = initialize.create_model(
        config_lib.model_config(config, config.tokenizer.vocab_size), seed=0)
    state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
    step = jax.jit(functools.partial(steps.train_step, graphdef, tx, 0.1, 0, 1))
    state, sums = jax.device_get(step(state, rest, batch))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state['params']))
    assert np.isfinite(sums['grad_norm']) and sums['grad_norm'] > 0
    losses[dtype] = sums['loss'] / sums['tokens']
  # Same parameters and batch: the bf16 loss is the float32 loss up to rounding.
  assert abs(losses['bfloat16'] - losses['float32']) < 0.02 * losses['float32']
