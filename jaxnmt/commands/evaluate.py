"""The eval worker (`--mode=eval`): a separate process that follows a training workdir,
scores each new checkpoint once — validation loss and BLEU, then beam search over the
held-out test split and every named test set (config.data.test_sets), scored by
sacrebleu BLEU/chrF against the untouched references — and writes TensorBoard scalars
and sample translations under WORKDIR/eval plus a JSON-lines results file. It scores
the weights inference uses (`--weights`, by default a checkpoint's moving average
where the run kept one) and keeps eval/best.json, the checkpoint with the best
validation BLEU so far, which the trainer's retention never deletes and by which it
may stop early (config.early_stopping_patience).

It never slows the trainer: it runs on its own devices (or the CPU), restores each
checkpoint onto them, and tolerates checkpoints the trainer deletes under it. One
worker per workdir: it holds a lease (eval/worker.json, locks.EvalLock) that is also
its heartbeat, by which the trainer keeps the checkpoints it has not scored.

With several processes, every process scores the checkpoints process 0 picks, in the
same order; the decode batches of each test set are dealt over the processes (each
decodes its share on its own local devices, `Translator.decode_encoded` with
all_processes) and the translations gathered, so BLEU is the one-process BLEU (with as
many local devices per process) in about 1/N of the decoding time; process 0 alone
holds the lease and writes: results, hypotheses, TensorBoard.
"""

import contextlib
import functools
import json
import logging
import threading
import time

import jax
import numpy as np

from jaxnmt.decoding import averaging
from jaxnmt.decoding import bleu
from jaxnmt.runtime import checkpointing
from jaxnmt.runtime import distributed
from jaxnmt.decoding import inference
from jaxnmt.data import inputs
from jaxnmt.training import metrics as metrics_lib
from jaxnmt.training import steps
from jaxnmt.runtime import files
from jaxnmt.decoding import translation
from jaxnmt.runtime import locks
from jaxnmt.data import eval_batches
from jaxnmt.errors import CheckpointError, WorkdirError


