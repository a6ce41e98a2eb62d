"""A corpus translated by one process and by N processes of one CPU device each
(launch/local.sh): wall time, sentences/s, and whether the outputs are the same bytes.

The input is `--lines` English sentences of the README corpus, drawn at random (with
repeats when more are asked for than it holds); every run writes with `--output`, so
it is a corpus job on any process count.

  python benchmarks/translate_processes.py --workdir=runs/tiny --lines=100000 \\
      --processes=1,2 -- --beam_size=1
"""

import argparse
import os
import random
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(path: str, lines: int, seed: int = 0) -> None:
  data = os.environ.get('JAXNMT_DATA_DIR', os.path.join(ROOT, '..', 'shared', 'data'))
  with zipfile.ZipFile(os.path.join(data, 'spa-eng.zip')) as archive:
    english = [line.split('\t')[0] for line in
               archive.read('spa-eng/spa.txt').decode('utf-8').splitlines()]
  rng = random.Random(seed)
  with open(path, 'w', encoding='utf-8') as handle:
    handle.writelines(rng.choice(english) + '\n' for _ in range(lines))


def _run(workdir: str, source: str, output: str, processes: int, flags: list[str],
         log: str) -> float:
  command = [sys.executable, '-m', 'jaxnmt.main', '--mode=translate', f'--workdir={workdir}',
             f'--input={source}', f'--output={output}', *flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if processes > 1:
    command = ['launch/local.sh', *command[3:]]
    env.update(NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS='1', PYTHON=sys.executable)
  else:
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  started = time.monotonic()
  with open(log, 'w', encoding='utf-8') as handle:
    code = subprocess.call(command, cwd=ROOT, env=env, stdout=handle,
                           stderr=subprocess.STDOUT)
  if code:
    raise SystemExit(f'{processes} process(es) failed (exit {code}): see {log}')
  return time.monotonic() - started


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a trained jaxnmt workdir')
  parser.add_argument('--lines', type=int, default=100_000)
  parser.add_argument('--processes', default='1,2')
  parser.add_argument('--out', default='/tmp/translate_processes')
  parser.add_argument('flags', nargs='*', help='more translate flags, after --')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  source = os.path.join(args.out, f'input-{args.lines}.en')
  if not os.path.exists(source):
    _corpus(source, args.lines)
  outputs = {}
  for processes in (int(p) for p in args.processes.split(',')):
    output = os.path.join(args.out, f'output-{processes}.es')
    for leftover in (output, output + '.parts'):
      subprocess.call(['rm', '-rf', leftover])
    seconds = _run(args.workdir, source, output, processes, args.flags,
                   os.path.join(args.out, f'log-{processes}.txt'))
    with open(output, 'rb') as handle:
      outputs[processes] = handle.read()
    print(f'{processes} process(es) x 1 device: {seconds:.0f} s, '
          f'{args.lines / seconds:.1f} sentences/s (start-up and compiles included)',
          flush=True)
  first = next(iter(outputs.values()))
  print('outputs identical:', all(output == first for output in outputs.values()))


if __name__ == '__main__':
  main()
