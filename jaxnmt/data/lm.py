"""Language-model data: a text corpus held in memory (Tiny Shakespeare is 1 MB), its
contiguous validation tail, and a Grain pipeline of contiguous token blocks.

A batch holds the target-side keys of a translation batch (int32 [B, L]):
decoder_inputs, targets, targets_segment_ids, targets_positions.
"""

import logging
import os

import grain
import numpy as np

from jaxnmt.errors import DataError

# The map steps run inline in the one prefetch thread at the end of the pipeline.
_INLINE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def read_text(path: str) -> str:
  """A UTF-8 text corpus; undecodable bytes are replaced and reported once."""
  if not os.path.exists(path):
    raise DataError(f'config.data.path: no such file: {path}')
  raw = open(path, 'rb').read()
  text = raw.decode('utf-8', errors='replace')
  bad = text.count('\ufffd') - raw.decode('utf-8', errors='ignore').count('\ufffd')
  if bad:
    logging.warning('%s: replaced %d undecodable bytes', path, bad)
  if not text.strip():
    raise DataError(f'{path}: empty text corpus')
  return text


def split_text(text: str, valid_fraction: float) -> tuple[str, str]:
  """Contiguous split: the last `valid_fraction` of the characters is validation."""
  cut = int(len(text) * (1.0 - valid_fraction))
  return text[:cut], text[cut:]


def lm_blocks(ids: np.ndarray, block_length: int, offset: int = 0) -> np.ndarray:
  """Non-overlapping windows of block_length + 1 tokens starting at `offset`: int32
  [num_blocks, block_length + 1] (inputs are [:, :-1], targets [:, 1:])."""
  usable = (len(ids) - offset - 1) // block_length
  if usable < 1:
    raise DataError(f'{len(ids)} tokens are too few for blocks of {block_length}')
  starts = offset + block_length * np.arange(usable)
  return np.stack([ids[start:start + block_length + 1] for start in starts]).astype(np.int32)


def lm_batch(blocks: np.ndarray) -> dict[str, np.ndarray]:
  """[B, L + 1] token windows -> a batch with the target-side keys of translation."""
  batch_size, length = blocks.shape[0], blocks.shape[1] - 1
  return {
      'decoder_inputs': blocks[:, :-1], 'targets': blocks[:, 1:],
      'targets_segment_ids': np.ones((batch_size, length), np.int32),
      'targets_positions': np.broadcast_to(np.arange(length, dtype=np.int32),
                                           (batch_size, length)).copy(),
  }


def make_lm_dataset(ids: np.ndarray, *, batch_size: int, block_length: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless batches of contiguous blocks of `ids` (this process's share): each epoch
  cuts the stream at a new seeded offset and shuffles the blocks."""
  if batch_size % process_count:
    raise DataError(f'batch_size={batch_size} must divide by the {process_count} processes')
  offsets = np.random.default_rng(seed).integers(0, block_length, size=1024)
  num_blocks = (len(ids) - block_length - 1) // block_length
  if num_blocks < batch_size:
    raise DataError(f'{len(ids)} tokens give {num_blocks} blocks of {block_length}, fewer '
                    f'than one batch of {batch_size}')

  def block(index: int) -> np.ndarray:
    epoch, position = divmod(index, num_blocks)
    start = offsets[epoch % len(offsets)] + position * block_length
    return ids[start:start + block_length + 1].astype(np.int32)

  epoch = grain.MapDataset.range(num_blocks)[process_index::process_count]
  per_process = len(epoch)
  blocks = (epoch.shuffle(seed=seed).repeat(None)
            .map_with_index(lambda i, position: block(
                (i // per_process) * num_blocks + position)))
  batches = blocks.batch(batch_size // process_count, drop_remainder=True).map(lm_batch)
  return grain.experimental.ThreadPrefetchIterDataset(batches.to_iter_dataset(_INLINE),
                                                      prefetch_buffer_size=4)
