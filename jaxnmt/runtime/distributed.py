"""Multi-process start-up, agreement and liveness on JAX's own runtime
(`jax.distributed`: NCCL on GPUs, ICI/DCN on TPU pods, gloo on CPUs).

Nothing here waits without a bound:

* **Agreement** (`agree`, `barrier`, `gather_json`) goes through the coordination
  service's key-value store and barriers, each with a timeout
  (`--collective_timeout_s`). A process that does not arrive is named in the error:
  "processes [1] did not reach the stop check after step 40 within 300 s".
* **Liveness** (`PeerWatch`): a background thread in every process posts a heartbeat
  counter to the key-value store; process 0 watches everyone's, the others watch
  process 0's and a failure notice. A process whose heartbeat stops (kill -9, the OOM
  killer, a frozen host) for `--peer_timeout_s` is named ("lost process 1: no
  heartbeat for 120 s ..."), and every process exits with code 1, within
  `peer_timeout_s` + 4 beats (a beat: min(5 s, peer_timeout_s / 10)). A process that
  fails with an error posts it first (`report_failure`), so the others exit at once
  with the same code instead of waiting in a collective.
* **JAX's own heartbeat never decides first.** JAX's coordination service aborts
  every process (exit 134) once one has sent no heartbeat for its heartbeat timeout;
  its clients beat every half timeout, so that comes between half the timeout and the
  timeout after a death. `coordinator.heartbeat_timeout_s` sets it so that half of it
  lies beyond the peer watch's bound. The service runs in a process of its own started
  by process 0 (`runtime.coordinator`): inside process 0, its death would abort every
  other process at once, before any line of jaxnmt's.
"""

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

from jaxnmt.errors import DistributedError, RuntimeFailure
from jaxnmt.runtime import coordinator

_PREFIX = 'jaxnmt'
# Waits for process 0's one-off work (preparing a corpus can take hours at scale) are
# bounded by liveness (a dead process 0 ends the job), and by this as a last resort.
LONG_WAIT_S = 24 * 3600


class LostPeerError(RuntimeFailure):
  """Another process died, hung, or failed: this job cannot go on."""


_settings = {'collective_timeout_s': 300.0, 'round': 0, 'written': []}


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, timeout_s: int, *, peer_timeout_s: int = 120,
               collective_timeout_s: int = 300, cluster: str | None = None) -> None:
  """Joins the job: explicitly (all three arguments), by cluster auto-detection
  (`cluster`: the name of the environment found), or not at all (a single process).
  Fails within `timeout_s` if the coordinator is unreachable; then watches the other
  processes (`PeerWatch`)."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise DistributedError('--coordinator_address, --num_processes and --process_id '
                             'must be given together')
    if not 0 <= process_id < num_processes:
      raise DistributedError(f'--process_id={process_id} must be in [0, {num_processes})')
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    where = f'coordinator {coordinator_address}'
    if process_id != 0:  # JAX's client aborts the process when it cannot register
      _wait_for_coordinator(coordinator_address, timeout_s)
  else:
    if cluster is None:
      return
    kwargs, where = {}, f'{cluster} cluster'
  for name, value in (('--peer_timeout_s', peer_timeout_s),
                      ('--collective_timeout_s', collective_timeout_s)):
    if value <= 0:
      raise DistributedError(f'{name}={value} must be positive')
  # CPU collectives across processes go through gloo (ignored on GPUs and TPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    coordinator.join(timeout_s, peer_timeout_s, collective_timeout_s, **kwargs)
  except RuntimeFailure:
    raise
  except Exception as error:  # the runtime raises several types (XlaRuntimeError, ...)
    raise RuntimeFailure(f'could not join the job through the {where} within '
                         f'{timeout_s}s: {str(error).splitlines()[0][:200]}') from error
  _settings['collective_timeout_s'] = float(collective_timeout_s)
  if jax.process_count() > 1:
    PeerWatch(_client(), jax.process_index(), jax.process_count(),
              timeout_s=peer_timeout_s).start()


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until something accepts connections at `address` (process 0 serves JAX's
  coordination service there), or raises a RuntimeFailure after `timeout_s`: JAX's own
  client would abort this process from C++ instead (exit 134, no message of ours)."""
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host.strip('[]'), int(port)), timeout=2).close()
      return
    except (OSError, ValueError) as error:
      if isinstance(error, ValueError) or time.monotonic() > deadline:
        raise RuntimeFailure(
            f'could not join the job through the coordinator {address} within '
            f'{timeout_s:.0f}s: nothing answers there ({error}); is process 0 running, '
            f'and is the address right?') from error
      time.sleep(0.5)


def _client():
  # JAX keeps its coordination-service client here (as multihost_utils and Orbax use).
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:
    raise DistributedError('jax.distributed is not initialized')
  return client


