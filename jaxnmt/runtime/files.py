"""Files: every path jaxnmt reads or writes, local or `gs://`, and the workdir's layout.

Part one is the path layer every access goes through. The hosts of a TPU pod share no
disk, so their workdir is an object-store path (gs://bucket/run). Paths stay plain strings. A local path keeps the os/open behaviour
jaxnmt always had; a `gs://` path goes through gcsfs (fsspec), the backend etils.epath,
and with it Orbax, uses for gs:// too, so both see the same objects.

What an object store lacks, and what this module does instead:
  * no directories: `makedirs` is a no-op; a "directory" exists while an object lies
    under it.
  * no append: `AppendFile` keeps the object's text and uploads it whole on flush.
  * no atomic rename: `write_bytes` is one upload, which is atomic by itself; `move`
    copies then deletes, so it is only for moves nothing reads concurrently (setting
    an unreadable checkpoint aside).
  * no flock: `create_exclusive` (an upload with ifGenerationMatch=0) and the
    generation-conditional rewrite and delete below, from which `locks.Lease` is built.

Needs the `gcs` extra (pip install 'jaxnmt[gcs]') for gs:// paths only.

Part two is the workdir: its layout and the small protocol files the trainer, the eval
worker and inference share. Every other module asks this one where things are.

  WORKDIR/
    config.json              the exact config of the run (written by the trainer)
    tokenizer.model          SentencePiece model (or a char vocabulary, JSON)
    data/                    prepared corpus: manifest.json, ArrayRecord shards, splits
    splits/                  held-out data: {valid,test}.{src,ref}, test_<name>.{src,ref}
                             (named test sets), or valid.txt (LM)
    checkpoints/<step>/      Orbax checkpoints (see runtime/checkpointing.py)
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

WORKDIR may be a local folder or a Cloud Storage path (gs://bucket/run). The prepared
data then lives elsewhere, on a local path (see data/prepare.py).
"""

import hashlib
import json
import os
import shutil
import threading
import time

import ml_collections

from jaxnmt import errors

GS = 'gs://'
# Only emulators and tests set this (see configure); real GCS uses Google's default
# credentials.
_EMULATOR = 'STORAGE_EMULATOR_HOST'

_configured = threading.Lock()
_state = {'fs': None, 'client': None}


def is_remote(target: str) -> bool:
  return str(target).startswith(GS)


def check_supported(target: str) -> None:
  """A clear error for URLs this layer does not know (s3://, gcs://...), rather than a
  local folder named 's3:'."""
  scheme = str(target).split('://', 1)[0] if '://' in str(target) else None
  if scheme is not None and scheme != 'gs':
    raise errors.WorkdirError(f'{target}: only local paths and gs:// are supported')


def join(base: str, *parts: str) -> str:
  if is_remote(base):
    return '/'.join([str(base).rstrip('/'), *(p.strip('/') for p in parts if p)])
  return os.path.join(base, *parts)


def dirname(target: str) -> str:
  if is_remote(target):
    return str(target).rstrip('/').rsplit('/', 1)[0]
  return os.path.dirname(os.path.abspath(target))


def absolute(target: str) -> str:
  """os.path.abspath for local paths (it would turn gs://b/x into /cwd/gs:/b/x)."""
  return str(target).rstrip('/') if is_remote(target) else os.path.abspath(target)


# ----------------------------------------------------------------------------- gcsfs setup


