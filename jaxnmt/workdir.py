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

WORKDIR may be a local folder or a Cloud Storage path (gs://bucket/run, for the hosts
of a TPU pod, which share no disk): every access goes through `storage`. The prepared
data then lives elsewhere, on a local path (see data/prepare.py).
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
from jaxnmt import storage
from jaxnmt import tokenizer as tokenizer_lib

CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'
SPLITS = 'splits'
CHECKPOINTS = 'checkpoints'
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


# ----------------------------------------------------------------------------- lock


class TrainerLock:
  """An exclusive lock on the workdir for the life of a training run (taken by process
  0). Local: flock, which the OS drops when the process dies, however it dies. gs://
  has no flock: there it is a `Lease` on .trainer.lock whose heartbeat a background
  thread renews, so the lock of a trainer that died lapses after HEARTBEAT_TIMEOUT_S
  (at once when its host sees its process is gone)."""

  def __init__(self, workdir: str, owner: bool,
               heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S):
    self._handle = self._lease = self._beat = None
    if storage.is_remote(workdir):
      if owner:
        self._lease = Lease(workdir, LOCK, 'trainer', heartbeat_timeout_s)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat,
                                      args=(heartbeat_timeout_s / 10,), daemon=True)
        self._beat.start()
      return
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

  def _heartbeat(self, every: float) -> None:
    while not self._stop.wait(every):
      try:
        self._lease.refresh()
      except errors.WorkdirError as error:  # taken over: nothing stops the loop from here
        logging.error('%s', error)
        return
      except OSError as error:  # a passing storage fault: try again next beat
        logging.warning('Could not refresh %s: %s', self._lease.target, error)

  def release(self) -> None:
    if self._handle is not None:
      self._handle.close()
    if self._lease is not None:
      self._stop.set()
      self._beat.join(timeout=60)
      self._lease.release()


# ----------------------------------------------------------------------------- leases


class Lease:
  """An exclusive claim on one role in a workdir (the eval worker; on gs:// also the
  trainer), held as a small JSON file: the owner (host, pid, a random token) and a
  heartbeat time the owner refreshes.

  It is built only from what object stores offer too (no flock, no atomic rename): the
  file is created only if absent, and rewritten whole. A holder silent for longer than
  `timeout_s`, or whose process is gone on this very host, is stale: its lease is
  taken over, with a warning.

  Locally the file is created with open(..., 'x'); two processes taking over one stale
  lease can both believe they hold it only within a few instructions, and `refresh`
  then finds the other token in the file and raises, so at most one goes on past its
  next heartbeat. On gs:// every step is conditional on the object's generation
  (create: only if absent; take over and release: delete only the generation read;
  refresh: rewrite only the generation written last), so of two contenders exactly
  one wins, and a holder whose lease was taken over learns it at its next refresh.
  The heartbeat times are the hosts' clocks: keep them roughly in sync (NTP)."""

  def __init__(self, workdir: str, name: str, what: str,
               timeout_s: float = HEARTBEAT_TIMEOUT_S):
    self.target = path(workdir, name)
    self._workdir, self._what, self._timeout_s = workdir, what, timeout_s
    self._remote = storage.is_remote(self.target)
    self._token = secrets.token_hex(8)
    self._since = time.time()
    self._held = False
    self._generation = None  # gs:// only: the generation of our last write
    self._mutex = threading.Lock()  # refresh (a heartbeat thread) against release
    for _ in range(3):
      if self._create():
        self._held = True
        return
      holder, version = self._read()
      if holder is None and not storage.exists(self.target):
        continue  # released this instant
      stale = self._stale(holder)
      if stale is None:
        raise errors.WorkdirError(
            f'{workdir} is in use by another {what} ({_describe(holder)}); stop it '
            f'first (the lease of one that died lapses {timeout_s:.0f} s after its last '
            f'heartbeat)')
      logging.warning('Taking over the %s lease %s from %s: %s', what, self.target,
                      _describe(holder), stale)
      self._remove(holder, version)
    raise errors.WorkdirError(f'{workdir}: could not take the {what} lease '
                              f'{self.target}: other processes keep taking it')

  # The four storage steps, local or conditional on the generation (gs://).

  def _create(self) -> bool:
    if not self._remote:
      return storage.create_exclusive(self.target, self._record())
    self._generation = storage.replace_if_generation(
        self.target, self._record().encode(), 0)
    return self._generation is not None

  def _read(self):
    """(the holder's record or None, its generation on gs://)."""
    if not self._remote:
      return _read_json(self.target), None
    found = storage.read_with_generation(self.target)
    if found is None:
      return None, None
    try:
      return json.loads(found[0]), found[1]
    except ValueError:
      return None, found[1]

  def _remove(self, holder, version) -> None:
    """Deletes the lease file read as (`holder`, `version`) unless it changed since."""
    if self._remote:
      storage.remove_if_generation(self.target, version)
    elif _read_json(self.target) == holder:  # not taken over by another meanwhile
      storage.remove(self.target)

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
        beat = storage.getmtime(self.target)
      except OSError:
        return 'released'
    silent = time.time() - beat
    if silent > self._timeout_s:
      return f'silent for {silent:.0f} s (more than {self._timeout_s:.0f} s)'
    if isinstance(holder, dict) and holder.get('host') == socket.gethostname() and \
        isinstance(holder.get('pid'), int) and not _pid_alive(holder['pid']):
      return f'its process {holder["pid"]} is gone'
    return None

  def _lost(self, holder) -> errors.WorkdirError:
    self._held = False
    return errors.WorkdirError(
        f'this {self._what} lost its lease on {self._workdir} to {_describe(holder)} '
        f'(silent for more than {self._timeout_s:.0f} s?); stopping')

  def refresh(self) -> None:
    """Renews the heartbeat. A WorkdirError if another process has taken the lease
    over (this holder was silent too long): it must stop without writing more."""
    with self._mutex:
      if not self._held:
        return
      if self._remote:
        generation = storage.replace_if_generation(
            self.target, self._record().encode(), self._generation)
        if generation is None:
          raise self._lost(self._read()[0])
        self._generation = generation
        return
      holder = _read_json(self.target)
      if not isinstance(holder, dict) or holder.get('token') != self._token:
        raise self._lost(holder)
      _write_atomically(self.target, self._record())

  def release(self) -> None:
    """Gives the lease up (a no-op if it is no longer ours)."""
    with self._mutex:
      if not self._held:
        return
      self._held = False
      if self._remote:
        storage.remove_if_generation(self.target, self._generation)
        return
      holder = _read_json(self.target)
      if isinstance(holder, dict) and holder.get('token') == self._token:
        storage.remove(self.target)


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
