"""JAX's coordination service in a process of its own, started by process 0.

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
import os
import signal
import subprocess
import sys
import time

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