def configure() -> None:
  """Prepares this process for gs:// before the first access (idempotent). Why each:
    * gcsfs >= 2026 by default asks the Storage Control API (gRPC) for every bucket's
      layout; against an emulator each ask times out after 60 s, and for the plain
      buckets jaxnmt uses it is one more round trip. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
      =false (unless the user set it) selects the plain GCSFileSystem.
    * gcsfs caches listings and sizes: another writer's (tensorboardX, the eval
      worker, another host) change would be missed, and a read cut to a stale size.
      The cache is turned off, also for the instances epath (Orbax) makes.
    * TensorStore (Orbax's arrays) ignores STORAGE_EMULATOR_HOST and would hang
      trying to reach storage.googleapis.com: it gets TENSORSTORE_GCS_HTTP_URL."""
  with _configured:
    if _state['fs'] is not None:
      return
    os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
    if os.environ.get(_EMULATOR):
      os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', os.environ[_EMULATOR])
    try:
      import fsspec  # pylint: disable=g-import-not-at-top
      import gcsfs  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise errors.WorkdirError(f'a gs:// workdir needs gcsfs: pip install '
                                f"'jaxnmt[gcs]' ({error})") from None
    if os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'].lower() in ('false', '0'):
      for protocol in ('gs', 'gcs'):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False
    fsspec.config.conf.setdefault('gs', {})['use_listings_cache'] = False
    if os.environ.get(_EMULATOR):  # an emulator wants no credentials
      for protocol in ('gcs', 'gs'):
        fsspec.config.conf[protocol].setdefault('token', 'anon')
    _state['fs'] = fsspec.filesystem('gcs', use_listings_cache=False)


def _fs():
  if _state['fs'] is None:
    configure()
  return _state['fs']


def _client():
  """google-cloud-storage (installed with gcsfs): the only client with conditional
  rewrite and delete (gcsfs exposes create-if-absent alone)."""
  if _state['client'] is None:
    configure()
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    _state['client'] = storage.Client()  # an emulator: anonymous (STORAGE_EMULATOR_HOST)
  return _state['client']


def _blob(target: str):
  bucket, _, name = str(target)[len(GS):].partition('/')
  return _client().bucket(bucket).blob(name)


# ----------------------------------------------------------------------------- reading


def exists(target: str) -> bool:
  return _fs().exists(target) if is_remote(target) else os.path.exists(target)


def isdir(target: str) -> bool:
  """On gs://: whether any object lies under `target`/."""
  return _fs().isdir(target) if is_remote(target) else os.path.isdir(target)


def listdir(directory: str) -> list[str]:
  """The sorted names (not paths) in `directory`; [] if it does not exist."""
  if is_remote(directory):
    try:
      entries = _fs().ls(directory, detail=False)
    except FileNotFoundError:
      return []
    prefix = absolute(directory)[len(GS):] + '/'
    return sorted({entry[len(prefix):].rstrip('/') for entry in entries
                   if entry.startswith(prefix) and entry.rstrip('/') != prefix[:-1]} - {''})
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def open_binary(target: str, mode: str = 'rb'):
  """A byte stream of `target` ('rb') or to it ('wb'), never held whole in memory
  (gs://: fsspec's buffered object, which a write uploads in parts and publishes at
  close, atomically)."""
  if is_remote(target):
    return _fs().open(target, mode)
  if 'w' in mode:
    os.makedirs(dirname(target), exist_ok=True)
  return open(target, mode)  # pylint: disable=consider-using-with


def read_bytes(target: str) -> bytes:
  if is_remote(target):
    return _fs().cat_file(target)
  with open(target, 'rb') as handle:
    return handle.read()


def read_text(target: str) -> str:
  return read_bytes(target).decode('utf-8')


def read_json(target: str):
  """The JSON in `target`, or None if it is absent or unreadable."""
  try:
    return json.loads(read_text(target))
  except (OSError, ValueError):
    return None


def getmtime(target: str) -> float:
  if is_remote(target):
    return _fs().info(target)['mtime'].timestamp()  # the server's clock
  return os.path.getmtime(target)


def sha256(target: str) -> str:
  digest = hashlib.sha256()
  if is_remote(target):
    digest.update(read_bytes(target))
    return digest.hexdigest()
  with open(target, 'rb') as handle:
    for block in iter(lambda: handle.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


def makedirs(directory: str) -> None:
  """A no-op on gs:// (objects make their prefixes appear)."""
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)


def write_bytes(target: str, data: bytes) -> None:
  """Replaces `target` whole; readers see the old or the new content, never a mix
  (gs://: one upload is atomic; local: a `.partial` file swapped in by os.replace)."""
  if is_remote(target):
    _fs().pipe_file(target, data)
    return
  os.makedirs(dirname(target), exist_ok=True)
  partial = f'{target}.partial'
  with open(partial, 'wb') as handle:
    handle.write(data)
  os.replace(partial, target)


