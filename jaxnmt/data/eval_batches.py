"""Evaluation batches: one (source, target) pair per row, in order, padded to fixed
lengths (the eval worker and the trainer's validation read them). Training batches are
packed and streamed instead (`pipeline.TrainStream`); both have the same keys.
"""

from typing import Iterator, Sequence

import numpy as np

from jaxnmt.data import tokenizer as tokenizer_lib


def encode_pair(pair: tuple[str, str], tokenizer, max_source_length: int,
                max_target_length: int) -> dict[str, np.ndarray]:
  """One example: source + EOS, BOS + target (decoder input), target + EOS."""
  source_ids = tokenizer.encode(pair[0])[:max_source_length - 1]
  target_ids = tokenizer.encode_target(pair[1])[:max_target_length - 1]
  return {
      'inputs': np.asarray(source_ids + [tokenizer_lib.EOS_ID], np.int32),
      'decoder_inputs': np.asarray([tokenizer_lib.BOS_ID] + target_ids, np.int32),
      'targets': np.asarray(target_ids + [tokenizer_lib.EOS_ID], np.int32),
  }


def make_eval_batches(pairs: Sequence[tuple[str, str]], tokenizer, *, batch_size: int,
                      max_source_length: int,
                      max_target_length: int) -> Iterator[dict[str, np.ndarray]]:
  """Padded batches, one pair per row, in order; the last batch is padded with empty
  rows (segment id 0, so they carry no weight)."""
  for start in range(0, len(pairs), batch_size):
    chunk = [encode_pair(p, tokenizer, max_source_length, max_target_length)
             for p in pairs[start:start + batch_size]]
    yield pad_examples(chunk, batch_size, max_source_length, max_target_length)


def pad_examples(examples: Sequence[dict[str, np.ndarray]], batch_size: int,
                 max_source_length: int, max_target_length: int) -> dict[str, np.ndarray]:
  lengths = {'inputs': max_source_length, 'decoder_inputs': max_target_length,
             'targets': max_target_length}
  batch = {key: np.zeros((batch_size, length), np.int32) for key, length in lengths.items()}
  for side in ('inputs', 'targets'):
    batch[f'{side}_segment_ids'] = np.zeros((batch_size, lengths[side]), np.int32)
    batch[f'{side}_positions'] = np.zeros((batch_size, lengths[side]), np.int32)
  for row, example in enumerate(examples):
    for key in lengths:
      batch[key][row, :len(example[key])] = example[key]
    for side in ('inputs', 'targets'):
      length = len(example[side])
      batch[f'{side}_segment_ids'][row, :length] = 1
      batch[f'{side}_positions'][row, :length] = np.arange(length)
  return batch
