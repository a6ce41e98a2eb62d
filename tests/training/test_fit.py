"""training/fit: the memory fit takes the largest batch whose compiled step fits."""

import pytest

from jaxnmt import config_lib
from jaxnmt import errors
from jaxnmt.runtime import sharding
from jaxnmt.training import fit
from tests.tiny_config import tiny_config


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
