"""`--mode=bench` and the training loop build their run alike (jaxnmt/training/setup.py):
the same fitted batch, the same train state (moving average included), the same step."""

import json
import os

import pytest

from jaxnmt import config_lib
from jaxnmt.commands import bench
from jaxnmt.runtime import files
from jaxnmt.runtime import sharding
from jaxnmt.training import fit
from jaxnmt.training import loop
from jaxnmt.training import setup
from tests.tiny_config import tiny_config


@pytest.fixture(scope='module')
def fitted_config(small_corpus):
  """A tiny config of 16-row batches with a moving average, and a memory limit between
  the steps of 8 and 16 rows (8 is the least on the tests' 8 devices): the memory fit
  halves the batch."""
  config = tiny_config(small_corpus)
  config.data.batch_size = 16
  config.ema_decay = 0.9
  mesh, rules = sharding.plan_mesh(config)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  need = {rows: fit.step_bytes(fit.compile_train_step(config, model_cfg, mesh, rules, rows))
          for rows in (8, 16)}
  assert need[8] < need[16]
  config.data.fit_batch_to_memory = True
  config.data.device_memory_gb = (need[8] + need[16]) / 2 / 2**30
  return config


@pytest.mark.slow
def test_setup_builds_the_fitted_batch_and_the_moving_average(fitted_config, tmp_path):
  config = fitted_config.copy_and_resolve_references()
  mesh, rules = setup.plan(config)
  run, state = setup.build(config, str(tmp_path), mesh, rules)
  assert config.data.batch_size == 8
  assert run.memory_fit['rows'] == 8 and sorted(run.memory_fit['bytes_by_rows']) == [8, 16]
  assert set(state) == {'params', 'opt_state', 'step', 'ema'}
  iterator = iter(run.inputs.train_data)
  assert next(iterator)['targets'].shape[0] == 8  # the inputs were rebuilt for 8 rows
  iterator.close()


@pytest.mark.slow
def test_bench_times_the_step_the_memory_fit_measured(fitted_config, tmp_path):
  config = fitted_config.copy_and_resolve_references()
  bench.run(config, str(tmp_path), steps=1, warmup=0, decode_sentences=0)
  saved = json.load(open(os.path.join(tmp_path, files.BENCH)))
  assert saved['config']['data']['batch_size'] == 16  # as asked ...
  assert saved['batch_rows'] == saved['memory_fit']['rows'] == 8  # ... and as run
  # The timed step is the training step the fit compiled, moving average included.
  assert saved['compiled_step_bytes_per_device'] == saved['memory_fit']['bytes_by_rows']['8']
  assert not os.path.exists(os.path.join(tmp_path, files.CONFIG))  # bench saves no config


@pytest.mark.slow
def test_training_saves_the_fitted_batch_size(fitted_config, tmp_path):
  config = fitted_config.copy_and_resolve_references()
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
  config.num_text_samples = 0
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 2 and 'valid_ema_loss' in result
  assert files.load_config(str(tmp_path)).data.batch_size == 8