class _Heartbeat:
  """Refreshes the worker's lease every `every` seconds from a background thread, so a
  long scoring pass never looks like a dead worker to the trainer or to a second
  worker. Should another worker have taken the lease over (this one was silent too
  long), `check` raises in the main thread. `lease` None (processes > 0): a no-op."""

  def __init__(self, lease: locks.Lease | None, every: float = 30.0):
    self._stop = threading.Event()
    self._lost = self._thread = None
    if lease is None:
      return
    def beat():
      while not self._stop.wait(every):
        try:
          lease.refresh()
        except WorkdirError as error:
          self._lost = error
          return
        except OSError as error:  # a passing filesystem fault: try again next beat
          logging.warning('Could not refresh %s: %s', lease.target, error)
    self._thread = threading.Thread(target=beat, daemon=True)
    self._thread.start()

  def check(self) -> None:
    if self._lost is not None:
      raise self._lost

  def stop(self) -> None:
    """Returns once no refresh is under way (one must not rewrite a released lease)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=60)


def test_sets(workdir: str) -> dict[str, tuple[list[str], list[str]]]:
  """{name: (sources, references)} of the workdir's test sets: 'test' (the held-out
  split, when not empty) and each named set (splits/test_<name>.{src,ref})."""
  directory = files.splits_dir(workdir)
  names = sorted(name[:-4] for name in files.listdir(directory)
                 if name.startswith('test') and name.endswith('.src'))
  sets = {}
  for name in names:
    sources = files.read_lines(files.split_file(workdir, f'{name}.src'))
    references = files.read_lines(files.split_file(workdir, f'{name}.ref'))
    if sources:
      sets['test' if name == 'test' else name.removeprefix('test_')] = (sources, references)
  return sets


class Evaluator:
  """Scores checkpoints of one workdir: validation loss, BLEU/chrF on every test set,
  sample translations."""

  def __init__(self, workdir: str, options: translation.DecodeOptions, batch_size: int = 64,
               max_test_sentences: int = 0, num_samples: int = 8, weights: str = 'auto',
               max_valid_sentences: int = 0, target_lang: str | None = None):
    self.workdir = workdir
    self.target_lang = target_lang  # for test sets whose sources carry no language tag
    self.weights = weights
    self.batch_size = batch_size
    self.num_samples = num_samples
    self.sets = {name: (sources[:max_test_sentences or None],
                        references[:max_test_sentences or None])
                 for name, (sources, references) in test_sets(workdir).items()}
    if not self.sets:
      raise WorkdirError(f'{files.splits_dir(workdir)} holds no test set: set '
                         f'config.data.test_fraction > 0 or config.data.test_sets')
    valid = list(zip(files.read_lines(files.split_file(workdir, 'valid.src')),
                     files.read_lines(files.split_file(workdir, 'valid.ref'))))
    self.translator = None
    self.options = options
    self._valid_pairs = valid
    self._valid_bleu_pairs = valid[:max_valid_sentences or None]
    self._valid_batches = None
    self._eval_fn = None

  def score(self, step: int) -> dict:
    """Evaluates checkpoint `step`; CheckpointError if it is gone or unreadable."""
    if self.translator is None:
      self.translator = translation.Translator(
          inference.load(self.workdir, step, devices=jax.local_devices(),
                         weights=self.weights), self.options,
          target_lang=self.target_lang)
      config = self.translator.config
      self._valid_batches = list(eval_batches.make_eval_batches(
          self._valid_pairs, self.translator.tokenizer,
          batch_size=config.data.eval_batch_size,
          max_source_length=config.data.max_source_length,
          max_target_length=config.data.max_target_length))
      self._eval_fn = jax.jit(functools.partial(steps.eval_step,
                                                self.translator.loaded.graphdef))
    else:
      self.translator.loaded.reload(self.workdir, step, self.weights)
    loaded = self.translator.loaded
    validation = steps.evaluate_loss(self._eval_fn, loaded.params, loaded.rest,
                                     self._valid_batches)
    result = {'step': step, 'time': time.time(), 'weights': loaded.weights,
              'valid_loss': validation['loss'], 'valid_perplexity': validation['perplexity'],
              'strategy': self.options.strategy, 'beam_size': self.options.beam_size,
              'length_penalty': self.options.length_penalty}
    samples = []  # the first validation sentences (as the trainer's greedy ones)
    if self._valid_bleu_pairs:
      sources, references = map(list, zip(*self._valid_bleu_pairs))
      hypotheses = self.translator.translate(sources, self.batch_size, all_processes=True)
      result['valid_bleu'] = bleu.scores(bleu.statistics(hypotheses, references))['bleu']
      samples = _samples(sources, references, hypotheses, self.num_samples)
    # The first set ('test' when the corpus has a held-out test split) gives the plain
    # bleu/chrf keys; every set also gives bleu_<name>/chrf_<name>.
    for index, (name, (sources, references)) in enumerate(self.sets.items()):
      started = time.time()
      hypotheses = self.translator.translate(sources, self.batch_size, all_processes=True)
      seconds = time.time() - started
      tag = step if loaded.weights in averaging.RESERVED else loaded.weights
      hypotheses_name = f'{name}_hypotheses_{tag}.txt'
      hypotheses_path = files.join(self.workdir, files.EVAL, hypotheses_name)
      if jax.process_index() == 0:  # the others write nothing
        files.write_text(files.eval_file(self.workdir, hypotheses_name),
                           ''.join(line + '\n' for line in hypotheses))
      scores = bleu.scores(bleu.statistics(hypotheses, references))
      result[f'bleu_{name}'], result[f'chrf_{name}'] = scores['bleu'], scores['chrf']
      if index == 0:
        result.update(
            test_set=name, bleu=scores['bleu'], chrf=scores['chrf'],
            bleu_signature=scores['bleu_signature'],
            chrf_signature=scores['chrf_signature'], bleu_text=scores['bleu_text'],
            sentences=len(sources), decode_seconds=seconds,
            sentences_per_sec=len(sources) / max(seconds, 1e-9),
            hypotheses=hypotheses_path,
            samples=samples or _samples(sources, references, hypotheses, self.num_samples))
    return result


def _samples(sources, references, hypotheses, count: int) -> list[dict]:
  return [{'source': s, 'reference': r, 'hypothesis': h}
          for s, r, h in zip(sources[:count], references[:count], hypotheses[:count])]


class LMEvaluator:
  """Scores language-model checkpoints: validation loss, perplexity, bits per char."""

  def __init__(self, workdir: str, weights: str = 'auto'):
    self.workdir = workdir
    self.weights = weights
    self.loaded = None
    self.text = files.read_text(files.split_file(workdir, 'valid.txt'))

  def score(self, step: int) -> dict:
    if self.loaded is None:
      self.loaded = inference.load(self.workdir, step, weights=self.weights)
      config, tokenizer = self.loaded.config, self.loaded.tokenizer
      self.batches = inputs.lm_valid_batches(tokenizer, self.text,
                                             config.data.max_target_length,
                                             config.data.eval_batch_size)
      # Characters per token of the scored stream, for bits per character.
      self.chars_per_token = len(self.text) / max(len(tokenizer.encode(self.text)), 1)
      self._eval_fn = jax.jit(functools.partial(steps.eval_step, self.loaded.graphdef))
    else:
      self.loaded.reload(self.workdir, step, self.weights)
    validation = steps.evaluate_loss(self._eval_fn, self.loaded.params, self.loaded.rest,
                                     self.batches)
    return {'step': self.loaded.step, 'time': time.time(), 'valid_loss': validation['loss'],
            'valid_perplexity': validation['perplexity'],
            'bits_per_char': validation['loss'] / self.chars_per_token / np.log(2),
            'samples': []}


def run_eval_worker(workdir: str, *, follow: bool = False, checkpoint_step: int | None = None,
                    options: translation.DecodeOptions = translation.DecodeOptions(),
                    batch_size: int = 64, poll_seconds: float = 10.0,
                    max_test_sentences: int = 0, weights: str = 'auto',
                    max_valid_sentences: int = 0,
                    target_lang: str | None = None) -> list[dict]:
  """Scores every checkpoint of `workdir` not scored yet, then waits for new ones; stops
  once the trainer's final checkpoint is scored (never, with `follow`), or after
  `checkpoint_step` alone. A WorkdirError at once if another eval worker holds the
  workdir. Returns the results it scored (process 0 also wrote them)."""
  if not follow and not files.has_run(workdir):
    raise WorkdirError(f'{workdir} holds no training run (no {files.CONFIG}); '
                       f'start the trainer first or pass --follow to wait for it')
  if weights not in averaging.RESERVED:
    return [_score_averaged(workdir, weights, options, batch_size, max_test_sentences,
                            max_valid_sentences, target_lang)]
  with contextlib.ExitStack() as cleanup:  # closed in reverse order, however we leave
    lease = _take_lease(workdir)
    if lease is not None:
      cleanup.callback(lease.release)
    heartbeat = _Heartbeat(lease)
    cleanup.callback(heartbeat.stop)
    _wait_for_run(workdir, poll_seconds)
    if files.load_config(workdir).get('task') == 'lm':
      evaluator = LMEvaluator(workdir, weights)
    else:
      evaluator = Evaluator(workdir, options, batch_size, max_test_sentences,
                            weights=weights, max_valid_sentences=max_valid_sentences,
                            target_lang=target_lang)
    checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
    cleanup.callback(checkpointer.close)
    scored, written = files.scored_steps(workdir), []
    # Following: a worker killed between its TensorBoard write and its results line
    # scores that step again, so what it logged after the last result goes.
    writer = metrics_lib.Writer(
        workdir, files.EVAL,
        purge_step=max(scored, default=0) + 1 if checkpoint_step is None else None)
    cleanup.callback(writer.close)
    while True:
      if checkpoint_step is not None:
        todo = [checkpoint_step]
      else:
        todo = _from_process_zero(
            [step for step in checkpointer.all_steps() if step not in scored],
            'the choice of checkpoints to score')
      for step in todo:
        heartbeat.check()
        try:
          result = evaluator.score(step)
        except CheckpointError as error:
          if checkpoint_step is not None:
            raise
          logging.warning('Skipping checkpoint %d (deleted or unreadable): %s', step, error)
          continue
        heartbeat.check()  # a worker that lost its lease writes nothing more
        if jax.process_index() == 0:
          _write_result(writer, workdir, result)
        scored.add(step)
        written.append(result)
        logging.info('step %d: %s', step, _summary(result))
      if checkpoint_step is not None:
        break
      final = files.finished_step(workdir)
      if _from_process_zero(not follow and final is not None and (
          final in scored or final not in checkpointer.all_steps()), 'the stop check'):
        break
      time.sleep(poll_seconds)
  return written


def _score_averaged(workdir: str, name: str, options, batch_size: int,
                    max_test_sentences: int, max_valid_sentences: int,
                    target_lang: str | None = None) -> dict:
  """Scores the averaged weights `name` once, into eval/averaged_<name>.json (not the
  per-checkpoint results: they belong to no single checkpoint)."""
  evaluator = Evaluator(workdir, options, batch_size, max_test_sentences, weights=name,
                        max_valid_sentences=max_valid_sentences, target_lang=target_lang)
  result = evaluator.score(None)
  result['averaged_steps'] = averaging.restore_info(workdir, name)['steps']
  if jax.process_index() == 0:
    files.write_text(files.eval_file(workdir, f'averaged_{name}.json'),
                           json.dumps(result, indent=2, ensure_ascii=False) + '\n')
  logging.info('%s: %s', name, _summary(result))
  return result


def _summary(result: dict) -> str:
  return ', '.join(f'{key} {value:.4g}' if isinstance(value, float) else f'{key} {value}'
                   for key, value in result.items()
                   if key not in ('samples', 'time', 'step', 'hypotheses', 'bleu_text'))


def _take_lease(workdir: str) -> locks.EvalLock | None:
  """The workdir's eval lease, taken by process 0 (None on the others); if another
  worker holds it, every process raises process 0's WorkdirError."""
  lease = error = None
  if jax.process_index() == 0:
    try:
      lease = locks.EvalLock(workdir)
    except WorkdirError as raised:
      error = raised
  message = _from_process_zero(error and str(error), 'taking the eval lease')
  if error is not None:
    raise error
  if message:
    raise WorkdirError(message)
  return lease