def write_text(target: str, text: str) -> None:
  write_bytes(target, text.encode('utf-8'))


def append_text(target: str, text: str) -> None:
  """Appends `text` to `target` (creating it). gs:// has no append: the object is read
  and uploaded again whole, so a single writer per object is assumed."""
  if is_remote(target):
    before = read_text(target) if exists(target) else ''
    write_text(target, before + text)
    return
  os.makedirs(dirname(target), exist_ok=True)
  with open(target, 'a', encoding='utf-8') as handle:
    handle.write(text)


def create_exclusive(target: str, text: str) -> bool:
  """Creates `target` holding `text` only if it does not exist yet: True if this call
  created it. The primitive locks are built from (gs://: ifGenerationMatch=0, which
  the store checks atomically; local: open(..., 'x'))."""
  if is_remote(target):
    try:
      _fs().pipe_file(target, text.encode('utf-8'), mode='create')
      return True
    except FileExistsError:
      return False
  os.makedirs(dirname(target), exist_ok=True)
  try:
    with open(target, 'x', encoding='utf-8') as handle:
      handle.write(text)
    return True
  except FileExistsError:
    return False


def remove(target: str, missing_ok: bool = True) -> None:
  try:
    if is_remote(target):
      _fs().rm_file(target)
    else:
      os.remove(target)
  except FileNotFoundError:
    if not missing_ok:
      raise


def rmtree(directory: str) -> None:
  if is_remote(directory):
    if _fs().exists(directory):
      _fs().rm(directory, recursive=True)
  else:
    shutil.rmtree(directory, ignore_errors=True)


def copy_file(source: str, target: str) -> None:
  """Copies one file between any two places (local or gs://), atomically at `target`."""
  write_bytes(target, read_bytes(source))


def move(source: str, target: str) -> None:
  """Renames a file or folder. On gs:// a copy of each object, then deletes: not
  atomic, so only for what nobody reads while it moves."""
  if is_remote(source):
    _fs().mv(source, target, recursive=True)
  else:
    os.rename(source, target)


