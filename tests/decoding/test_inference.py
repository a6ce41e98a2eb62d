"""decoding/inference: loading a model restores its parameters alone (no optimizer
state), the moving average by default where the run kept one, and raw weights else."""

import json
import os

import jax
import numpy as np
import pytest

from jaxnmt.decoding import inference
from jaxnmt.errors import CheckpointError


def _leaves(params) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def test_inference_restores_the_parameters_alone(trained_workdir):
  alive = jax.live_arrays()  # held, so no new array can reuse the id of a freed one
  before = {id(array) for array in alive}
  loaded = inference.load(trained_workdir)
  params_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(loaded.params))
  new_bytes = sum(array.nbytes for array in jax.live_arrays() if id(array) not in before)
  # AdamW's two moments would triple it; the RNG state of `rest` is a few bytes.
  assert params_bytes <= new_bytes < 1.1 * params_bytes, (params_bytes, new_bytes)


def test_ema_is_saved_and_inference_uses_it_by_default(ema_run):
  auto = inference.load(ema_run)
  assert (auto.step, auto.weights) == (20, 'ema')
  raw = inference.load(ema_run, weights='raw')
  ema = inference.load(ema_run, weights='ema')
  assert raw.weights == 'raw'
  for a, b in zip(_leaves(auto.params), _leaves(ema.params)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(_leaves(raw.params), _leaves(ema.params)))
  # The trainer validated both.
  valid = [json.loads(line) for line in open(
      os.path.join(ema_run, 'valid', 'metrics.jsonl'), encoding='utf-8')]
  assert 'ema_loss' in valid[-1] and 'loss' in valid[-1]


def test_no_ema_asked_of_a_run_without_one(trained_workdir):
  assert inference.load(trained_workdir).weights == 'raw'
  with pytest.raises(CheckpointError, match='no moving average'):
    inference.load(trained_workdir, weights='ema')
