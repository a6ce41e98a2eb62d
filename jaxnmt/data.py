"""Parallel text: finding and reading the corpus, the train/valid/test split, and the
Grain pipelines that turn sentence pairs into packed (training) or padded (evaluation)
batches of token ids.

A batch is a dict of int32 numpy arrays:
  inputs, inputs_segment_ids, inputs_positions                          [B, S]
  decoder_inputs, targets, targets_segment_ids, targets_positions       [B, T]
Segment id 0 marks padding; in packed rows, ids 1, 2, ... number the sentence pairs
of the row, and positions restart at 0 for each pair.
"""

import collections
import dataclasses
import hashlib
import logging
import os
import shutil
import urllib.request
import zipfile
from typing import Iterator, Sequence

import grain
import numpy as np

from jaxnmt import tokenizer as tokenizer_lib
from jaxnmt.errors import DataError

DATA_DIR_ENV = 'JAXNMT_DATA_DIR'
DEFAULT_FILENAME = 'spa-eng.zip'
# sha256 of the published spa-eng.zip (the 2018-05-13 Tatoeba export).
DEFAULT_SHA256 = 'f80e581ae291aa34dd3aba7bd98b5e9505234da4318e2f3295df70a1520c7f61'

Pair = tuple[str, str]


# ----------------------------------------------------------------------------- files


# Published corpora: file name -> sha256.
KNOWN_SHA256 = {
    DEFAULT_FILENAME: DEFAULT_SHA256,
    'tinyshakespeare.txt': '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
}


def resolve_path(path: str, url: str, filename: str = DEFAULT_FILENAME) -> str:
  """The corpus file: `path` if given, else $JAXNMT_DATA_DIR/<filename>, else a cached
  download of `url` (checked against the published sha256 of known corpora)."""
  if path:
    if not os.path.exists(path):
      raise DataError(f'config.data.path: no such file: {path}')
    return path
  data_dir = os.environ.get(DATA_DIR_ENV)
  if data_dir:
    candidate = os.path.join(data_dir, filename)
    if not os.path.exists(candidate):
      raise DataError(f'${DATA_DIR_ENV}={data_dir} holds no {filename}')
    return candidate
  cache_dir = os.path.join(os.path.expanduser('~'), '.cache', 'jaxnmt')
  cached = os.path.join(cache_dir, filename)
  if not os.path.exists(cached):
    os.makedirs(cache_dir, exist_ok=True)
    logging.info('Downloading %s to %s', url, cached)
    partial = cached + '.partial'
    try:
      with urllib.request.urlopen(url, timeout=60) as response, open(partial, 'wb') as out:
        shutil.copyfileobj(response, out)
    except OSError as error:
      raise DataError(f'could not download {url} ({error}); set config.data.path or '
                      f'${DATA_DIR_ENV} to a local copy') from error
    digest = hashlib.sha256(open(partial, 'rb').read()).hexdigest()
    expected = KNOWN_SHA256.get(filename)
    if expected and digest != expected:
      os.remove(partial)
      raise DataError(f'checksum mismatch for {url}: got {digest}, expected {expected}')
    os.replace(partial, cached)
  return cached


def _raw_lines(path: str) -> list[bytes]:
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      members = [n for n in archive.namelist()
                 if n.endswith('.txt') and not os.path.basename(n).startswith('_')]
      if not members:
        raise DataError(f'{path}: zip archive holds no .txt file of sentence pairs')
      # Prefer the published name; otherwise the largest text file.
      named = [n for n in members if os.path.basename(n) == 'spa.txt']
      member = named[0] if named else max(members, key=lambda n: archive.getinfo(n).file_size)
      return archive.read(member).splitlines()
  with open(path, 'rb') as handle:
    return handle.read().splitlines()


@dataclasses.dataclass
class ReadReport:
  valid: int
  malformed: collections.Counter  # reason -> count
  first_malformed_line: int | None


def read_pairs(path: str) -> tuple[list[Pair], ReadReport]:
  """Reads `source<TAB>target` lines. Malformed lines (not UTF-8, no tab, an empty
  side) are skipped and counted; extra columns (e.g. attribution) are ignored."""
  pairs, malformed, first_bad = [], collections.Counter(), None
  for line_number, raw in enumerate(_raw_lines(path), start=1):
    reason = None
    try:
      line = raw.decode('utf-8')
    except UnicodeDecodeError:
      reason = 'not UTF-8'
    else:
      fields = line.split('\t')
      if not line.strip():
        reason = 'blank line'
      elif len(fields) < 2:
        reason = 'no tab'
      elif not fields[0].strip() or not fields[1].strip():
        reason = 'empty side'
    if reason:
      malformed[reason] += 1
      first_bad = first_bad or line_number
      continue
    pairs.append((fields[0].strip(), fields[1].strip()))
  report = ReadReport(len(pairs), malformed, first_bad)
  if not pairs:
    raise DataError(f'{path}: no valid `source<TAB>target` line '
                    f'({sum(malformed.values())} malformed)')
  if malformed:
    details = ', '.join(f'{count} {reason}' for reason, count in malformed.items())
    logging.warning('%s: skipped %d malformed lines (%s); first at line %d',
                    path, sum(malformed.values()), details, first_bad)
  return pairs, report


@dataclasses.dataclass
class Splits:
  train: list[Pair]
  valid: list[Pair]
  test: list[Pair]


