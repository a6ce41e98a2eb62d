"""Joining JAX's runtime (`join`), with its coordination service in a process of its
own, started by process 0.

`jax.distributed.initialize` runs the coordination service inside process 0. When
process 0 dies, every other process's client loses the service within a second and
JAX aborts it from C++ (exit 134, "the JAX distributed service detected fatal
errors"); the client's `missed_heartbeat_callback` cannot be a Python function in
jaxlib 0.10 (`std::bad_cast`), and recoverable mode does not change that. Served from
this small process instead, the service outlives process 0: the others go on until
jaxnmt's peer watch names process 0 as lost (`distributed.PeerWatch`), and end with
that line and exit 1.

The process serves until process 0 is gone (its stdin, a pipe from process 0, reaches
end of file) and then until no client is connected any more (Linux: /proc/net/tcp),
at most `linger_s`. It ignores SIGINT and SIGTERM (a Ctrl-C in the terminal, or a
scheduler's SIGTERM to the whole group, is for the trainers: they agree on a stop and
save through this service) and writes nothing after its ready line.

  python -m jaxnmt.runtime.coordinator --bind='[::]:1234' --num_processes=2 \\
      --heartbeat_timeout_s=320 --shutdown_timeout_s=300 --linger_s=180
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from jaxnmt.errors import RuntimeFailure

READY = 'jaxnmt coordination service ready'



def heartbeat_timeout_s(peer_timeout_s: float) -> int:
  """The heartbeat timeout given to JAX's coordination service and clients for
  `--peer_timeout_s`.

  JAX's client sends a heartbeat every `timeout / 2`; the service declares a process
  dead (and aborts every other one) once its last heartbeat is `timeout` old: between
  `timeout / 2` and `timeout` after it died. jaxnmt's peer watch names a lost process
  at most `peer_timeout_s + 4 beats` after (a beat: `min(5 s, peer_timeout_s / 10)`),
  so the earliest JAX can decide, `timeout / 2 = peer_timeout_s + margin`, must lie
  beyond that: margin = min(40 s, peer_timeout_s), at least twice the watch's 4 beats."""
  return int(2 * (peer_timeout_s + min(40, peer_timeout_s)) + 0.5)