def _from_process_zero(value, what: str):
  """Process 0's `value`, on every process (collective): what each process sees on disk
  may differ for a moment, and they must score the same checkpoints and stop together."""
  return distributed.gather_json(value, f'the eval worker: {what}')[0]


def _wait_for_run(workdir: str, poll_seconds: float) -> None:
  """Returns once the trainer has written the run's config and held-out splits."""
  while not files.has_run(workdir) or not (
      files.exists(files.split_file(workdir, 'valid.ref')) or
      files.exists(files.split_file(workdir, 'valid.txt'))):
    logging.info('Waiting for the trainer to write %s', files.splits_dir(workdir))
    time.sleep(poll_seconds)


def _write_result(writer, workdir: str, result: dict) -> None:
  step = result['step']
  names = {'bleu': 'bleu', 'chrf': 'chrf', 'valid_loss': 'loss',
           'valid_perplexity': 'perplexity', 'bits_per_char': 'bits_per_char',
           'valid_bleu': 'valid_bleu'}
  names.update({key: key.replace('_', '/', 1) for key in result
                if key.startswith(('bleu_', 'chrf_')) and key not in (
                    'bleu_signature', 'chrf_signature', 'bleu_text')})
  writer.scalars(step, {name: result[key] for key, name in names.items() if key in result})
  if result['samples']:
    table = '| source | reference | translation |\n|---|---|---|\n' + ''.join(
        f'| {s["source"]} | {s["reference"]} | {s["hypothesis"]} |\n'
        for s in result['samples'])
    writer.text(step, 'samples', table)
  writer.flush()
  files.append_result(workdir, result)
  best = files.best_result(workdir)
  if best is not None:
    files.write_text(files.eval_file(workdir, 'best.json'), json.dumps(
        {key: best[key] for key in ('step', 'weights', 'valid_bleu', 'bleu', 'chrf')
         if key in best}, indent=2) + '\n')


def main(workdir: str, flags) -> None:
  run_eval_worker(workdir, follow=flags.follow, checkpoint_step=flags.checkpoint_step,
                  options=translation.DecodeOptions.from_flags(flags),
                  batch_size=flags.batch_size, poll_seconds=flags.poll_seconds,
                  max_test_sentences=flags.max_test_sentences, weights=flags.weights,
                  max_valid_sentences=flags.max_valid_sentences,
                  target_lang=flags.target_lang)
