"""The training loop: feed, step, log, validate, save, stop when all processes agree.

`train_and_evaluate(config, workdir)` reads top to bottom. What it calls lives in rooms
of its own: `setup` (mesh, inputs, fitted batch, sharded state and compiled steps, as
`--mode=bench` builds them too), `feeding` (batches onto the devices ahead of time),
`stopping` (agreed stop requests), `checkpointing` (Orbax) and `files` (the workdir).
"""

import contextlib
import dataclasses
import json
import logging
import time

import jax
import ml_collections
import numpy as np
import tqdm

from jaxnmt.runtime import checkpointing
from jaxnmt import config_lib
from jaxnmt.runtime import distributed
from jaxnmt.training import feeding
from jaxnmt.training import init_from
from jaxnmt.training import metrics as metrics_lib
from jaxnmt.training import samples as samples_lib
from jaxnmt.training import setup
from jaxnmt.training import steps
from jaxnmt.training import stopping
from jaxnmt.runtime import files
from jaxnmt.model import initialize
from jaxnmt.runtime import locks
from jaxnmt.errors import DataError, TrainingError, WorkdirError


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       compiled_step: str = '') -> dict:
  """Trains per `config`, writing TensorBoard logs, config, tokenizer and checkpoints
  to `workdir`; resumes from its latest readable checkpoint, else starts from
  config.init_from's weights when set (`init_from`). `compiled_step`: a train
  step saved by `--mode=compile --save_compiled`, run instead of compiling one
  (`setup.build`). Returns final metrics:
  {'step', 'stopped': None | 'signal' | 'time limit' | 'early stopping', 'valid_*'}."""
  mesh, rules = setup.plan(config)
  lock = locks.TrainerLock(workdir, owner=jax.process_index() == 0)
  checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=None)  # see _Saver
  try:
    # A fine-tuning run's source, checked; None once the run has checkpoints of its own.
    source = init_from.resolve(config, workdir, checkpointer)
    _check_resumable(checkpointer, config, workdir)
    if jax.process_index() == 0:
      files.save_config(workdir, config)
      files.clear_finished(workdir)  # this run decides the final step
    return _train(config, workdir, mesh, rules, checkpointer, compiled_step, source)
  finally:
    checkpointer.close()
    lock.release()


def _train(config, workdir: str, mesh, rules, checkpointer, compiled_step: str,
           source: init_from.Source | None) -> dict:
  # ------------------------------------------------------------- data and state
  requested_rows = config.data.batch_size
  run, state = setup.build(config, workdir, mesh, rules, compiled_step)
  if config.data.batch_size != requested_rows and jax.process_index() == 0:
    files.save_config(workdir, config)  # the batch fitted to memory
  run_inputs = run.inputs
  valid_batches = feeding.global_eval_batches(run_inputs.valid_batches, run.batch_sharding)

  with contextlib.ExitStack() as cleanup:  # closed in reverse order, however we leave
    # ----------------------------------------------------------- resume
    train_iterator = iter(run_inputs.train_data)
    cleanup.callback(train_iterator.close)
    restored = checkpointer.restore_latest(initialize.with_shardings(state, run.shardings))
    if restored is not None:
      latest, state, iterator_states, metadata = restored
      _check_same_data(metadata, run_inputs.manifest_sha256, checkpointer.directory)
      position = iterator_states and run_inputs.restore_position(iterator_states)
      if position:
        train_iterator.set_state(position)
      logging.info('Resumed from checkpoint at step %d', latest)
    elif source is not None:  # fine-tuning: step 0 from another run's weights
      state = init_from.start_state(source, state, run.shardings)
      init_from.write_record(workdir, source)
    feeder = feeding.DeviceFeeder(train_iterator, run.batch_sharding,
                                  config.data.prefetch_to_device)
    cleanup.callback(feeder.close)
    cleanup.callback(checkpointer.wait)
    saver = _Saver(config, workdir, checkpointer, run_inputs.tokenizer.model_path,
                   run_inputs.manifest_sha256)
    log = cleanup.enter_context(_Log(workdir, run.schedule, config.num_train_steps,
                                     start=int(state['step'])))
    stops = cleanup.enter_context(stopping.StopRequests(
        config.train_time_limit_minutes, config.preemption_check_every_steps))
    trace = (cleanup.enter_context(_PairTrace(workdir, start=int(state['step'])))
             if config.data.get('trace_pairs') else None)
    text_samples = None
    if config.num_text_samples and config.task == 'translation':
      text_samples = samples_lib.TextSamples(workdir, config, run_inputs.tokenizer,
                                             run.graphdef, run.rest, mesh,
                                             config.num_text_samples)

    # ----------------------------------------------------------- the loop
    step, total, stopped, last_eval = int(state['step']), config.num_train_steps, None, {}
    while step < total and stopped is None:
      batch, slots = next(feeder)
      state, step_metrics = run.step_fn(state, run.rest, batch)
      step += 1
      log.add(step_metrics, slots)
      if trace is not None:
        trace.write(step, feeder.last_positions)
      saving = step % config.checkpoint_every_steps == 0 or step == total
      logging_now = step % config.log_every_steps == 0 or saving
      evaluating = step % config.eval_every_steps == 0 or step == total
      # Before anything that waits on the other processes: a missing one is named here.
      stopped = stops.check(step, force=logging_now or evaluating)
      if stopped is None and evaluating and config.early_stopping_patience:
        stopped = _early_stop(workdir, config.early_stopping_patience, step)
      if stopped is not None:
        saving = logging_now = True
        evaluating = stopped != 'signal'
      if logging_now:  # every process has dispatched this step: its results will come
        log.write(step)  # the losses: a non-finite one stops before any save
      if saving:  # first: a preemption's grace period is short
        saver.save(step, state, feeder.iterator_state())
      if evaluating:
        last_eval = steps.evaluate_loss(run.eval_fn, state['params'], run.rest,
                                        valid_batches)
        if 'ema' in state:
          last_eval.update({f'ema_{key}': value for key, value in steps.evaluate_loss(
              run.eval_fn, state['ema'], run.rest, valid_batches).items()})
        log.validation(step, last_eval)
        if text_samples is not None:  # by the weights inference uses by default
          log.text(step, text_samples.table(state.get('ema', state['params'])))
    if stopped == 'signal':
      logging.warning('Stopped at step %d on a signal; checkpoint saved, run the same '
                      'command to resume', step)
    else:
      checkpointer.wait()
      if jax.process_index() == 0:
        files.write_finished(workdir, step)
      if stopped == 'time limit':
        logging.info('Time limit of %.1f minutes reached at step %d',
                     config.train_time_limit_minutes, step)
      elif stopped == 'early stopping':
        best = files.best_result(workdir)
        logging.info('Early stopping at step %d: the best validation BLEU is %.2f, at '
                     'step %d', step, best['valid_bleu'], best['step'])
  logging.info('Finished at step %d after %.1f minutes; model in %s', step,
               log.minutes(), workdir)
  return {'step': step, 'stopped': stopped,
          **{f'valid_{key}': value for key, value in last_eval.items()}}