def collective_timeout_s() -> float:
  return _settings['collective_timeout_s']


def joined() -> bool:
  """Whether this process is one of several in a job (after `initialize`)."""
  return _watch is not None


def _next_round() -> int:
  _settings['round'] += 1
  return _settings['round']


def barrier(what: str, timeout_s: float | None = None) -> None:
  """Waits until every process reaches this point (the n-th barrier of each process
  meets the n-th of the others), or raises LostPeerError naming the processes that did
  not arrive within `timeout_s` (default: --collective_timeout_s)."""
  if jax.process_count() == 1:
    return
  _wait(f'{_PREFIX}_barrier_{_next_round()}', what, timeout_s)


def _wait(barrier_id: str, what: str, timeout_s: float | None) -> None:
  timeout_s = _settings['collective_timeout_s'] if timeout_s is None else timeout_s
  try:
    _client().wait_at_barrier(barrier_id, int(timeout_s * 1000))
  except Exception as error:  # pylint: disable=broad-except  # JaxRuntimeError
    text = str(error)
    missing = ''
    if 'timed out task names:' in text:
      names = text.split('timed out task names:', 1)[1].split('\n\n', 1)[0].split()
      missing = f'processes {", ".join(names)} '
    elif 'DEADLINE_EXCEEDED' not in text:
      raise LostPeerError(f'{what}: the coordination service failed: '
                          f'{text.splitlines()[0][:200]}') from error
    raise LostPeerError(f'{missing or "some processes "}did not reach {what} within '
                        f'{timeout_s:.0f} s: stuck or lost; ending the job (the last '
                        f'complete checkpoint is kept: rerun the command to resume)'
                        ) from error


def agree(local_flags, what: str = 'an agreement point',
          timeout_s: float | None = None) -> np.ndarray:
  """Element-wise OR of every process's boolean flags: what one process saw, all act
  on. Collective: every process calls it at the same point with the same number of
  flags. Only processes with something to say write (one key each); everyone reads
  them after a barrier, so a quiet check costs one barrier round trip."""
  local_flags = np.asarray(local_flags, dtype=bool)
  if jax.process_count() == 1:
    return local_flags
  client, number = _client(), _next_round()
  folder = f'{_PREFIX}/agree/{number}/'
  if local_flags.any():
    client.key_value_set(folder + str(jax.process_index()),
                         ''.join('1' if flag else '0' for flag in local_flags))
  _wait(f'{_PREFIX}_agree_{number}', what, timeout_s)
  result = local_flags.copy()
  for _, value in client.key_value_dir_get(folder):
    result |= np.array([char == '1' for char in value])
  _forget_earlier(client, folder + str(jax.process_index()) if local_flags.any() else None)
  return result


def gather_json(value, what: str = 'a gather') -> list:
  """`value` (JSON-serialisable) from every process, in process order."""
  if jax.process_count() == 1:
    return [value]
  client, number = _client(), _next_round()
  folder = f'{_PREFIX}/gather/{number}/'
  mine = folder + str(jax.process_index())
  client.key_value_set(mine, json.dumps(value))
  _wait(f'{_PREFIX}_gather_{number}', what, None)
  found = {int(key.rsplit('/', 1)[1]): json.loads(text)
           for key, text in client.key_value_dir_get(folder)}
  _forget_earlier(client, mine)
  return [found[index] for index in range(jax.process_count())]


def _forget_earlier(client, written: str | None) -> None:
  """Deletes this process's keys of earlier rounds: every process has read them by
  now (it passed this round's barrier after reading them). Remembers `written`."""
  for key in _settings['written']:
    try:
      client.key_value_delete(key)
    except Exception:  # pylint: disable=broad-except  # gone already
      pass
  _settings['written'] = [written] if written else []


# ----------------------------------------------------------------------------- liveness

_FAILED = f'{_PREFIX}/failed'
_watch: 'PeerWatch | None' = None


def _exit_now(code: int, message: str) -> None:
  """Ends this process at once: collectives cannot complete without the lost peer, so
  nothing that waits on them (async checkpoint commits, shutdown barriers) may run."""
  logging.error('%s', message)
  print(f'error: {message}', file=sys.stderr, flush=True)
  for handler in logging.getLogger().handlers:
    handler.flush()
  os._exit(code)  # pylint: disable=protected-access


