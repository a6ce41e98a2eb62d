"""When to stop training early, decided by all processes together.

A stop request — SIGTERM (preemption) or SIGINT (Ctrl-C) delivered to any one process,
or the training time limit read from process 0's clock — is acted on by every process
at the same step: they save the same checkpoint and exit the same way. With one process
requests are checked every step; with several, every `check_every` steps (an all-gather
of two flags). A second Ctrl-C stops that process at once, without saving (with several
processes, stop the others the same way: they wait for it at their next check).
"""

import logging
import signal
import time

import jax

from jaxnmt.runtime import distributed

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:

  def __init__(self, time_limit_minutes: float, check_every: int):
    self._time_limit_s = time_limit_minutes * 60
    self._check_every = check_every
    self._started = time.monotonic()
    self._signal = None
    self._previous = {}
    # Taken over even where inherited as ignored: a shell without job control starts
    # background processes (launch/local.sh's) with SIGINT ignored, and a stop request
    # to any one process must reach all of them.
    for signum in _SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: signals keep their handlers
        pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    self._signal = signal.Signals(signum).name
    logging.warning('%s received: stopping at the next agreed step with a checkpoint '
                    '(Ctrl-C again to stop at once without one)', self._signal)

  def check(self, step: int, force: bool = False) -> str | None:
    """Why to stop after `step` ('signal' or 'time limit'), or None. Collective with
    several processes: every process calls it after every step, with the same
    `force` (check now, whatever `check_every` says: before a step that fetches
    results, so that a stuck process is named here rather than waited for there)."""
    if jax.process_count() > 1 and step % self._check_every and not force:
      return None
    out_of_time = (jax.process_index() == 0 and self._time_limit_s > 0 and
                   time.monotonic() - self._started > self._time_limit_s)
    signalled, out_of_time = distributed.agree([self._signal is not None, out_of_time],
                                               f'the stop check after step {step}')
    if signalled:
      return 'signal'
    return 'time limit' if out_of_time else None

  def __enter__(self):
    return self

  def __exit__(self, *unused_exception) -> None:
    """Gives the signals their handlers back."""
    for signum, previous in self._previous.items():
      # None: a handler installed outside Python; the default is the closest.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