def _early_stop(workdir: str, patience: int, step: int) -> str | None:
  """'early stopping' once `patience` checkpoints scored by the eval worker after the
  best one (by validation BLEU) have not beaten it. Process 0 reads the results and
  every process acts on its verdict (collective)."""
  exhausted = (jax.process_index() == 0 and
               files.checkpoints_since_best(workdir) >= patience)
  if distributed.agree([exhausted], f'the early-stopping check after step {step}')[0]:
    return 'early stopping'
  return None


def _check_resumable(checkpointer, config, workdir: str) -> None:
  """Refuses to resume checkpoints written with an incompatible config or another
  tokenizer; reports harmless config changes."""
  latest = checkpointer.latest_step()
  saved = checkpointer.read_metadata(latest) if latest is not None else None
  if not saved:
    return
  tokenizer = files.tokenizer_path(workdir)
  checkpointing.check_compatible(
      saved, checkpointer.directory, tokenizer,
      files.sha256(tokenizer) if files.exists(tokenizer) else None)
  breaking, harmless = config_lib.resume_differences(saved['config'], config.to_dict())
  if breaking:
    raise WorkdirError(f'the checkpoints in {checkpointer.directory} were written with '
                       f'another model/tokenizer config ({"; ".join(breaking)}); use a new '
                       f'--workdir or the original values')
  if harmless:
    logging.warning('Resuming with a changed config: %s', '; '.join(harmless))


def _check_same_data(metadata: dict | None, manifest_sha256: str | None,
                     where: str) -> None:
  """Refuses to resume on other prepared data than the checkpoints were trained on:
  their data position would point into different shards."""
  saved = (metadata or {}).get('data_manifest_sha256')
  if saved and manifest_sha256 and saved != manifest_sha256:
    raise DataError(f'the checkpoints in {where} were trained on other prepared data '
                    f'(manifest sha256 {saved[:12]}, now {manifest_sha256[:12]}); use the '
                    f'original data or a new --workdir')


@dataclasses.dataclass
class _Saver:
  """Saves checkpoints (never of a non-finite state) and applies retention: the newest
  `keep_checkpoints`, plus the best by validation BLEU (eval/results.jsonl) and any a
  live eval worker has not scored yet."""
  config: ml_collections.ConfigDict
  workdir: str
  checkpointer: checkpointing.Checkpointer
  tokenizer_path: str
  manifest_sha256: str | None
  last_saved: int | None = None

  def __post_init__(self):
    self._metadata = {'config': self.config.to_dict(), 'process_count': jax.process_count(),
                      'format': checkpointing.FORMAT,
                      'tokenizer_sha256': files.sha256(self.tokenizer_path),
                      'data_manifest_sha256': self.manifest_sha256}

  def save(self, step: int, state, iterator_state) -> None:
    if step == self.last_saved:
      return
    metadata = self._metadata
    self.checkpointer.save(step, state, iterator_state, metadata)
    results = files.read_results(self.workdir)
    best = files.best_result(self.workdir, results)
    protected = set() if best is None else {best['step']}  # the best checkpoint stays
    if not self.config.delete_unscored_checkpoints and files.worker_alive(
        self.workdir):
      protected |= set(self.checkpointer.all_steps()) - {r.get('step') for r in results}
    self.checkpointer.prune(self.config.keep_checkpoints, protected, saving=step)
    self.last_saved = step