class AppendFile:
  """A text file written by appending, by one writer (metrics.jsonl, pair traces).
  Local: a file opened for append, flushed through. gs://: the object's text kept in
  memory and uploaded whole by `flush` (at most every `upload_every_s`) and `close`."""

  def __init__(self, target: str, upload_every_s: float = 0.0):
    self.target = target
    self._remote = is_remote(target)
    self._upload_every_s = upload_every_s
    if self._remote:
      self._text = read_text(target) if exists(target) else ''
      self._dirty, self._uploaded = False, 0.0
    else:
      os.makedirs(dirname(target), exist_ok=True)
      self._handle = open(target, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def write(self, text: str) -> None:
    if self._remote:
      self._text += text
      self._dirty = True
    else:
      self._handle.write(text)

  def flush(self, force: bool = False) -> None:
    if not self._remote:
      self._handle.flush()
    elif self._dirty and (force or time.time() - self._uploaded >= self._upload_every_s):
      write_text(self.target, self._text)
      self._dirty, self._uploaded = False, time.time()

  def close(self) -> None:
    if self._remote:
      self.flush(force=True)
    else:
      self._handle.close()


# ------------------------------------------------------ generation-conditional (gs:// only)
# Every gs:// object has a generation, which changes with each write. Writing or
# deleting "only if the generation is still N" is what makes a lease safe without
# flock: of two processes acting on the same stale lease, only one succeeds.


def read_with_generation(target: str) -> tuple[bytes, int] | None:
  """(content, generation) that belong together, or None if `target` is absent."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  blob = _blob(target)
  for _ in range(5):
    try:
      blob.reload()  # emulators send no generation header with downloads: ask first
      generation = blob.generation
      return blob.download_as_bytes(if_generation_match=generation), generation
    except exceptions.NotFound:
      return None
    except exceptions.PreconditionFailed:
      continue  # rewritten between the two requests
  raise OSError(f'{target} keeps changing')


def replace_if_generation(target: str, data: bytes, generation: int) -> int | None:
  """Writes `target` only if it is still at `generation` (0: only if it is absent).
  The new generation, or None if another process changed or removed it."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  if generation is None:
    raise ValueError('a generation is required (None would write unconditionally)')
  blob = _blob(target)
  try:
    blob.upload_from_string(data, if_generation_match=generation)
  except exceptions.PreconditionFailed:
    return None
  return blob.generation


def remove_if_generation(target: str, generation: int) -> bool:
  """Deletes `target` only if it is still at `generation`: True if this call did."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  if generation is None:
    raise ValueError('a generation is required (None would delete unconditionally)')
  try:
    _blob(target).delete(if_generation_match=generation)
    return True
  except (exceptions.PreconditionFailed, exceptions.NotFound):
    return False


# ============================================================================= the workdir

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


# ----------------------------------------------------------------------------- config


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_text(join(workdir, CONFIG), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  target = join(workdir, CONFIG)
  if not exists(target):
    raise errors.WorkdirError(f'{target} not found: is {workdir} a jaxnmt workdir? (train '
                              f'a model there first)')
  loaded = read_json(target)
  if not isinstance(loaded, dict):
    raise errors.WorkdirError(f'{target} is not a readable JSON config')
  return ml_collections.ConfigDict(loaded)


def has_run(workdir: str) -> bool:
  return exists(join(workdir, CONFIG))


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_path(workdir: str) -> str:
  return join(workdir, TOKENIZER)


# ----------------------------------------------------------------------------- splits


def splits_dir(workdir: str) -> str:
  return join(workdir, SPLITS)


def split_file(workdir: str, name: str) -> str:
  """`name`: e.g. 'test.src', 'valid.ref', 'valid.txt'."""
  return join(workdir, SPLITS, name)


def read_lines(target: str) -> list[str]:
  try:
    return read_text(target).splitlines()
  except FileNotFoundError:
    raise errors.WorkdirError(f'{target} not found') from None


# ----------------------------------------------------------------------------- checkpoints


def checkpoints_dir(workdir: str) -> str:
  return absolute(join(workdir, CHECKPOINTS))


def averaged_dir(workdir: str, name: str = '') -> str:
  """Where --mode=average writes the weights called `name` (none: the folder of all)."""
  return absolute(join(workdir, AVERAGED, *([name] if name else [])))


# ----------------------------------------------------------------------------- finished marker


def write_finished(workdir: str, step: int) -> None:
  """Tells eval workers that `step` is the run's final checkpoint."""
  write_text(join(workdir, FINISHED), json.dumps({'step': step, 'time': time.time()}))


def clear_finished(workdir: str) -> None:
  """A (re)started run decides its final step anew."""
  remove(join(workdir, FINISHED))


def finished_step(workdir: str) -> int | None:
  """The trainer's last step once it has finished (None while it runs or if it was
  preempted)."""
  marker = read_json(join(workdir, FINISHED))
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
    return read_text(join(workdir, RESULTS))
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
  target = join(workdir, RESULTS)
  line = json.dumps(result, ensure_ascii=False) + '\n'
  text = _read_results_text(workdir)
  earlier = _latest(text)
  if (text and not text.endswith('\n')) or any(
      previous.get('step') == result['step'] for previous in earlier):
    write_text(target, ''.join(
        json.dumps(previous, ensure_ascii=False) + '\n' for previous in earlier
        if previous.get('step') != result['step']) + line)
    return
  append_text(target, line)  # on gs:// the object is rewritten whole


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
  makedirs(join(workdir, EVAL))
  return join(workdir, EVAL, name)


def worker_alive(workdir: str) -> bool:
  """Whether an eval worker has reported within HEARTBEAT_TIMEOUT_S."""
  beat = read_json(join(workdir, WORKER))
  try:
    return time.time() - beat['heartbeat'] < HEARTBEAT_TIMEOUT_S
  except (TypeError, KeyError):
    return False
