"""The fault matrix of BUILD_NOTES.md ("Multi-host faults"): each fault injected once
into a run of N processes started by launch/local.sh, then the same command restarted
and its final parameters compared with an uninterrupted run's, bit for bit.

  python benchmarks/fault_matrix.py --processes 2 --out /tmp/faults            # short
  python benchmarks/fault_matrix.py --processes 4 --defaults --out /tmp/faults4

Prints a Markdown table. The tiny test config; --peer_timeout_s=20,
--collective_timeout_s=40 (tests.faults.SHORT), or jaxnmt's default timeouts with
--defaults (a lost or hung process then takes about 2.5 minutes per row).
"""

import argparse
import functools
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from tests import faults  # pylint: disable=wrong-import-position
from tests.conftest import real_pairs  # pylint: disable=wrong-import-position

FAULTS = ('time limit', 'SIGTERM to process 1', 'SIGTERM to process 0',
          'SIGINT to process 0', 'SIGINT to process 1', 'kill -9 of process 1',
          'kill -9 of process 0', 'SIGSTOP of process 1 (hung)',
          'SIGSTOP of process 0 (hung)')
SIGNAL_STOPS = ('time limit', 'SIGTERM', 'SIGINT')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--out', default='/tmp/jaxnmt-faults')
  parser.add_argument('--only', default='', help='comma-separated fault names, or '
                      '"corrupt", "coordinator"')
  parser.add_argument('--defaults', action='store_true',
                      help="jaxnmt's default --peer_timeout_s and --collective_timeout_s")
  parser.add_argument('--no_restart', action='store_true',
                      help='skip the restart and bitwise comparison (faster)')
  args = parser.parse_args()
  faults.use_timeouts(faults.DEFAULTS if args.defaults else faults.SHORT)
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  corpus = os.path.join(args.out, 'pairs.tsv')
  with open(corpus, 'w', encoding='utf-8') as handle:
    handle.writelines(f'{en}\t{es}\n' for en, es in real_pairs(3000))
  devices = max(1, 4 // args.processes)

  @functools.cache
  def reference(steps):
    workdir = os.path.join(args.out, f'reference-{steps}')
    faults.run(workdir, corpus, args.processes, devices, steps)
    return workdir

  outcomes = []
  only = [name for name in args.only.split(',') if name]
  wanted = [name for name in FAULTS if not only or name in only]
  for index, fault in enumerate(wanted):
    workdir = os.path.join(args.out, f'fault-{index}')
    began = time.time()
    outcome = faults.inject(fault, workdir, corpus, args.processes, devices)
    if not args.no_restart:
      faults.restart(outcome, workdir, corpus, reference, args.processes, devices)
    outcomes.append(outcome)
    print(f'{fault}: {outcome} ({time.time() - began:.0f} s)', flush=True)
  if not only or 'corrupt' in only:
    workdir = os.path.join(args.out, 'corrupt')
    faults.run(workdir, corpus, args.processes, devices, 40)
    corrupted = faults.corrupt_latest(workdir)
    outcome = faults.Outcome('corrupt latest checkpoint', {}, None, corrupted - 10,
                             corrupted)
    faults.restart(outcome, workdir, corpus, reference, args.processes, devices)
    outcome.exit_codes = {i: 0 for i in range(args.processes)}  # restart ran to the end
    outcomes.append(outcome)
    print(f'corrupt latest checkpoint: {outcome}', flush=True)
  if not only or 'coordinator' in only:
    outcomes.append(faults.coordinator_unreachable(
        timeout_s=120 if args.defaults else 20))

  timeouts = ('default timeouts (--peer_timeout_s=120 --collective_timeout_s=300)'
              if args.defaults else ' '.join(faults.SHORT))
  print(f'\n{args.processes} processes x {devices} CPU devices, tiny test config, '
        f'{faults.STEPS} steps, checkpoint every 10, {timeouts}\n')
  print('| fault | exit codes | s to last exit | step saved | steps lost | restart '
        'resumed from | final params bitwise | traceback | message |')
  print('|---|---|---|---|---|---|---|---|---|')
  for o in outcomes:
    codes = ', '.join(f'p{i}: {c}' for i, c in sorted(o.exit_codes.items()))
    seconds = '' if o.seconds is None else f'{o.seconds:.1f}'
    bitwise = '' if o.bitwise is None else ('yes' if o.bitwise else 'NO')
    tracebacks = ', '.join(f'p{i}' for i in o.tracebacks) or 'none'
    print(f'| {o.fault} | {codes} | {seconds} | {o.saved if o.saved is not None else ""} | '
          f'{o.lost if o.lost is not None else ""} | '
          f'{o.restart_resumed if o.restart_resumed is not None else ""} | {bitwise} | '
          f'{tracebacks} | {o.note[:160]} |')


if __name__ == '__main__':
  main()
