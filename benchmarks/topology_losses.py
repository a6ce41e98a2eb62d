"""Trains the same 30 steps on several process x device topologies (launch/local.sh,
tests/tiny_config.py, --config.dropout_rng=threefry2x32) and prints the losses side
by side: the global batches do not depend on the process count.

  python benchmarks/topology_losses.py --out /tmp/topologies   # about 4 minutes
"""

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from tests import faults  # pylint: disable=wrong-import-position
from tests.conftest import real_pairs  # pylint: disable=wrong-import-position

TOPOLOGIES = {'1x8': (1, 8), '2x4': (2, 4), '4x2': (4, 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', default='/tmp/jaxnmt-topologies')
  parser.add_argument('--steps', type=int, default=30)
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  corpus = os.path.join(args.out, 'pairs.tsv')
  with open(corpus, 'w', encoding='utf-8') as handle:
    handle.writelines(f'{en}\t{es}\n' for en, es in real_pairs(3000))
  losses = {}
  for name, (processes, devices) in TOPOLOGIES.items():
    workdir = os.path.join(args.out, name)
    faults.run(workdir, corpus, processes, devices, args.steps,
               '--config.dropout_rng=threefry2x32')
    with open(os.path.join(workdir, 'train', 'metrics.jsonl'), encoding='utf-8') as handle:
      losses[name] = {r['step']: r['loss'] for r in map(json.loads, handle)}
  print('step ' + ' '.join(f'{name:>10}' for name in losses))
  for step in (1, 5, 10, 20, args.steps):
    print(f'{step:4d} ' + ' '.join(f'{losses[name][step]:10.6f}' for name in losses))
  first = next(iter(losses))
  for name in list(losses)[1:]:
    print(f'max |loss {name} - loss {first}| over all steps: '
          f'{max(abs(losses[name][s] - losses[first][s]) for s in losses[first]):.2e}')


if __name__ == '__main__':
  main()