def start(bind_address: str, num_processes: int, heartbeat_timeout: int,
          shutdown_timeout: int, linger_s: float) -> subprocess.Popen:
  """Starts the service process and waits for it to serve; returns it. Raises
  RuntimeError (with the service's own first line) if it does not come up."""
  process = subprocess.Popen(
      [sys.executable, '-m', 'jaxnmt.runtime.coordinator', f'--bind={bind_address}',
       f'--num_processes={num_processes}', f'--heartbeat_timeout_s={heartbeat_timeout}',
       f'--shutdown_timeout_s={shutdown_timeout}', f'--linger_s={linger_s}'],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  line = process.stdout.readline().strip()  # until it serves, or ends
  process.stdout.close()
  if line != READY:
    process.kill()
    error = process.stderr.read().strip().splitlines()
    raise RuntimeError(f'the coordination service did not start at {bind_address}: '
                       f'{(error or [line or "no answer"])[-1][:200]}')
  process.stderr.close()
  return process


# What `join` gave JAX's runtime (`runtime_settings`).
_runtime = {}


def join(timeout_s: int, peer_timeout_s: int, collective_timeout_s: int,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> None:
  """`jax.distributed.initialize` (JAX 0.10.2: `jax._src.distributed.State.initialize`)
  with its coordination service in a process of its own (`start`), so that the others
  outlive process 0, and JAX's heartbeat set from `peer_timeout_s`
  (`heartbeat_timeout_s`): jaxnmt's peer watch always decides first. Arguments left
  None are detected from the cluster, as JAX does."""
  # pylint: disable=g-import-not-at-top,protected-access
  import jax
  from jax._src import clusters
  from jax._src import distributed as jax_distributed
  from jax._src import xla_bridge
  from jax._src.lib import _jax
  if xla_bridge.backends_are_initialized():
    raise RuntimeError('jax.distributed must be joined before JAX starts a backend')
  state = jax_distributed.global_state
  if state.client is not None:
    raise RuntimeError('this process has joined a job already')
  local_device_ids = None
  if env_ids := os.environ.get('JAX_LOCAL_DEVICE_IDS'):
    local_device_ids = [int(x) for x in env_ids.split(',')]
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if None in (coordinator_address, num_processes, process_id, local_device_ids):
    coordinator_address, num_processes, process_id, local_device_ids = (
        clusters.ClusterEnv.auto_detect_unset_distributed_params(
            coordinator_address, num_processes, process_id, local_device_ids, None,
            timeout_s))
  if None in (coordinator_address, num_processes, process_id):
    raise RuntimeError('the cluster did not give a coordinator address, process count '
                       'and process index')
  if local_device_ids:
    visible = ','.join(str(x) for x in local_device_ids)
    jax.config.update('jax_cuda_visible_devices', visible)
    jax.config.update('jax_rocm_visible_devices', visible)
  heartbeat = heartbeat_timeout_s(peer_timeout_s)
  service = None
  if process_id == 0:
    bind = os.environ.get('JAX_COORDINATOR_BIND_ADDRESS',
                          '[::]:' + coordinator_address.rsplit(':', 1)[1])
    # It serves until the others have named this process as lost, or left.
    service = start(bind, num_processes, heartbeat, collective_timeout_s,
                    linger_s=peer_timeout_s + 60)
    _wait_for_the_others(int(bind.rsplit(':', 1)[1]), num_processes - 1, timeout_s,
                         coordinator_address)
  client = _jax.get_distributed_runtime_client(
      coordinator_address, process_id, init_timeout=timeout_s, use_compression=True,
      heartbeat_timeout=heartbeat, shutdown_timeout=collective_timeout_s)
  client.connect()
  state.coordinator_address = coordinator_address
  state.process_id, state.num_processes, state.client = process_id, num_processes, client
  state.initialize_preemption_sync_manager()
  if (partition := os.environ.get('JAX_PARTITION_INDEX')) is not None:
    state.partition_index = int(partition)
  _runtime.update(heartbeat_timeout_s=heartbeat, client_heartbeat_interval_s=heartbeat / 2,
                  shutdown_timeout_s=collective_timeout_s,
                  service_pid=service.pid if service else None)
  logging.info('Joined the job as process %d of %d: JAX heartbeat timeout %d s (a '
               'heartbeat every %d s), jaxnmt peer timeout %d s%s', process_id,
               num_processes, heartbeat, heartbeat // 2, peer_timeout_s,
               f', coordination service in process {service.pid}' if service else '')


def _wait_for_the_others(port: int, others: int, timeout_s: float, address: str) -> None:
  """Process 0: waits until the other processes' clients are connected to the service
  (each holds a connection to `port` on this host: Linux's /proc/net/tcp), or raises
  a RuntimeFailure naming how many came. JAX's client would abort this process from
  C++ instead (exit 134) when they do not all register within the timeout."""
  deadline = time.monotonic() + timeout_s
  while (connected := _connected_clients(port)) < others:
    if connected < 0:
      return  # not Linux: JAX's own timeout decides
    if time.monotonic() > deadline:
      raise RuntimeFailure(
          f'process 0 waited {timeout_s:.0f} s for the other processes: {connected} of '
          f'{others} connected to the coordinator {address}; start them all with the '
          f'same --coordinator_address and --num_processes (or raise '
          f'--distributed_timeout_s)')
    time.sleep(0.5)


def runtime_settings() -> dict:
  """What `join` gave JAX's runtime: heartbeat_timeout_s (service and clients),
  client_heartbeat_interval_s (JAX's client: half the timeout), shutdown_timeout_s,
  service_pid (process 0: the coordination service's process)."""
  return dict(_runtime)


def _connected_clients(port: int) -> int:
  """Established TCP connections to `port` on this host (-1: unknown)."""
  count = 0
  for table in ('/proc/net/tcp', '/proc/net/tcp6'):
    try:
      with open(table, encoding='ascii') as handle:
        rows = handle.read().splitlines()[1:]
    except OSError:
      return -1
    for row in rows:
      fields = row.split()
      if int(fields[1].rsplit(':', 1)[1], 16) == port and fields[3] == '01':
        count += 1
  return count


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--bind', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--heartbeat_timeout_s', type=int, required=True)
  parser.add_argument('--shutdown_timeout_s', type=int, required=True)
  parser.add_argument('--linger_s', type=float, required=True)
  args = parser.parse_args()
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, signal.SIG_IGN)
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  service = _jax.get_distributed_runtime_service(
      args.bind, args.num_processes, heartbeat_timeout=args.heartbeat_timeout_s,
      shutdown_timeout=args.shutdown_timeout_s)
  print(READY, flush=True)
  # Nothing more is written: process 0 may be gone, and a write to its pipe would
  # end this process (and the service with it).
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  while sys.stdin.read(1 << 16):
    pass  # process 0 writes nothing: this returns when it exits
  port = int(args.bind.rsplit(':', 1)[1])
  deadline = time.monotonic() + args.linger_s
  time.sleep(1)
  while time.monotonic() < deadline and _connected_clients(port) != 0:
    time.sleep(1)
  service.shutdown()
  os._exit(0)  # pylint: disable=protected-access


if __name__ == '__main__':
  main()
