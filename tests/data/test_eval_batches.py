"""data/eval_batches: fixed-size evaluation batches, the last one padded."""

from jaxnmt.data import eval_batches
from jaxnmt.data import tokenizer as tokenizer_lib


def test_eval_batches_pad_the_last_batch():
  tokenizer = tokenizer_lib.CharTokenizer.__new__(tokenizer_lib.CharTokenizer)
  tokenizer.characters, tokenizer._ids = ['H', 'o'], {'H': 4, 'o': 5}  # pylint: disable=protected-access
  batches = list(eval_batches.make_eval_batches([('Ho', 'oH')] * 5, tokenizer, batch_size=4,
                                            max_source_length=16, max_target_length=16))
  assert len(batches) == 2
  assert (batches[1]['targets_segment_ids'][1:] == 0).all()
  assert (batches[1]['targets_segment_ids'][0] > 0).any()
