"""`--mode=bench` (commands/bench): what it measures and writes, and its FLOPs formula
against XLA's count. (tests/training/test_setup.py holds the bench's memory-fit tests.)"""

import json
import os

import jax
import pytest

from jaxnmt import config_lib
from jaxnmt.commands import bench
from jaxnmt.runtime import files
from jaxnmt.runtime import sharding
from jaxnmt.training import fit
from tests.tiny_config import tiny_config


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