class PeerWatch(threading.Thread):
  """Heartbeats through the key-value store (see the module docstring)."""

  def __init__(self, client, process_index: int, process_count: int, timeout_s: float,
               interval_s: float | None = None):
    super().__init__(name='peer-watch', daemon=True)
    global _watch
    self._client, self._index, self._count = client, process_index, process_count
    self._timeout_s = timeout_s
    self._interval_s = interval_s or min(5.0, max(timeout_s / 10, 0.2))
    self._exiting, self._stopped = threading.Event(), threading.Event()
    _watch = self
    atexit.register(self._shut_down_at_exit)

  def _shut_down_at_exit(self) -> None:
    """At a normal exit (this handler runs before JAX's own): runs JAX's exit clean-up
    (backends, then the shutdown barrier with the other processes) while the watch
    still beats, so that a process that waits there for a slower one is not named
    lost; then stops the watch and waits for it. A watch thread still inside a call
    of the runtime's client when the interpreter finalizes aborts the process
    ("terminate called after throwing", exit 134): Python ends daemon threads by
    unwinding them, which C++ does not allow."""
    self._exiting.set()  # the closed client's errors are expected from here on
    try:
      from jax._src import api  # pylint: disable=g-import-not-at-top
      api.clean_up()  # JAX's own exit handler; when it runs again later, a no-op
    finally:
      self._stopped.set()
      self.join(timeout=60)

  def run(self) -> None:
    beat, seen = 0, {}  # process -> (last counter, when it last changed)
    # Process 0 watches everyone; the others watch process 0 (one read a beat each).
    watched = range(self._count) if self._index == 0 else [0]
    while True:
      beat += 1
      try:
        self._client.key_value_set(f'{_PREFIX}/alive/{self._index}', str(beat),
                                   allow_overwrite=True)
        notice = self._failure_notice()
        if notice is not None:
          code, message = notice
          _exit_now(code, message)
        now = time.monotonic()
        for peer, counter in self._counters(watched):
          if seen.get(peer, (None,))[0] != counter:
            seen[peer] = (counter, now)
        lost = sorted(peer for peer in watched if peer != self._index and
                      now - seen.setdefault(peer, (None, now))[1] > self._timeout_s)
        if lost:
          message = lost_message(lost, self._timeout_s)
          if self._index == 0:
            post_failure(1, message)
            time.sleep(2 * self._interval_s)  # the others read it before we go
          _exit_now(1, message)
      except Exception as error:  # pylint: disable=broad-except  # service unreachable
        if not self._exiting.is_set():
          logging.warning('peer watch: %s', str(error).splitlines()[0][:200])
      if self._stopped.wait(self._interval_s):
        return

  def _counters(self, watched) -> list[tuple[int, str]]:
    if self._index == 0:
      return [(int(key.rsplit('/', 1)[1]), counter) for key, counter in
              self._client.key_value_dir_get(f'{_PREFIX}/alive/')]
    try:
      return [(0, self._client.key_value_try_get(f'{_PREFIX}/alive/0'))]
    except Exception:  # pylint: disable=broad-except  # NOT_FOUND: not started yet
      return []

  def _failure_notice(self) -> tuple[int, str] | None:
    try:
      text = self._client.key_value_try_get(_FAILED)
    except Exception:  # pylint: disable=broad-except  # NOT_FOUND: nobody failed
      return None
    notice = json.loads(text)
    if notice['process'] == self._index:
      return None  # ours: the main thread is on its way out
    return notice['code'], f'process {notice["process"]} failed: {notice["message"]}'


def lost_message(lost: list[int], timeout_s: float) -> str:
  """The line every process ends with when processes `lost` stopped beating."""
  names = ', '.join(f'{peer} (the coordinator)' if peer == 0 else str(peer)
                    for peer in lost)
  return (f'lost process{"es" if len(lost) > 1 else ""} {names}: no heartbeat for '
          f'{timeout_s:.0f} s (killed, out of memory, or its host is gone); ending the '
          f'job: rerun the command to resume from the last complete checkpoint')


def post_failure(code: int, message: str) -> None:
  """Tells every process that this one is ending with `code` (the first notice wins)."""
  try:
    _client().key_value_set(_FAILED, json.dumps(
        {'process': jax.process_index(), 'code': code, 'message': message[:500]}))
  except Exception:  # pylint: disable=broad-except  # another notice came first
    pass


def await_lost_peer() -> None:
  """After a collective failed for no reason of this process's own (a peer's
  connection reset): waits, at most the peer timeout, for the watch to name the lost
  process and end the job with that message."""
  if _watch is None:
    return
  logging.warning('A collective failed: waiting up to %.0f s to learn which process '
                  'was lost', _watch._timeout_s)  # pylint: disable=protected-access
  time.sleep(_watch._timeout_s + 3 * _watch._interval_s)  # pylint: disable=protected-access


def report_failure(code: int, message: str) -> None:
  """Called by a process about to exit on an error, in a multi-process job: the others
  learn it within a heartbeat and exit with the same code (rather than wait for this
  one in a collective until a timeout). Process 0 runs the coordination service, so it
  lingers long enough for the others to read the notice."""
  if _watch is None:
    return
  post_failure(code, message)
  if jax.process_index() == 0:
    time.sleep(3 * _watch._interval_s)  # pylint: disable=protected-access
