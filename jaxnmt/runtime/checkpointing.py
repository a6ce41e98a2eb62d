"""Orbax checkpoints: the train state, every process's data-iterator position, and the
run's metadata (config, tokenizer fingerprint).

Layout: WORKDIR/checkpoints/<step>/{state, data_iterators, metadata}. Saves are
asynchronous: the train loop hands the arrays to Orbax and goes on; Orbax writes to a
temporary folder and renames it when complete (on gs://, which has no rename, it writes
in place and marks the step complete with <step>/commit_success.txt last), so a
half-written step is never listed or read. A checkpoint that cannot be read is moved aside (never deleted) and the next
older one is used.

Every file of a step is checksummed (CRC-32) once the step is complete, by the process
that wrote it (process 0 also for the files written for all: manifests, metadata), into
<step>/checksums/process_<i>.json. Before the collective restore each process verifies
the files written by the process of its own index (on an unchanged topology: its own
shards, which it reads back), the processes agree, and a step with a bad file is set
aside before Orbax reads any of it: a corrupt array file that only one process reads
cannot leave the others waiting inside Orbax.
"""

import concurrent.futures
import json
import logging
import os
import re
import threading
import time
import zlib

import jax
import orbax.checkpoint as ocp

from jaxnmt.runtime import distributed
from jaxnmt.runtime import files
from jaxnmt.errors import CheckpointError, RuntimeFailure, WorkdirError

# A data-iterator state must fit in this many bytes of JSON to be gathered across hosts.
MAX_ITERATOR_STATE_BYTES = 1 << 20
# On gs:// Orbax lists a step only once this object exists in it.
_COMMIT_MARKER = 'commit_success.txt'
# Each process's record of the checksums of the files it wrote in a step:
# <step>/checksums/process_<i>.json.
CHECKSUMS = 'checksums'
_CHUNK = 8 << 20
# The layout of the saved state (the parameter tree); stored in each checkpoint's
# metadata. 2: one Transformer block for encoder, decoder and LM.
FORMAT = 2


class SaveError(RuntimeFailure):
  """A checkpoint could not be written (disk full, permissions, the store): training
  stops on every process; complete checkpoints are untouched."""


