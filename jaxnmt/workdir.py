"""The workdir: its layout and the small protocol files the trainer, the eval worker and
inference share. Every other module asks this one where things are.

  WORKDIR/
    config.json              the exact config of the run (written by the trainer)
    tokenizer.model          SentencePiece model (or a char vocabulary, JSON)
    data/                    prepared corpus: manifest.json, ArrayRecord shards, splits
    splits/                  held-out data: {valid,test}.{src,ref}, test_<name>.{src,ref}
                             (named test sets), or valid.txt (LM)
    checkpoints/<step>/      Orbax checkpoints (see checkpoint.py)
    averaged/<name>/         averaged weights (--mode=average): params/ (Orbax) and
                             info.json; never resumed from, never pruned
    eval/best.json           the checkpoint with the best validation BLEU so far
    train/, valid/           TensorBoard logs + metrics.jsonl of the trainer
    train/finished.json      the final step, once training has ended (not preempted)
    .trainer.lock            held by the live trainer (process 0)
    eval/results.jsonl       one line per scored checkpoint (the eval worker)
    eval/worker.json         the live eval worker's lease, which is also its heartbeat
    eval/                    also its TensorBoard logs, metrics.jsonl, test hypotheses
    bench.json, curves.png   written by --mode=bench and --mode=curves

WORKDIR may be a local folder or a Cloud Storage path (gs://bucket/run, for the hosts
of a TPU pod, which share no disk): every access goes through `storage`. The prepared
data then lives elsewhere, on a local path (see data/prepare.py).
"""

import json
import time

import ml_collections

from jaxnmt import errors
from jaxnmt import storage
from jaxnmt import tokenizer as tokenizer_lib

CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'
SPLITS = 'splits'
CHECKPOINTS = 'checkpoints'
AVERAGED = 'averaged'
TRAIN_LOGS, VALID_LOGS, EVAL = 'train', 'valid', 'eval'  # TensorBoard log directories
METRICS = 'metrics.jsonl'  # in each log directory: every scalar, one JSON line each
BENCH = 'bench.json'
CURVES = 'curves.png'
FINISHED = 'train/finished.json'
LOCK = '.trainer.lock'
RESULTS = f'{EVAL}/results.jsonl'
WORKER = f'{EVAL}/worker.json'
# A worker silent for longer is considered gone (and its lease may be taken over).
HEARTBEAT_TIMEOUT_S = 600


def path(workdir: str, *parts: str) -> str:
  return storage.join(workdir, *parts)


def exists(target: str) -> bool:
  return storage.exists(target)


def file_sha256(target: str) -> str:
  return storage.sha256(target)


def _write_atomically(target: str, text: str) -> None:
  """Readers see the old file or the new one, never a half-written one."""
  storage.write_text(target, text)


def _read_json(target: str):
  return storage.read_json(target)


