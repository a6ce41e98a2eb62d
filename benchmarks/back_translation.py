"""Back-translation on the README corpus, at equal training budgets: BLEU of the forward
model (en->es) trained on the real pairs alone and on the real pairs plus back-translated
ones, both on one held-out test set.

The corpus is shuffled once and cut into three disjoint parts: a test set, a
monolingual slice (only its Spanish side is used) and the real pairs. The recipe of
docs/back-translation.md then runs as written: the reverse model (es->en) on the real
pairs, the monolingual Spanish translated with it by sampling, the forward model on
real.tsv + bt.tsv (tagged `<bt>`; weights 0.5/0.5, and mixed by size), and the
baseline forward model on real.tsv, each for `--steps` updates of configs/tiny.py. Both forward models translate
the test set with beam 4; sacrebleu scores them.

  python benchmarks/back_translation.py --workdir=/tmp/bt --steps=400 --mono=10000
"""

import argparse
import os
import random
import subprocess
import sys
import time
import zipfile

import sacrebleu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*flags: str, log: str) -> float:
  """`python -m jaxnmt.main *flags`, its output to `log`; the seconds it took."""
  started = time.monotonic()
  with open(log, 'w', encoding='utf-8') as handle:
    code = subprocess.call([sys.executable, '-m', 'jaxnmt.main', *flags], cwd=ROOT,
                           stdout=handle, stderr=subprocess.STDOUT)
  if code:
    raise SystemExit(f'{" ".join(flags)} failed (exit {code}): see {log}')
  return time.monotonic() - started


def _split(workdir: str, test: int, mono: int, seed: int = 0) -> dict:
  data = os.environ.get('JAXNMT_DATA_DIR', os.path.join(ROOT, '..', 'shared', 'data'))
  with zipfile.ZipFile(os.path.join(data, 'spa-eng.zip')) as archive:
    lines = archive.read('spa-eng/spa.txt').decode('utf-8').splitlines()
  pairs, seen = [], set()
  for line in lines:
    fields = line.split('\t')
    if len(fields) >= 2 and fields[0] not in seen:  # one pair per English sentence
      seen.add(fields[0])
      pairs.append((fields[0], fields[1]))
  random.Random(seed).shuffle(pairs)
  parts = {'test': pairs[:test], 'mono': pairs[test:test + mono],
           'real': pairs[test + mono:]}
  paths = {name: os.path.join(workdir, name) for name in
           ('real.tsv', 'mono.es', 'test.en', 'test.es')}
  with open(paths['real.tsv'], 'w', encoding='utf-8') as handle:
    handle.writelines(f'{en}\t{es}\n' for en, es in parts['real'])
  with open(paths['mono.es'], 'w', encoding='utf-8') as handle:
    handle.writelines(f'{es}\n' for _, es in parts['mono'])
  for side, index in (('test.en', 0), ('test.es', 1)):
    with open(paths[side], 'w', encoding='utf-8') as handle:
      handle.writelines(pair[index] + '\n' for pair in parts['test'])
  paths['sizes'] = {name: len(value) for name, value in parts.items()}
  return paths


def _train(workdir: str, steps: int, log: str, *flags: str) -> float:
  return _main('--config=configs/tiny.py', f'--workdir={workdir}',
               f'--config.num_train_steps={steps}', '--config.train_time_limit_minutes=0',
               f'--config.eval_every_steps={steps}', f'--config.checkpoint_every_steps={steps}',
               *flags, log=log)


def _bleu(workdir: str, paths: dict, log: str) -> tuple[float, float]:
  output = log + '.hyp'
  seconds = _main('--mode=translate', f'--workdir={workdir}', f'--input={paths["test.en"]}',
                  f'--output={output}', log=log)
  with open(output, encoding='utf-8') as handle:
    hypotheses = handle.read().splitlines()
  with open(paths['test.es'], encoding='utf-8') as handle:
    references = handle.read().splitlines()
  return sacrebleu.corpus_bleu(hypotheses, [references]).score, seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--mono', type=int, default=10_000)
  parser.add_argument('--test', type=int, default=2_000)
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  paths = _split(args.workdir, args.test, args.mono)
  print('pairs:', paths['sizes'], flush=True)
  run = lambda name: os.path.join(args.workdir, name)
  seconds = {'reverse': _train(run('es-en'), args.steps, run('es-en.log'),
                               f'--config.data.path={paths["real.tsv"]}',
                               '--config.data.reverse=True')}
  seconds['back-translate'] = _main(
      '--mode=translate', f'--workdir={run("es-en")}', f'--input={paths["mono.es"]}',
      f'--output={run("mono.en")}', '--temperature=1.0', '--top_k=10', '--beam_size=1',
      log=run('mono.log'))
  with open(run('mono.en'), encoding='utf-8') as synthetic, \
      open(paths['mono.es'], encoding='utf-8') as real, \
      open(run('bt.tsv'), 'w', encoding='utf-8') as handle:
    handle.writelines(f'{en.rstrip(chr(10))}\t{es}' for en, es in zip(synthetic, real))
  seconds['baseline'] = _train(run('en-es'), args.steps, run('en-es.log'),
                               f'--config.data.path={paths["real.tsv"]}')
  mixture = (f'--config.data.path={paths["real.tsv"]},{run("bt.tsv")}',
             '--config.data.tags=,bt')
  seconds['with bt'] = _train(run('en-es-bt'), args.steps, run('en-es-bt.log'), *mixture,
                              '--config.data.weights=0.5,0.5')
  seconds['with bt by size'] = _train(run('en-es-bt-natural'), args.steps,
                                      run('en-es-bt-natural.log'), *mixture)
  results = {name: _bleu(run(workdir), paths, run(f'{workdir}.test.log'))
             for name, workdir in (('baseline', 'en-es'), ('with bt 1:1', 'en-es-bt'),
                                   ('with bt by size', 'en-es-bt-natural'))}
  print(f'{args.steps} updates each of configs/tiny.py; {paths["sizes"]["real"]} real '
        f'pairs, {args.mono} back-translated (sampled, top-k 10), {args.test} test pairs')
  for name, (bleu, _) in results.items():
    print(f'  {name:15s} BLEU {bleu:.2f} (beam 4, sacrebleu)')
  print('  seconds: ' + ', '.join(f'{k} {v:.0f}' for k, v in seconds.items()))


if __name__ == '__main__':
  main()
