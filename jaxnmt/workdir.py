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
    eval/worker.json         the live eval worker's lease, which is also its heartbeat
    eval/                    also its TensorBoard logs, metrics.jsonl, test hypotheses
    bench.json, curves.png   written by --mode=bench and --mode=curves
"""

import fcntl
import json
import logging
import os
import secrets
import socket
import threading
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
# A worker silent for longer is considered gone (and its lease may be taken over).
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


# ----------------------------------------------------------------------------- leases


class Lease:
  """An exclusive claim on one role in a workdir (the eval worker; later maybe the
  trainer), held as a small JSON file: the owner (host, pid, a random token) and a
  heartbeat time the owner refreshes.

  It is built only from what object stores offer too (gs:// has no flock and no
  atomic rename): the file is created only if absent (`open(..., 'x')`; a create with
  if-generation-match=0 there), and rewritten whole. A holder silent for longer than
  `timeout_s`, or whose process is gone on this very host, is stale: its lease is
  taken over, with a warning. Two processes taking over one stale lease can both
  believe they hold it only within a few instructions; `refresh` then finds the other
  token in the file and raises, so at most one goes on past its next heartbeat."""

  def __init__(self, workdir: str, name: str, what: str,
               timeout_s: float = HEARTBEAT_TIMEOUT_S):
    self.target = path(workdir, name)
    self._workdir, self._what, self._timeout_s = workdir, what, timeout_s
    self._token = secrets.token_hex(8)
    self._since = time.time()
    self._held = False
    self._mutex = threading.Lock()  # refresh (a heartbeat thread) against release
    os.makedirs(os.path.dirname(os.path.abspath(self.target)), exist_ok=True)
    for _ in range(3):
      try:
        with open(self.target, 'x', encoding='utf-8') as handle:
          handle.write(self._record())
        self._held = True
        return
      except FileExistsError:
        pass
      holder = _read_json(self.target)
      if holder is None and not os.path.exists(self.target):
        continue  # released this instant
      stale = self._stale(holder)
      if stale is None:
        raise errors.WorkdirError(
            f'{workdir} is in use by another {what} ({_describe(holder)}); stop it '
            f'first (the lease of one that died lapses {timeout_s:.0f} s after its last '
            f'heartbeat)')
      logging.warning('Taking over the %s lease %s from %s: %s', what, self.target,
                      _describe(holder), stale)
      if _read_json(self.target) == holder:  # not taken over by another meanwhile
        try:
          os.remove(self.target)
        except FileNotFoundError:
          pass
    raise errors.WorkdirError(f'{workdir}: could not take the {what} lease '
                              f'{self.target}: other processes keep taking it')

  def _record(self) -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                       'token': self._token, 'since': self._since,
                       'heartbeat': time.time()})

  def _stale(self, holder) -> str | None:
    """Why the lease in the file may be taken over, or None while its holder lives. A
    file without a readable heartbeat (being created this instant) is judged by its
    modification time."""
    beat = holder.get('heartbeat') if isinstance(holder, dict) else None
    if not isinstance(beat, (int, float)):
      try:
        beat = os.path.getmtime(self.target)
      except OSError:
        return 'released'
    silent = time.time() - beat
    if silent > self._timeout_s:
      return f'silent for {silent:.0f} s (more than {self._timeout_s:.0f} s)'
    if isinstance(holder, dict) and holder.get('host') == socket.gethostname() and \
        isinstance(holder.get('pid'), int) and not _pid_alive(holder['pid']):
      return f'its process {holder["pid"]} is gone'
    return None

  def refresh(self) -> None:
    """Renews the heartbeat. A WorkdirError if another process has taken the lease
    over (this holder was silent too long): it must stop without writing more."""
    with self._mutex:
      if not self._held:
        return
      holder = _read_json(self.target)
      if not isinstance(holder, dict) or holder.get('token') != self._token:
        self._held = False
        raise errors.WorkdirError(
            f'this {self._what} lost its lease on {self._workdir} to '
            f'{_describe(holder)} (silent for more than {self._timeout_s:.0f} s?); '
            f'stopping')
      _write_atomically(self.target, self._record())

  def release(self) -> None:
    """Gives the lease up (a no-op if it is no longer ours)."""
    with self._mutex:
      if not self._held:
        return
      self._held = False
      holder = _read_json(self.target)
      if isinstance(holder, dict) and holder.get('token') == self._token:
        try:
          os.remove(self.target)
        except FileNotFoundError:
          pass


class EvalLock(Lease):
  """One eval worker per workdir: its lease, eval/worker.json, is also the heartbeat by
  which the trainer keeps the checkpoints a live worker has not scored. Held by
  process 0 of the worker."""

  def __init__(self, workdir: str, timeout_s: float = HEARTBEAT_TIMEOUT_S):
    super().__init__(workdir, WORKER, 'eval worker', timeout_s)


def _describe(holder) -> str:
  if not isinstance(holder, dict):
    return 'an unknown process'
  beat = holder.get('heartbeat')
  age = (f', last heartbeat {time.time() - beat:.0f} s ago'
         if isinstance(beat, (int, float)) else '')
  return f'pid {holder.get("pid", "?")} on {holder.get("host", "an unknown host")}{age}'


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return True  # not a process we can ask about: assume alive
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


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
  target = path(workdir, RESULTS)
  if not os.path.exists(target):
    return ''
  with open(target, encoding='utf-8') as handle:
    return handle.read()


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
  os.makedirs(os.path.dirname(target), exist_ok=True)
  line = json.dumps(result, ensure_ascii=False) + '\n'
  text = _read_results_text(workdir)
  earlier = _latest(text)
  if (text and not text.endswith('\n')) or any(
      previous.get('step') == result['step'] for previous in earlier):
    _write_atomically(target, ''.join(
        json.dumps(previous, ensure_ascii=False) + '\n' for previous in earlier
        if previous.get('step') != result['step']) + line)
    return
  with open(target, 'a', encoding='utf-8') as handle:
    handle.write(line)


def eval_file(workdir: str, name: str) -> str:
  os.makedirs(path(workdir, EVAL), exist_ok=True)
  return path(workdir, EVAL, name)


def worker_alive(workdir: str) -> bool:
  """Whether an eval worker has reported within HEARTBEAT_TIMEOUT_S."""
  beat = _read_json(path(workdir, WORKER))
  try:
    return time.time() - beat['heartbeat'] < HEARTBEAT_TIMEOUT_S
  except (TypeError, KeyError):
    return False
