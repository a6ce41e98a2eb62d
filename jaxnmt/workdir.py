"""The workdir: its layout and the small protocol files the trainer, the eval worker and
inference share. Every other module asks this one where things are.

  WORKDIR/
    config.json              the exact config of the run (written by the trainer)
    tokenizer.model          SentencePiece model (or a char vocabulary, JSON)
    data/                    prepared corpus: manifest.json, ArrayRecord shards, splits
    splits/                  held-out data: {valid,test}.{src,ref}, test_<name>.{src,ref}
                             (named test sets), or valid.txt (LM)
    checkpoints/<step>/      Orbax checkpoints (see checkpoint.py)
    train/, valid/           TensorBoard logs + metrics.jsonl of the trainer
    train/finished.json      the final step, once training has ended (not preempted)
    .trainer.lock            held by the live trainer (process 0)
    eval/results.jsonl       one line per scored checkpoint (the eval worker)
    eval/worker.json         the eval worker's heartbeat
    eval/                    also its TensorBoard logs, metrics.jsonl, test hypotheses
    bench.json, curves.png   written by --mode=bench and --mode=curves
"""

import fcntl
import json
import os
import time

import ml_collections

from jaxnmt import errors
from jaxnmt import tokenizer as tokenizer_lib
from jaxnmt.data.corpus import file_sha256  # pylint: disable=unused-import

CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'
SPLITS = 'splits'
CHECKPOINTS = 'checkpoints'
TRAIN_LOGS, VALID_LOGS, EVAL = 'train', 'valid', 'eval'  # TensorBoard log directories
METRICS = 'metrics.jsonl'  # in each log directory: every scalar, one JSON line each
BENCH = 'bench.json'
CURVES = 'curves.png'
FINISHED = os.path.join('train', 'finished.json')
LOCK = '.trainer.lock'
RESULTS = os.path.join(EVAL, 'results.jsonl')
WORKER = os.path.join(EVAL, 'worker.json')
# A worker silent for longer is considered gone.
HEARTBEAT_TIMEOUT_S = 600


def path(workdir: str, *parts: str) -> str:
  return os.path.join(workdir, *parts)


def exists(target: str) -> bool:
  return os.path.exists(target)


def _write_atomically(target: str, text: str) -> None:
  """Readers see the old file or the new one, never a half-written one."""
  os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
  partial = f'{target}.partial'
  with open(partial, 'w', encoding='utf-8') as handle:
    handle.write(text)
  os.replace(partial, target)


def _read_json(target: str):
  try:
    with open(target, encoding='utf-8') as handle:
      return json.load(handle)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------- config


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  _write_atomically(path(workdir, CONFIG), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  target = path(workdir, CONFIG)
  if not os.path.exists(target):
    raise errors.WorkdirError(f'{target} not found: is {workdir} a jaxnmt workdir? (train '
                              f'a model there first)')
  loaded = _read_json(target)
  if not isinstance(loaded, dict):
    raise errors.WorkdirError(f'{target} is not a readable JSON config')
  return ml_collections.ConfigDict(loaded)


def has_run(workdir: str) -> bool:
  return os.path.exists(path(workdir, CONFIG))


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_path(workdir: str) -> str:
  return path(workdir, TOKENIZER)


def load_tokenizer(workdir: str, model_type: str):
  """The tokenizer stored in `workdir` (SentencePiece, or a char vocabulary)."""
  target = tokenizer_path(workdir)
  if not os.path.exists(target):
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
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def read_lines(target: str) -> list[str]:
  if not os.path.exists(target):
    raise errors.WorkdirError(f'{target} not found')
  with open(target, encoding='utf-8') as handle:
    return handle.read().splitlines()


def write_text(target: str, text: str) -> None:
  _write_atomically(target, text)


# ----------------------------------------------------------------------------- checkpoints


def checkpoints_dir(workdir: str) -> str:
  return os.path.abspath(path(workdir, CHECKPOINTS))


# ----------------------------------------------------------------------------- finished marker


def write_finished(workdir: str, step: int) -> None:
  """Tells eval workers that `step` is the run's final checkpoint."""
  _write_atomically(path(workdir, FINISHED), json.dumps({'step': step, 'time': time.time()}))


def clear_finished(workdir: str) -> None:
  """A (re)started run decides its final step anew."""
  target = path(workdir, FINISHED)
  if os.path.exists(target):
    os.remove(target)


def finished_step(workdir: str) -> int | None:
  """The trainer's last step once it has finished (None while it runs or if it was
  preempted)."""
  marker = _read_json(path(workdir, FINISHED))
  return marker.get('step') if isinstance(marker, dict) else None


# ----------------------------------------------------------------------------- lock


class TrainerLock:
  """An exclusive lock on the workdir for the life of a training run (taken by process
  0); the OS drops it when the process dies, however it dies."""

  def __init__(self, workdir: str, owner: bool):
    os.makedirs(workdir, exist_ok=True)
    self._handle = open(path(workdir, LOCK), 'a+', encoding='utf-8')
    if not owner:
      return
    try:
      fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._handle.seek(0)
      holder = self._handle.read().strip() or 'unknown'
      self._handle.close()
      raise errors.WorkdirError(f'{workdir} is in use by another trainer (pid {holder}); '
                                f'stop it or choose another --workdir') from None
    self._handle.truncate(0)
    self._handle.write(str(os.getpid()))
    self._handle.flush()

  def release(self) -> None:
    self._handle.close()


# ----------------------------------------------------------------------------- eval worker files


def scored_steps(workdir: str) -> set[int]:
  """Steps the eval worker has written results for."""
  steps = set()
  for result in read_results(workdir):
    if isinstance(result.get('step'), int):
      steps.add(result['step'])
  return steps


def read_results(workdir: str) -> list[dict]:
  """The eval worker's results, one dict per scored checkpoint (a line still being
  written is skipped)."""
  target = path(workdir, RESULTS)
  if not os.path.exists(target):
    return []
  results = []
  with open(target, encoding='utf-8') as handle:
    for line in handle:
      try:
        results.append(json.loads(line))
      except ValueError:
        pass
  return results


def append_result(workdir: str, result: dict) -> None:
  target = path(workdir, RESULTS)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with open(target, 'a', encoding='utf-8') as handle:
    handle.write(json.dumps(result, ensure_ascii=False) + '\n')


def eval_file(workdir: str, name: str) -> str:
  os.makedirs(path(workdir, EVAL), exist_ok=True)
  return path(workdir, EVAL, name)


def write_heartbeat(workdir: str) -> None:
  _write_atomically(path(workdir, WORKER),
                    json.dumps({'pid': os.getpid(), 'heartbeat': time.time()}))


def worker_alive(workdir: str) -> bool:
  """Whether an eval worker has reported within HEARTBEAT_TIMEOUT_S."""
  beat = _read_json(path(workdir, WORKER))
  try:
    return time.time() - beat['heartbeat'] < HEARTBEAT_TIMEOUT_S
  except (TypeError, KeyError):
    return False