def check_compatible(metadata: dict, where: str, tokenizer_path: str,
                     tokenizer_sha256: str | None) -> None:
  """Refuses a checkpoint of another state layout, or one trained with another
  tokenizer than the workdir's (`tokenizer_sha256`; None: no tokenizer yet), before
  anything is read or moved."""
  found = metadata.get('format', 1)
  if found != FORMAT:
    raise WorkdirError(f'the checkpoints in {where} have layout {found}, this jaxnmt reads '
                       f'layout {FORMAT} (an earlier model definition); train in a new '
                       f'--workdir, or use the jaxnmt version that wrote them')
  saved = metadata.get('tokenizer_sha256')
  if tokenizer_sha256 and saved and saved != tokenizer_sha256:
    raise WorkdirError(f'{tokenizer_path} is not the tokenizer the checkpoints in {where} '
                       f'were trained with (sha256 differs)')


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int | None = 3, read_only: bool = False):
    self.directory = files.checkpoints_dir(workdir)
    if files.is_remote(self.directory):
      files.configure()  # before Orbax (TensorStore, epath) touches gs://
    # Orbax's own barriers wait as long as jaxnmt's agreement points do.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True,
        async_options=ocp.options.AsyncOptions(
            timeout_secs=int(distributed.collective_timeout_s())))
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._unrecorded: list[int] = []  # saved steps whose checksums are not written yet
    self._recorder: threading.Thread | None = None

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, data_iterator_state: dict | None = None,
           metadata: dict | None = None) -> None:
    """Starts an asynchronous save at `step`. Every process calls it (it is collective):
    `data_iterator_state` is this process's; all of them are gathered and stored."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator_state is not None:
      items['data_iterators'] = ocp.args.JsonSave(
          {'per_process': gather_json(data_iterator_state, step)})
    if metadata is not None:
      items['metadata'] = ocp.args.JsonSave(metadata)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as error:  # pylint: disable=broad-except  # OSError, TensorStore, ...
      raise self._save_error(f'could not save checkpoint {step}', error) from error
    # Orbax has finished the steps before this one (it waits for them before a save):
    # checksum them in the background while this one is written.
    self._record_checksums(background=True)
    self._unrecorded.append(step)

  def _record_checksums(self, background: bool) -> None:
    """Writes this process's checksums of the complete steps saved so far."""
    if self._recorder is not None:
      self._recorder.join()
      self._recorder = None
    steps, self._unrecorded = self._unrecorded, []
    if not steps:
      return
    if background:
      self._recorder = threading.Thread(target=self._write_checksums, args=(steps,),
                                        name='checkpoint-checksums', daemon=True)
      self._recorder.start()
    else:
      self._write_checksums(steps)

  def _write_checksums(self, steps: list[int]) -> None:
    index = jax.process_index()
    for step in steps:
      base = files.join(self.directory, str(step))
      try:
        if not files.exists(files.join(base, 'state')):
          continue  # pruned already, or never completed
        record = {name: [size, crc] for name, (size, crc) in
                  _checksums(base, _written_by(base, index)).items()}
        files.write_text(files.join(base, CHECKSUMS, f'process_{index}.json'),
                         json.dumps({'algorithm': 'crc32', 'files': record}))
      except (OSError, ValueError) as error:  # a step deleted meanwhile: nothing to record
        logging.warning('checksums of checkpoint %s not recorded: %s', base, error)

  def _save_error(self, what: str, error: Exception) -> SaveError:
    return SaveError(f'{what} in {self.directory}: {type(error).__name__}: '
                     f'{str(error).splitlines()[0][:300] if str(error) else ""}; the '
                     f'complete checkpoints there are untouched: rerun to resume')

  def restore(self, step: int, abstract_state) -> tuple[object, dict | None, dict | None]:
    """Restores `step` onto the shardings of `abstract_state` (ShapeDtypeStructs with
    .sharding). Returns (state, the data-iterator states of every process that saved it
    or None, metadata or None)."""
    path = files.join(self.directory, str(step))
    try:
      present = set(files.listdir(path))
      items = {'state': ocp.args.StandardRestore(abstract_state)}
      for name in ('data_iterators', 'metadata'):
        if name in present:
          items[name] = ocp.args.JsonRestore()
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax raises many types for unreadable files.
      raise CheckpointError(f'checkpoint {path} could not be read: '
                            f'{type(error).__name__}: {str(error)[:300]}') from error
    iterator_states = None
    if restored.get('data_iterators') is not None:
      iterator_states = restored['data_iterators']['per_process']
    return restored['state'], iterator_states, restored.get('metadata')

  def restore_params(self, step: int, abstract_params, which: str = 'params'):
    """The parameters of checkpoint `step` alone ('params', or 'ema': their moving
    average), onto the shardings of `abstract_params` (ShapeDtypeStructs with
    .sharding): the optimizer state stored beside them is never read or allocated."""
    item = {which: abstract_params}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)))
    except Exception as error:  # Orbax raises many types for unreadable files.
      raise CheckpointError(f'checkpoint {files.join(self.directory, str(step))} could '
                            f'not be read: {type(error).__name__}: '
                            f'{str(error)[:300]}') from error
    params = restored['state'].get(which)
    if params is None:
      raise CheckpointError(f'checkpoint {files.join(self.directory, str(step))} holds no '
                            f'{which!r} weights')
    missing = [jax.tree_util.keystr(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(params)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:  # a partial restore leaves what the checkpoint lacks unfilled
      raise CheckpointError(f'checkpoint {files.join(self.directory, str(step))} holds no '
                            f'{missing[0]} (and {len(missing) - 1} more parameters): it was '
                            f'written by another model definition')
    return params

  def restore_latest(self, abstract_state):
    """(step, state, iterator states, metadata) of the newest readable checkpoint, or
    None when there is none. Unreadable ones are reported and moved aside; if none is
    readable this raises rather than letting training silently start over. Every
    decision is agreed: process 0's list of steps, and whether each step could be read
    on every process."""
    steps = distributed.gather_json(self.all_steps(), 'listing the checkpoints')[0]
    for step in reversed(steps):
      problem = self._unreadable_files(step) or self._corrupt_files(step)
      if not distributed.agree([problem is not None], f'checking checkpoint {step}')[0]:
        try:
          restored = self.restore(step, abstract_state)
        except CheckpointError as error:
          problem = str(error)
        if not distributed.agree([problem is not None], f'restoring checkpoint {step}')[0]:
          return (step, *restored)
      logging.warning('%s; falling back to an older checkpoint',
                      problem or f'checkpoint {step} could not be read on another process')
      self.set_aside(step)
    if steps:
      raise CheckpointError(f'none of the checkpoints {steps} in {self.directory} could be '
                            f'read (moved to {self.directory}/unreadable-*); not starting '
                            f'over: remove them to train from scratch')
    return None

  def _unreadable_files(self, step: int) -> str | None:
    """What is wrong with the JSON files of checkpoint `step` (None: they parse). Every
    process reads the same files, so all reach the same verdict before Orbax's restore,
    which is collective: a restore that fails on one process alone leaves the others
    waiting inside Orbax until the collective timeout."""
    base = files.join(self.directory, str(step))
    names = ['_CHECKPOINT_METADATA', 'state/_METADATA', 'state/_sharding',
             'metadata/metadata', 'data_iterators/metadata']
    names += [f'state/array_metadatas/{name}' for name in
              files.listdir(files.join(base, 'state', 'array_metadatas'))]
    for name in names:
      target = files.join(base, *name.split('/'))
      try:
        if files.exists(target):
          json.loads(files.read_text(target))
      except (OSError, ValueError) as error:
        return (f'checkpoint {base} could not be read: {name}: {type(error).__name__}: '
                f'{str(error)[:200]}')
    return None

  def _corrupt_files(self, step: int) -> str | None:
    """The first file of step `step` whose size or checksum differs from the record of
    the process that wrote it, among the files this process verifies: those written by
    the process of its index (and of index + k * process count, where fewer processes
    restore than saved). None: all match, or the step has no record."""
    base = files.join(self.directory, str(step))
    count, index = jax.process_count(), jax.process_index()
    records = {}
    for name in files.listdir(files.join(base, CHECKSUMS)):
      found = re.fullmatch(r'process_(\d+)\.json', name)  # not a .partial left by a kill
      if found and int(found.group(1)) % count == index:
        try:
          records[name] = json.loads(files.read_text(files.join(base, CHECKSUMS, name)))
        except (OSError, ValueError) as error:
          return f'checkpoint {base} could not be read: {CHECKSUMS}/{name}: {error}'
    expected = {path: tuple(value) for record in records.values()
                for path, value in record['files'].items()}
    try:
      found = _checksums(base, sorted(expected))
    except OSError as error:
      return f'checkpoint {base} could not be read: {error}'
    for path, want in expected.items():
      if found[path] != want:
        return (f'checkpoint {base} could not be read: {path} is corrupt ({found[path][0]} '
                f'bytes, CRC-32 {found[path][1]:08x}; written: {want[0]} bytes, CRC-32 '
                f'{want[1]:08x})')
    return None

  def set_aside(self, step: int) -> None:
    """Moves an unreadable step out of Orbax's sight, keeping its files."""
    if jax.process_index() == 0:
      source = files.join(self.directory, str(step))
      target = files.join(self.directory, f'unreadable-{step}-{int(time.time())}')
      if files.exists(source):
        if files.is_remote(source):
          # The move copies object by object: first take the step out of Orbax's list
          # in one deletion, so a move cut short never leaves a half step listed.
          files.remove(files.join(source, _COMMIT_MARKER))
        files.move(source, target)
        logging.warning('Moved unreadable checkpoint %s to %s', source, target)
    distributed.barrier(f'setting aside unreadable checkpoint {step}')
    self._manager.reload()

  def prune(self, keep: int, protected: set[int] = frozenset(),
            saving: int | None = None) -> list[int]:
    """Deletes all but the newest `keep` checkpoints (counting `saving`, a step still
    being written), sparing `protected` steps. Process 0 decides, so every process
    deletes the same steps. Returns them."""
    steps = sorted(set(self.all_steps()) | ({saving} if saving is not None else set()))
    doomed = [step for step in steps[:max(len(steps) - keep, 0)] if step not in protected]
    doomed = distributed.gather_json(doomed, f'pruning at step {saving}')[0]
    # The background checksum writer may be writing into a doomed step: let it finish
    # first (deleting a folder while files are created in it fails), and record no
    # checksums of the doomed steps later.
    if self._recorder is not None:
      self._recorder.join()
      self._recorder = None
    self._unrecorded = [step for step in self._unrecorded if step not in doomed]
    for step in doomed:
      if step != saving:
        self._manager.delete(step)
    return doomed

  def read_metadata(self, step: int) -> dict | None:
    """The run metadata stored with `step` (config, tokenizer fingerprint), if any."""
    return files.read_json(files.join(self.directory, str(step), 'metadata',
                                          'metadata'))

  def wait(self) -> None:
    """Waits for the save in flight; raises SaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  # from Orbax's save thread
      raise self._save_error('could not finish saving a checkpoint', error) from error
    self._record_checksums(background=False)

  def close(self) -> None:
    self.wait()
    self._manager.close()


def gather_json(iterator_state, step: int) -> list:
  """Every process's data-iterator state, in process order."""
  encoded = json.dumps(iterator_state).encode()
  if len(encoded) > MAX_ITERATOR_STATE_BYTES:
    raise CheckpointError(f'data-iterator state of {len(encoded)} bytes exceeds '
                          f'{MAX_ITERATOR_STATE_BYTES}')
  return distributed.gather_json(iterator_state, f'the checkpoint save of step {step}')


def _written_by(base: str, index: int) -> list[str]:
  """The files of the step at `base` (relative paths) that process `index` wrote: its
  own OCDBT folder (state/ocdbt.process_<index>/), and for process 0 every other file
  but the other processes' folders and the checksum records (listed without entering
  them: on gs:// every listing is a request)."""
  names = _walk(base, f'state/ocdbt.process_{index}')
  if index == 0:
    names += _walk(base, '', skip=lambda path: path == CHECKSUMS or
                   path.startswith('state/ocdbt.process_'))
  return sorted(names)


def _walk(base: str, relative: str, skip=lambda path: False) -> list[str]:
  found = []
  for name in files.listdir(files.join(base, *relative.split('/')) if relative else base):
    path = f'{relative}/{name}' if relative else name
    if skip(path):
      continue
    if files.isdir(files.join(base, *path.split('/'))):
      found += _walk(base, path, skip)
    else:
      found.append(path)
  return found


def _checksums(base: str, names: list[str]) -> dict[str, tuple[int, int]]:
  """(size, CRC-32) of each file, read in parallel (zlib releases the GIL)."""
  def one(name):
    size, crc = 0, 0
    with files.open_binary(files.join(base, *name.split('/'))) as handle:
      while chunk := handle.read(_CHUNK):
        size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return name, (size, crc)
  if not names:
    return {}
  with concurrent.futures.ThreadPoolExecutor(min(8, len(names), os.cpu_count() or 1)) as pool:
    return dict(pool.map(one, names))
