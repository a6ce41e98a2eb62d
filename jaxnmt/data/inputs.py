"""What a training run reads: prepared data (or the text of a language model), the
tokenizer and the held-out splits, turned into endless training batches and a fixed
list of validation batches.

  translation: corpora -> prepare (once: splits, tokenizer, ArrayRecord shards +
               manifest; data/prepare.py) -> the global-order Grain stream of this
               process's rows (data/pipeline.py); WORKDIR/splits/{valid,test}.{src,ref}
  lm:          text -> last `valid_fraction` held out -> tokenizer -> Grain blocks;
               WORKDIR/splits/valid.txt
"""

import dataclasses
import logging
import os
import time

import jax
import numpy as np

from jaxnmt.runtime import distributed
from jaxnmt.runtime import files
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.data import corpus as corpus_lib
from jaxnmt.data import eval_batches
from jaxnmt.data import lm as lm_lib
from jaxnmt.data import pipeline
from jaxnmt.data import prepare as prepare_lib
from jaxnmt.errors import DataError, UserError


# How long processes > 0 wait for process 0's download to show in a shared cache.
DOWNLOAD_WAIT_S = 30.0


@dataclasses.dataclass
class TrainingInputs:
  tokenizer: object
  train_data: object  # a Grain IterDataset of this process's host batches
  valid_batches: list  # whole (every process's) padded batches, numpy
  # Position of the data stream from every process's saved iterator state.
  restore_position: object = None
  manifest_sha256: str | None = None


def training_inputs(config, workdir: str) -> TrainingInputs:
  """The run's tokenizer and data for `config.task`."""
  prepare = _lm_inputs if config.task == 'lm' else _translation_inputs
  return prepare(config, workdir)


def _on_process_zero(what: str, work) -> None:
  """Runs `work()` on process 0 alone; every process learns whether it failed, so a
  bad input on process 0 stops all of them instead of leaving them waiting. The
  exchange is a barrier: no process returns before process 0 has finished."""
  error = None
  if jax.process_index() == 0:
    try:
      work()
    except UserError as raised:
      error = raised
  if jax.process_count() > 1:
    # Process 0's work may take hours at scale: the wait is bounded by liveness (a
    # process 0 that dies or fails ends the job through distributed.PeerWatch).
    failed = distributed.agree([error is not None], f'the end of process 0\'s work to {what}',
                               timeout_s=distributed.LONG_WAIT_S)[0]
    if failed and error is None:
      raise DataError(f'process 0 failed to {what} (its log says why)')
  if error is not None:
    raise error


def prepare_data(config, workdir: str, progress: bool = True) -> dict:
  """Prepares the config's corpora once (process 0) and publishes the tokenizer and the
  held-out splits into the workdir. Returns the manifest."""
  directory = prepare_lib.prepared_dir(config, workdir)

  def work():
    manifest = prepare_lib.prepare(config, workdir, progress)
    _install(manifest, directory, workdir)
  _on_process_zero('prepare the data', work)
  manifest = prepare_lib.load_manifest(directory)
  if manifest is None:
    raise DataError(f'{directory} holds no {prepare_lib.MANIFEST}: is it on a filesystem '
                    f'every process shares?')
  prepare_lib.check_spec(manifest, config, directory)
  return manifest


def _install(manifest: dict, directory: str, workdir: str) -> None:
  """Copies the prepared tokenizer and splits into the workdir, refusing a workdir
  whose model was trained with another tokenizer."""
  target = files.tokenizer_path(workdir)
  if files.exists(target):
    found = files.sha256(target)
    if found != manifest['tokenizer_sha256']:
      raise DataError(f'{target} (sha256 {found[:12]}) is not the tokenizer of the '
                      f'prepared data in {directory} ({manifest["tokenizer_sha256"][:12]}): '
                      f'the model of this workdir needs its own tokenizer; use a new '
                      f'--workdir')
  else:  # copied whole, then swapped in (one upload on gs://)
    files.copy_file(os.path.join(directory, manifest['tokenizer']), target)
  source_splits = os.path.join(directory, prepare_lib.SPLITS)
  target_splits = files.splits_dir(workdir)
  if files.absolute(source_splits) != files.absolute(target_splits):
    files.makedirs(target_splits)
    for name in os.listdir(source_splits):
      if not name.endswith('.partial'):
        files.copy_file(os.path.join(source_splits, name),
                          files.join(target_splits, name))


