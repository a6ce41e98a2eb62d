"""Exclusive roles in a workdir: the trainer's lock and the eval worker's lease.

Local workdirs lock the trainer with flock, which the OS drops however the process
dies. Object stores (gs://) have neither flock nor atomic rename, so there, and for the
eval worker everywhere, a role is a `Lease`: a small JSON file created only if absent,
whose holder refreshes a heartbeat in it.
"""

import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time

from jaxnmt import errors
from jaxnmt.runtime import files


class TrainerLock:
  """An exclusive lock on the workdir for the life of a training run (taken by process
  0). Local: flock, which the OS drops when the process dies, however it dies. gs://
  has no flock: there it is a `Lease` on .trainer.lock whose heartbeat a background
  thread renews, so the lock of a trainer that died lapses after files.HEARTBEAT_TIMEOUT_S
  (at once when its host sees its process is gone)."""

  def __init__(self, workdir: str, owner: bool,
               heartbeat_timeout_s: float = files.HEARTBEAT_TIMEOUT_S):
    self._handle = self._lease = self._beat = None
    if files.is_remote(workdir):
      if owner:
        self._lease = Lease(workdir, files.LOCK, 'trainer', heartbeat_timeout_s)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat,
                                      args=(heartbeat_timeout_s / 10,), daemon=True)
        self._beat.start()
      return
    os.makedirs(workdir, exist_ok=True)
    self._handle = open(files.join(workdir, files.LOCK), 'a+', encoding='utf-8')
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
               timeout_s: float = files.HEARTBEAT_TIMEOUT_S):
    self.target = files.join(workdir, name)
    self._workdir, self._what, self._timeout_s = workdir, what, timeout_s
    self._remote = files.is_remote(self.target)
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
      if holder is None and not files.exists(self.target):
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
      return files.create_exclusive(self.target, self._record())
    self._generation = files.replace_if_generation(
        self.target, self._record().encode(), 0)
    return self._generation is not None

  def _read(self):
    """(the holder's record or None, its generation on gs://)."""
    if not self._remote:
      return files.read_json(self.target), None
    found = files.read_with_generation(self.target)
    if found is None:
      return None, None
    try:
      return json.loads(found[0]), found[1]
    except ValueError:
      return None, found[1]

  def _remove(self, holder, version) -> None:
    """Deletes the lease file read as (`holder`, `version`) unless it changed since."""
    if self._remote:
      files.remove_if_generation(self.target, version)
    elif files.read_json(self.target) == holder:  # not taken over by another meanwhile
      files.remove(self.target)

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
        beat = files.getmtime(self.target)
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
        generation = files.replace_if_generation(
            self.target, self._record().encode(), self._generation)
        if generation is None:
          raise self._lost(self._read()[0])
        self._generation = generation
        return
      holder = files.read_json(self.target)
      if not isinstance(holder, dict) or holder.get('token') != self._token:
        raise self._lost(holder)
      files.write_text(self.target, self._record())

  def release(self) -> None:
    """Gives the lease up (a no-op if it is no longer ours)."""
    with self._mutex:
      if not self._held:
        return
      self._held = False
      if self._remote:
        files.remove_if_generation(self.target, self._generation)
        return
      holder = files.read_json(self.target)
      if isinstance(holder, dict) and holder.get('token') == self._token:
        files.remove(self.target)


class EvalLock(Lease):
  """One eval worker per workdir: its lease, eval/worker.json, is also the heartbeat by
  which the trainer keeps the checkpoints a live worker has not scored. Held by
  process 0 of the worker."""

  def __init__(self, workdir: str, timeout_s: float = files.HEARTBEAT_TIMEOUT_S):
    super().__init__(workdir, files.WORKER, 'eval worker', timeout_s)


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
