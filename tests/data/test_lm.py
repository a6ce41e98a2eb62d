"""data/lm: language-model batches are shifted contiguous blocks, and resume."""

import numpy as np

from jaxnmt.data import lm as lm_lib


def test_lm_batches_are_shifted_contiguous_blocks_and_resume():
  ids = np.arange(10, 1010, dtype=np.int32)
  dataset = lm_lib.make_lm_dataset(ids, batch_size=4, block_length=16, seed=0)
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