class _PairTrace:
  """config.data.trace_pairs: one JSON line per step with the global positions of the
  pairs in this process's rows, written through (a killed run keeps every line). A
  resumed run first drops the lines of steps after its checkpoint (process 0 also
  from the files of processes this run does not have), so the files tell what the
  final model was trained on. On a gs:// workdir, which has no append, each file is
  uploaded whole at most every UPLOAD_EVERY_S and at the end: a killed run loses the
  lines of its last seconds there."""

  UPLOAD_EVERY_S = 10.0

  def __init__(self, workdir: str, start: int):
    folder = files.join(workdir, files.TRAIN_LOGS)
    mine = f'pairs_{jax.process_index()}.jsonl'
    for name in files.listdir(folder):
      if not (name.startswith('pairs_') and name.endswith('.jsonl')):
        continue
      index = name[len('pairs_'):-len('.jsonl')]
      if name == mine or (jax.process_index() == 0 and index.isdigit() and
                          int(index) >= jax.process_count()):
        target = files.join(folder, name)
        kept = [line for line in files.read_lines(target)
                if line.strip() and json.loads(line)['step'] <= start]
        files.write_text(target, ''.join(f'{line}\n' for line in kept))
    self._file = files.AppendFile(files.join(folder, mine), self.UPLOAD_EVERY_S)

  def write(self, step: int, positions) -> None:
    self._file.write(json.dumps({'step': step, 'positions': positions}) + '\n')
    self._file.flush()

  def __enter__(self):
    return self

  def __exit__(self, *unused_exception) -> None:
    self._file.close()


class _Log:
  """Training and validation scalars (TensorBoard on process 0, a progress bar); the
  step metrics stay on the devices until a log step fetches them all at once, where a
  non-finite loss stops the run before anything is saved."""

  def __init__(self, workdir: str, schedule, total: int, start: int):
    self._schedule = schedule
    # Resumed from step `start`: what a killed run logged after it is logged again.
    self._train = metrics_lib.Writer(workdir, files.TRAIN_LOGS, purge_step=start + 1)
    self._valid = metrics_lib.Writer(workdir, files.VALID_LOGS, purge_step=start + 1)
    self._pending, self._slots = [], 0
    self._started = self._interval_start = time.time()
    self._progress = tqdm.tqdm(total=total, initial=start, desc='train', unit='step',
                               dynamic_ncols=True, disable=jax.process_index() != 0)

  def add(self, step_metrics, slots: int) -> None:
    self._pending.append(step_metrics)
    self._slots += slots

  def write(self, step: int) -> None:
    fetched = jax.device_get(self._pending)
    _check_finite(fetched, step - len(fetched) + 1)
    elapsed = time.time() - self._interval_start
    real_tokens = sum(m['tokens'] + m['source_tokens'] for m in fetched)
    summary = metrics_lib.summarize(fetched)
    summary.update(learning_rate=float(self._schedule(step - 1)),
                   real_tokens_per_sec=real_tokens / elapsed,
                   real_token_fraction=real_tokens / self._slots,
                   steps_per_sec=len(fetched) / elapsed)
    self._train.scalars(step, summary)
    self._progress.set_postfix(loss=f'{summary["loss"]:.3f}',
                               tok_s=f'{summary["real_tokens_per_sec"]:.0f}')
    self._progress.update(len(fetched))
    self._pending, self._slots, self._interval_start = [], 0, time.time()

  def validation(self, step: int, results: dict) -> None:
    if results:
      self._valid.scalars(step, results)
      logging.info('step %d: validation loss %.4f, accuracy %.3f', step, results['loss'],
                   results['accuracy'])
    self._interval_start = time.time()  # validation time is not training throughput

  def text(self, step: int, table: str) -> None:
    if table:
      self._valid.text(step, 'samples', table)
      self._valid.flush()

  def minutes(self) -> float:
    return (time.time() - self._started) / 60

  def __enter__(self):
    return self

  def __exit__(self, *unused_exception) -> None:
    self._progress.close()
    self._train.close()
    self._valid.close()


def _check_finite(fetched: list[dict], first_step: int) -> None:
  for offset, step_metrics in enumerate(fetched):
    if not np.isfinite(step_metrics['loss']) or not np.isfinite(step_metrics['grad_norm']):
      raise TrainingError(
          f'non-finite loss or gradient at step {first_step + offset}: stopping. Lower '
          f'config.optim.learning_rate or raise config.optim.warmup_steps; the last '
          f'checkpoint is unaffected.')