def split_pairs(pairs: Sequence[Pair], valid_fraction: float, test_fraction: float,
                seed: int) -> Splits:
  """Deterministic split by *source sentence*: all translations of one source land in
  the same split, so no test source is ever seen in training. Each split is shuffled."""
  sources = sorted({source for source, _ in pairs})
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sources))
  num_test = int(round(len(sources) * test_fraction))
  num_valid = int(round(len(sources) * valid_fraction))
  if len(sources) - num_test - num_valid < 1:
    raise DataError(f'only {len(sources)} distinct source sentences: too few to split')
  assignment = {}
  for rank, index in enumerate(order):
    assignment[sources[index]] = 'test' if rank < num_test else (
        'valid' if rank < num_test + num_valid else 'train')
  buckets = {'train': [], 'valid': [], 'test': []}
  for pair in pairs:
    buckets[assignment[pair[0]]].append(pair)
  for name in ('train', 'valid', 'test'):
    shuffled = rng.permutation(len(buckets[name]))
    buckets[name] = [buckets[name][i] for i in shuffled]
  return Splits(**buckets)


def write_split_files(splits: Splits, directory: str) -> None:
  """Writes the held-out splits as line-aligned text: `{valid,test}.{src,ref}`, so
  translations can be scored against the untouched references (e.g. with sacrebleu)."""
  os.makedirs(directory, exist_ok=True)
  for name in ('valid', 'test'):
    for side, suffix in ((0, 'src'), (1, 'ref')):
      path = os.path.join(directory, f'{name}.{suffix}')
      partial = path + '.partial'
      with open(partial, 'w', encoding='utf-8') as handle:
        handle.writelines(pair[side] + '\n' for pair in getattr(splits, name))
      os.replace(partial, path)


# ----------------------------------------------------------------------------- examples


def encode_pair(pair: Pair, tokenizer: tokenizer_lib.Tokenizer, max_source_length: int,
                max_target_length: int) -> dict[str, np.ndarray]:
  """One training example: source + EOS, BOS + target (decoder input), target + EOS."""
  source_ids = tokenizer.encode(pair[0])[:max_source_length - 1]
  target_ids = tokenizer.encode(pair[1])[:max_target_length - 1]
  return {
      'inputs': np.asarray(source_ids + [tokenizer_lib.EOS_ID], np.int32),
      'decoder_inputs': np.asarray([tokenizer_lib.BOS_ID] + target_ids, np.int32),
      'targets': np.asarray(target_ids + [tokenizer_lib.EOS_ID], np.int32),
  }


# The map steps run inline in the one prefetch thread at the end of each pipeline.
# Grain's default (16 reader threads, 500 futures in flight) polled every pending future
# on each element, most of the pipeline's time, in bursts that stalled training steps
# (measured in BUILD_NOTES.md, "Speed").
_INLINE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def make_train_dataset(pairs: Sequence[Pair], tokenizer: tokenizer_lib.Tokenizer, *,
                       batch_size: int, max_source_length: int, max_target_length: int,
                       num_packing_bins: int, seed: int, process_index: int = 0,
                       process_count: int = 1, packing: bool = True) -> grain.IterDataset:
  """Endless packed training batches of this process's shard of `pairs`.

  Chain: shard by process → shuffle (reseeded every epoch) → repeat → tokenize →
  best-fit pack into rows of [S] / [T] tokens → batch rows → prefetch in a thread.
  Its iterator's `get_state()` / `set_state()` save and restore the exact position.
  `packing=False` puts one pair per padded row instead (for comparison).
  """
  if batch_size % process_count:
    raise DataError(f'batch_size={batch_size} must divide by the {process_count} processes')
  shard = grain.MapDataset.source(list(pairs))[process_index::process_count]
  examples = (shard.shuffle(seed=seed).repeat(None)
              .map(lambda pair: encode_pair(pair, tokenizer, max_source_length,
                                            max_target_length)))
  rows = batch_size // process_count
  if not packing:
    batches = examples.to_iter_dataset(_INLINE).batch(
        rows, drop_remainder=True,
        batch_fn=lambda chunk: pad_examples(chunk, rows, max_source_length,
                                            max_target_length))
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=4)
  packed = grain.experimental.BestFitPackIterDataset(
      examples.to_iter_dataset(_INLINE),
      length_struct={'inputs': max_source_length, 'decoder_inputs': max_target_length,
                     'targets': max_target_length},
      num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=True)
  batches = packed.batch(rows, drop_remainder=True)
  batches = batches.map(_rename_packed_features)
  return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=4)


def _rename_packed_features(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Grain names segment ids/positions per feature; decoder_inputs share the targets'."""
  return {key: batch[key].astype(np.int32) for key in (
      'inputs', 'inputs_segment_ids', 'inputs_positions', 'decoder_inputs', 'targets',
      'targets_segment_ids', 'targets_positions')}


def make_eval_batches(pairs: Sequence[Pair], tokenizer: tokenizer_lib.Tokenizer, *,
                      batch_size: int, max_source_length: int,
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


def real_token_fraction(batch: dict[str, np.ndarray]) -> float:
  """Fraction of source + target slots holding a real (non-pad) token."""
  real = np.count_nonzero(batch['inputs_segment_ids']) + np.count_nonzero(
      batch['targets_segment_ids'])
  return real / (batch['inputs_segment_ids'].size + batch['targets_segment_ids'].size)


# ----------------------------------------------------------------------------- language modelling


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
