"""The CTranslate2 export checked on every combination of model options (the CI tests
take a pairwise set): for each, a random model with perturbed weights is exported and
compared with CTranslate2 on 100 sources (50 prompts for a language model), as
tests/interop/test_ctranslate2.py does: greedy outputs identical, teacher-forced
log-probabilities within 1e-4.

  python benchmarks/ct2_option_product.py [--kind=translation|lm] [--start=0 --count=N]
      [--every=K]   (every K-th combination: a systematic sample)

Prints one line per model and a summary; exits 1 if any model does not match.
"""

import argparse
import itertools
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from tests.interop import ct2_oracle
from tests.interop.test_ctranslate2 import FACTORS


def combinations(kind: str) -> list[dict]:
  factors = dict(FACTORS)
  if kind == 'lm':
    del factors['decoder_start']  # refused for language models
    factors['kind'] = ['decoder_lm']
  names = list(factors)
  return [dict(zip(names, values)) for values in itertools.product(*factors.values())]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kind', choices=['translation', 'lm'], default='translation')
  parser.add_argument('--start', type=int, default=0)
  parser.add_argument('--count', type=int, default=0, help='0: all from --start')
  parser.add_argument('--every', type=int, default=1)
  args = parser.parse_args()
  rows = combinations(args.kind)
  numbers = list(range(len(rows)))[args.start::args.every]
  chosen = numbers[:args.count] if args.count else numbers
  print(f'{len(chosen)} of {len(rows)} {args.kind} models', flush=True)
  failed, worst, started = [], 0.0, time.monotonic()
  for number in chosen:
    options = rows[number]
    model = ct2_oracle.random_model(1, **options)
    with tempfile.TemporaryDirectory() as directory:
      engine = ct2_oracle.export(model, os.path.join(directory, "ct2"))
      if args.kind == 'lm':
        prompts = [s[:4] for s in ct2_oracle.random_sources(200) if len(s) >= 4][:50]
        compared = ct2_oracle.compare_generation(model, engine, prompts)
      else:
        compared = ct2_oracle.compare_translation(
            model, engine, ct2_oracle.random_sources(100), beam=False)
    good = (compared.greedy_same == compared.sentences
            and compared.score_difference <= 1e-4)
    worst = max(worst, compared.score_difference)
    if not good:
      failed.append(number)
    print(f'{number:4d} {"ok " if good else "BAD"} greedy {compared.greedy_same}/'
          f'{compared.sentences} log-prob diff {compared.score_difference:.1e} {options}',
          flush=True)
  print(f'{len(chosen) - len(failed)}/{len(chosen)} match; largest log-prob difference '
        f'{worst:.1e}; {time.monotonic() - started:.0f} s; failed: {failed or "none"}')
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
