"""training/feeding: the device feeder reads ahead on a thread, yet checkpoints the
position of the batch the step consumed, and re-raises the pipeline's errors."""

import time

import numpy as np
import pytest

from jaxnmt.runtime import sharding
from jaxnmt.training import feeding
from tests.helpers import real_stream


@pytest.mark.parametrize('depth', [0, 3])
def test_device_feeder_checkpoints_the_consumed_batch(pairs_tokenizer, depth):
  mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  where = sharding.batch_sharding(mesh, [('batch', ('data',))])
  feeder = feeding.DeviceFeeder(iter(real_stream(pairs_tokenizer)), where, depth)
  consumed = [next(feeder) for _ in range(2)]
  time.sleep(0.5)  # let the thread read ahead
  state = feeder.iterator_state()
  expected, slots = next(feeder)
  feeder.close()
  assert slots == 8 * 120 and consumed[0][0]['inputs'].sharding == where
  resumed = iter(real_stream(pairs_tokenizer))
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