# ----------------------------------------------------------------------------- config


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  _write_atomically(path(workdir, CONFIG), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  target = path(workdir, CONFIG)
  if not storage.exists(target):
    raise errors.WorkdirError(f'{target} not found: is {workdir} a jaxnmt workdir? (train '
                              f'a model there first)')
  loaded = _read_json(target)
  if not isinstance(loaded, dict):
    raise errors.WorkdirError(f'{target} is not a readable JSON config')
  return ml_collections.ConfigDict(loaded)


def has_run(workdir: str) -> bool:
  return storage.exists(path(workdir, CONFIG))


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_path(workdir: str) -> str:
  return path(workdir, TOKENIZER)


def load_tokenizer(workdir: str, model_type: str):
  """The tokenizer stored in `workdir` (SentencePiece, or a char vocabulary)."""
  target = tokenizer_path(workdir)
  if not storage.exists(target):
    raise errors.WorkdirError(f'{target} not found: train a model in {workdir} first')
  return tokenizer_lib.load(target, model_type)


# ----------------------------------------------------------------------------- splits


def splits_dir(workdir: str) -> str:
  return path(workdir, SPLITS)


def split_file(workdir: str, name: str) -> str:
  """`name`: e.g. 'test.src', 'valid.ref', 'valid.txt'."""
  return path(workdir, SPLITS, name)


def list_dir(directory: str) -> list[str]:
  """The names in `directory` ([] if it does not exist)."""
  return storage.listdir(directory)


def read_lines(target: str) -> list[str]:
  try:
    return storage.read_text(target).splitlines()
  except FileNotFoundError:
    raise errors.WorkdirError(f'{target} not found') from None


def write_text(target: str, text: str) -> None:
  _write_atomically(target, text)


# ----------------------------------------------------------------------------- checkpoints


def checkpoints_dir(workdir: str) -> str:
  return storage.absolute(path(workdir, CHECKPOINTS))


def averaged_dir(workdir: str, name: str = '') -> str:
  """Where --mode=average writes the weights called `name` (none: the folder of all)."""
  return storage.absolute(path(workdir, AVERAGED, *([name] if name else [])))


# ----------------------------------------------------------------------------- finished marker


def write_finished(workdir: str, step: int) -> None:
  """Tells eval workers that `step` is the run's final checkpoint."""
  _write_atomically(path(workdir, FINISHED), json.dumps({'step': step, 'time': time.time()}))


def clear_finished(workdir: str) -> None:
  """A (re)started run decides its final step anew."""
  storage.remove(path(workdir, FINISHED))


def finished_step(workdir: str) -> int | None:
  """The trainer's last step once it has finished (None while it runs or if it was
  preempted)."""
  marker = _read_json(path(workdir, FINISHED))
  return marker.get('step') if isinstance(marker, dict) else None


# ----------------------------------------------------------------------------- eval worker files


def scored_steps(workdir: str) -> set[int]:
  """Steps the eval worker has written results for."""
  return {result['step'] for result in read_results(workdir)
          if isinstance(result.get('step'), int)}


def read_results(workdir: str) -> list[dict]:
  """The eval worker's results, one dict per scored checkpoint (a line still being
  written, or cut short by a crash, is skipped). Should a step appear twice (a file
  from an older jaxnmt), its last result counts."""
  return _latest(_read_results_text(workdir))


def _read_results_text(workdir: str) -> str:
  try:
    return storage.read_text(path(workdir, RESULTS))
  except FileNotFoundError:
    return ''


def _latest(text: str) -> list[dict]:
  """The results in `text`, the last one of each step, in file order."""
  results = {}
  for index, line in enumerate(text.splitlines()):
    try:
      result = json.loads(line)
    except ValueError:
      continue
    if isinstance(result, dict):
      step = result.get('step')
      key = step if isinstance(step, int) else ('unnumbered', index)
      results.pop(key, None)
      results[key] = result
  return list(results.values())


def append_result(workdir: str, result: dict) -> None:
  """Adds the result of a scored checkpoint. The file never holds a step twice: a step
  scored again (--checkpoint_step) replaces its earlier line, and a line cut short by
  a crash is dropped, both by writing the whole file anew and swapping it in; the
  usual case, a new step, is one appended line."""
  target = path(workdir, RESULTS)
  line = json.dumps(result, ensure_ascii=False) + '\n'
  text = _read_results_text(workdir)
  earlier = _latest(text)
  if (text and not text.endswith('\n')) or any(
      previous.get('step') == result['step'] for previous in earlier):
    _write_atomically(target, ''.join(
        json.dumps(previous, ensure_ascii=False) + '\n' for previous in earlier
        if previous.get('step') != result['step']) + line)
    return
  storage.append_text(target, line)  # on gs:// the object is rewritten whole


def best_result(workdir: str, results: list[dict] | None = None) -> dict | None:
  """The scored checkpoint with the highest validation BLEU (the earliest of equals),
  or None before any has one."""
  results = read_results(workdir) if results is None else results
  scored = [result for result in results if isinstance(result.get('valid_bleu'), (int, float))
            and isinstance(result.get('step'), int)]
  return max(scored, key=lambda result: (result['valid_bleu'], -result['step']),
             default=None)


def checkpoints_since_best(workdir: str) -> int:
  """How many checkpoints scored after the best one (by validation BLEU) have not
  beaten it: what early stopping's patience counts."""
  results = read_results(workdir)
  best = best_result(workdir, results)
  if best is None:
    return 0
  return sum(1 for result in results if isinstance(result.get('valid_bleu'), (int, float))
             and isinstance(result.get('step'), int) and result['step'] > best['step'])


def eval_file(workdir: str, name: str) -> str:
  storage.makedirs(path(workdir, EVAL))
  return path(workdir, EVAL, name)


def worker_alive(workdir: str) -> bool:
  """Whether an eval worker has reported within HEARTBEAT_TIMEOUT_S."""
  beat = _read_json(path(workdir, WORKER))
  try:
    return time.time() - beat['heartbeat'] < HEARTBEAT_TIMEOUT_S
  except (TypeError, KeyError):
    return False