def _translation_inputs(config, workdir: str) -> TrainingInputs:
  manifest = prepare_data(config, workdir)  # returns after process 0 has installed it
  started = time.time()
  directory = prepare_lib.prepared_dir(config, workdir)
  tokenizer = tokenizer_lib.from_workdir(workdir, config.tokenizer.model_type)
  data = config.data
  weights = [float(w) for w in corpus_lib.split_list(data.weights)]
  train_data = pipeline.TrainStream(
      prepare_lib.open_corpora(manifest, directory), manifest['record_dtype'],
      batch_size=data.batch_size, max_source_length=data.max_source_length,
      max_target_length=data.max_target_length, seed=config.seed, weights=weights,
      process_index=jax.process_index(), process_count=jax.process_count(),
      packing=data.packing, num_workers=data.pipeline_workers)
  valid_pairs = list(zip(
      files.read_lines(files.split_file(workdir, 'valid.src')),
      files.read_lines(files.split_file(workdir, 'valid.ref'))))
  if not valid_pairs:
    raise DataError(f'the validation split of {directory} is empty: raise '
                    f'config.data.valid_fraction')
  valid_batches = list(eval_batches.make_eval_batches(
      valid_pairs, tokenizer, batch_size=data.eval_batch_size,
      max_source_length=data.max_source_length, max_target_length=data.max_target_length))
  total = sum(corpus['pairs'] for corpus in manifest['corpora'])
  logging.info('Data: %d training pairs in %d corpora (%s), %d validation pairs; opened '
               'in %.2f s', total, len(manifest['corpora']),
               ', '.join(c['name'] for c in manifest['corpora']), len(valid_pairs),
               time.time() - started)
  return TrainingInputs(
      tokenizer, train_data, valid_batches,
      restore_position=lambda states: pipeline.merge_states(states),
      manifest_sha256=prepare_lib.fingerprint(manifest))


def _train_or_load_tokenizer(config, workdir: str, training_text):
  """The workdir's tokenizer; on the first run trained by process 0 on
  `training_text()` (sentences, or one string for a char vocabulary)."""
  path = files.tokenizer_path(workdir)
  started = time.time()
  # Process 0 trains (SentencePiece training is not bit-reproducible across runs); the
  # others wait for it and load the same file (the workdir is on a shared filesystem).
  def work():
    if files.exists(path):
      return
    if config.tokenizer.model_type == 'char':
      tokenizer_lib.train_chars(training_text(), path)
    else:
      tokenizer_lib.train(training_text(), path, vocab_size=config.tokenizer.vocab_size,
                          model_type=config.tokenizer.model_type,
                          max_sentences=config.tokenizer.max_training_sentences,
                          seed=config.seed)
  _on_process_zero('train the tokenizer', work)  # a barrier: the file now exists
  tokenizer = tokenizer_lib.from_workdir(workdir, config.tokenizer.model_type)
  logging.info('Tokenizer %s: %d pieces (%.1fs)', path, tokenizer.vocab_size,
               time.time() - started)
  return tokenizer


def corpus_path(config) -> str:
  """The language model's text file (config.data.path, $JAXNMT_DATA_DIR, or a cached
  download of config.data.url). Process 0 alone downloads; the others then find the
  file in the cache, waiting up to DOWNLOAD_WAIT_S for a shared filesystem to show it,
  and download it themselves only where the cache is not shared (another host's home
  directory). (Translation corpora are resolved inside `prepare`: process 0 alone.)"""
  data = config.data
  def resolve(wait_s: float = 0.0) -> str:
    return corpus_lib.resolve_path(data.path, data.url, data.filename, wait_s)
  _on_process_zero('download the corpus', resolve)  # a barrier
  return resolve(0.0 if jax.process_index() == 0 else DOWNLOAD_WAIT_S)


def _lm_inputs(config, workdir: str) -> TrainingInputs:
  path = corpus_path(config)
  train_text, valid_text = lm_lib.split_text(lm_lib.read_text(path),
                                             config.data.valid_fraction)
  logging.info('Text %s: %d training and %d validation characters', path, len(train_text),
               len(valid_text))
  if config.tokenizer.model_type == 'char':
    training_text = lambda: train_text
  else:
    training_text = lambda: [line for line in train_text.splitlines() if line.strip()]
  tokenizer = _train_or_load_tokenizer(config, workdir, training_text)
  block = config.data.max_target_length
  train_data = lm_lib.make_lm_dataset(
      _encode(tokenizer, train_text), batch_size=config.data.batch_size,
      block_length=block, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  if jax.process_index() == 0:
    files.write_text(files.split_file(workdir, 'valid.txt'), valid_text)
  return TrainingInputs(tokenizer, train_data,
                        lm_valid_batches(tokenizer, valid_text, block,
                                         config.data.eval_batch_size, whole_only=True),
                        restore_position=_own_position)


def _own_position(per_process: list) -> dict | None:
  """The LM stream's position is per process: it resumes on the same process count."""
  if len(per_process) == jax.process_count():
    return per_process[jax.process_index()]
  logging.warning('The checkpoint holds data positions for %d processes, this job has %d: '
                  'the language-model data restarts from its seed', len(per_process),
                  jax.process_count())
  return None


def _encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text), np.int32)


def lm_valid_batches(tokenizer, text: str, block: int, rows: int,
                     whole_only: bool = False) -> list[dict]:
  """Validation batches of contiguous blocks of `text`; `whole_only` drops a last
  batch of fewer than `rows` blocks (the trainer shards batches over devices)."""
  blocks = lm_lib.lm_blocks(_encode(tokenizer, text), block)
  end = len(blocks) - rows + 1 if whole_only else len(blocks)
  return [lm_lib.lm_batch(blocks[start:start + rows]) for start in range(0, end, rows)]
