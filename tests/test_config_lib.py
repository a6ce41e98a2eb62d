"""config_lib's rules for the training speed options: the fused loss's chunks, gradient
accumulation and the dropout RNG (tests/test_config.py holds the other rules; these
join it once that file is free to edit)."""

import pytest

from jaxnmt import config_lib
from jaxnmt import errors
from tests.tiny_config import tiny_config


def test_loss_chunks_must_fit_the_target_length():
  config = tiny_config('')
  for bad in (-1, 25):
    config.optim.loss_chunks = bad
    with pytest.raises(errors.ConfigError, match='loss_chunks'):
      config_lib.validate(config)
  config.optim.loss_chunks = 24  # one token per chunk: allowed
  config_lib.validate(config)


def test_accumulation_steps_must_divide_the_batch():
  config = tiny_config('')
  config.optim.grad_accum_steps = 3
  with pytest.raises(errors.ConfigError, match='grad_accum_steps'):
    config_lib.validate(config)
  config.optim.grad_accum_steps = 2  # 8 rows / 2 = 4 per micro-batch, 8 devices
  with pytest.raises(errors.MeshError, match='batch=4'):
    config_lib.check_mesh(config, 8, 1)
  config_lib.check_mesh(config, 4, 1)  # 4 rows on 4 devices: fine


def test_dropout_rng_auto_picks_philox_on_one_device_only():
  assert config_lib.dropout_rng('auto', 1) == 'philox4x32'
  assert config_lib.dropout_rng('auto', 8) == 'threefry2x32'
  assert config_lib.dropout_rng('rbg', 8) == 'rbg'
  with pytest.raises(errors.MeshError, match='one device only'):
    config_lib.dropout_rng('philox4x32', 2)
