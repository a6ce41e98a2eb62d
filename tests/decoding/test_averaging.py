"""decoding/averaging: averaged checkpoints (--mode=average) are the mean of the last
checkpoints, loadable by name, and refused where they cannot be made or read."""

import jax
import numpy as np
import pytest

from jaxnmt.decoding import averaging
from jaxnmt.decoding import inference
from jaxnmt.errors import CheckpointError, UserError
from jaxnmt.runtime import checkpointing


def _leaves(params) -> list[np.ndarray]:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


def test_average_is_the_mean_of_the_last_checkpoints(ema_copy):
  info = averaging.average(ema_copy, last=3)
  assert info['steps'] == [10, 15, 20] and info['name'] == 'last3'
  loaded = inference.load(ema_copy, weights='last3')
  assert (loaded.step, loaded.weights) == (20, 'last3')
  reader = checkpointing.Checkpointer(ema_copy, read_only=True)
  try:
    each = [_leaves(reader.restore_params(step, loaded.abstract_params))
            for step in (10, 15, 20)]
  finally:
    reader.close()
  for index, leaf in enumerate(_leaves(loaded.params)):
    np.testing.assert_allclose(leaf, np.mean([params[index] for params in each], axis=0),
                               rtol=1e-5, atol=1e-7)
  assert 'last3' in averaging.available(ema_copy)


def test_average_refuses_what_it_cannot_do(ema_copy):
  with pytest.raises(CheckpointError, match='fewer than --average_last=9'):
    averaging.average(ema_copy, last=9)
  with pytest.raises(UserError, match='average_name'):
    averaging.average(ema_copy, last=2, name='ema')
  with pytest.raises(UserError, match='average_name'):
    averaging.average(ema_copy, last=2, name='../x')
  with pytest.raises(CheckpointError, match="no weights named 'nothing'"):
    inference.load(ema_copy, weights='nothing')
  averaging.average(ema_copy, last=2, name='two')
  with pytest.raises(CheckpointError, match='drop --checkpoint_step'):
    inference.load(ema_copy, step=10, weights='two')
