"""What a training run reads: the corpus, its held-out splits and the tokenizer, turned
into endless training batches and a fixed list of validation batches.

  translation: corpus -> split by source sentence -> tokenizer (trained once, stored in
               the workdir) -> Grain packed batches; WORKDIR/splits/{valid,test}.{src,ref}
  lm:          text -> last `valid_fraction` held out -> tokenizer -> Grain blocks;
               WORKDIR/splits/valid.txt
"""

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxnmt import data as data_lib
from jaxnmt import tokenizer as tokenizer_lib
from jaxnmt import workdir as workdir_lib


@dataclasses.dataclass
class TrainingInputs:
  tokenizer: object
  train_data: object  # a Grain IterDataset of this process's host batches
  valid_batches: list  # whole (every process's) padded batches, numpy


def training_inputs(config, workdir: str) -> TrainingInputs:
  """The run's tokenizer and data for `config.task`."""
  prepare = _lm_inputs if config.task == 'lm' else _translation_inputs
  return prepare(config, workdir)


def _train_or_load_tokenizer(config, workdir: str, training_text):
  """The workdir's tokenizer; on the first run trained by process 0 on
  `training_text()` (sentences, or one string for a char vocabulary)."""
  path = workdir_lib.tokenizer_path(workdir)
  started = time.time()
  # Process 0 trains (SentencePiece training is not bit-reproducible across runs); the
  # others wait for it and load the same file (the workdir is on a shared filesystem).
  if jax.process_index() == 0 and not os.path.exists(path):
    if config.tokenizer.model_type == 'char':
      tokenizer_lib.train_chars(training_text(), path)
    else:
      tokenizer_lib.train(training_text(), path, vocab_size=config.tokenizer.vocab_size,
                          model_type=config.tokenizer.model_type,
                          max_sentences=config.tokenizer.max_training_sentences,
                          seed=config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer ready')
  tokenizer = workdir_lib.load_tokenizer(workdir, config.tokenizer.model_type)
  logging.info('Tokenizer %s: %d pieces (%.1fs)', path, tokenizer.vocab_size,
               time.time() - started)
  return tokenizer


def _translation_inputs(config, workdir: str) -> TrainingInputs:
  path = data_lib.resolve_path(config.data.path, config.data.url, config.data.filename)
  pairs, report = data_lib.read_pairs(path)
  splits = data_lib.split_pairs(pairs, config.data.valid_fraction,
                                config.data.test_fraction, config.data.split_seed)
  logging.info('Corpus %s: %d pairs (%d malformed lines skipped); split train=%d '
               'valid=%d test=%d', path, report.valid, sum(report.malformed.values()),
               len(splits.train), len(splits.valid), len(splits.test))
  tokenizer = _train_or_load_tokenizer(
      config, workdir, lambda: [side for pair in splits.train for side in pair])
  if jax.process_index() == 0:
    data_lib.write_split_files(splits, workdir_lib.splits_dir(workdir))
  data = config.data
  train_data = data_lib.make_train_dataset(
      splits.train, tokenizer, batch_size=data.batch_size,
      max_source_length=data.max_source_length, max_target_length=data.max_target_length,
      num_packing_bins=data.num_packing_bins, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      packing=data.packing)
  valid_batches = list(data_lib.make_eval_batches(
      splits.valid, tokenizer, batch_size=data.eval_batch_size,
      max_source_length=data.max_source_length, max_target_length=data.max_target_length))
  return TrainingInputs(tokenizer, train_data, valid_batches)


def _lm_inputs(config, workdir: str) -> TrainingInputs:
  path = data_lib.resolve_path(config.data.path, config.data.url, config.data.filename)
  train_text, valid_text = data_lib.split_text(data_lib.read_text(path),
                                               config.data.valid_fraction)
  logging.info('Text %s: %d training and %d validation characters', path, len(train_text),
               len(valid_text))
  if config.tokenizer.model_type == 'char':
    training_text = lambda: train_text
  else:
    training_text = lambda: [line for line in train_text.splitlines() if line.strip()]
  tokenizer = _train_or_load_tokenizer(config, workdir, training_text)
  block = config.data.max_target_length
  train_data = data_lib.make_lm_dataset(
      _encode(tokenizer, train_text), batch_size=config.data.batch_size,
      block_length=block, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  if jax.process_index() == 0:
    workdir_lib.write_text(workdir_lib.split_file(workdir, 'valid.txt'), valid_text)
  return TrainingInputs(tokenizer, train_data,
                        lm_valid_batches(tokenizer, valid_text, block,
                                         config.data.eval_batch_size, whole_only=True))


def _encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32)


def lm_valid_batches(tokenizer, text: str, block: int, rows: int,
                     whole_only: bool = False) -> list[dict]:
  """Validation batches of contiguous blocks of `text`; `whole_only` drops a last
  batch of fewer than `rows` blocks (the trainer shards batches over devices)."""
  blocks = data_lib.lm_blocks(_encode(tokenizer, text), block)
  end = len(blocks) - rows + 1 if whole_only else len(blocks)
  return [data_lib.lm_batch(blocks[start:start + rows]) for start in range(0, end, rows)]
