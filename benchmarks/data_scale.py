"""The data side at scale, with no model: how fast a large synthetic corpus is made, how
fast the packed input pipeline runs on a prepared corpus (0, 1, 2 worker processes),
and what opening a prepared corpus costs a fresh process in seconds and memory.

  python benchmarks/data_scale.py generate --pairs=200000 --out=/tmp/bench/syn200k.tsv.gz
  python -m jaxnmt.main --mode=prepare --config=configs/tiny.py --workdir=/tmp/bench/w100k \
      --config.data.path=/tmp/bench/syn100k.tsv.gz      # prepared dir: /tmp/bench/w100k/data
  python benchmarks/data_scale.py pipeline --prepared=/tmp/bench/w100k/data \
      --workers=0,1,2 --seconds=10
  python benchmarks/data_scale.py startup --prepared=/tmp/bench/w100k/data

`generate` recombines spa-eng (read from $JAXNMT_DATA_DIR/spa-eng.zip): it runs through
rounds k = 0, 1, 2, ...; each round is a fresh random permutation of all spa-eng pairs,
and in round k >= 1 both sides of every pair get the suffix ` (k)`. So no (pair, round)
repeats, sentence lengths follow spa-eng's (plus a few tokens from round 1 on), and the
order is shuffled. Written gzip level 1 in blocks of 100k lines.

Each run first prints its command line and os.cpu_count(); RSS is ru_maxrss (KiB).
"""

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

BLOCK = 100_000


def print_header() -> None:
  print(f'# {" ".join([os.path.basename(sys.executable), *sys.argv])} '
        f'(os.cpu_count()={os.cpu_count()})', flush=True)


def read_spa_eng() -> tuple[list[str], list[str]]:
  from jaxnmt.data import corpus  # pylint: disable=g-import-not-at-top
  spec = corpus.resolve_path('', '', 'spa-eng.zip')
  report = corpus.ReadReport(spec)
  pairs = list(corpus.iter_pairs(spec, report=report))
  report.check()
  return [source for source, _ in pairs], [target for _, target in pairs]


def generate(args) -> None:
  started = time.perf_counter()
  sources, targets = read_spa_eng()
  read_s = time.perf_counter() - started
  rng, size = np.random.default_rng(args.seed), len(sources)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  partial = args.out + '.partial'
  started = time.perf_counter()
  with gzip.open(partial, 'wb', compresslevel=1) as out:
    written, order = 0, None
    while written < args.pairs:
      round_, offset = divmod(written, size)
      if offset == 0:
        order = rng.permutation(size)
      suffix = f' ({round_})' if round_ else ''
      take = order[offset:offset + min(BLOCK, size - offset, args.pairs - written)]
      block = ''.join(f'{sources[j]}{suffix}\t{targets[j]}{suffix}\n' for j in take.tolist())
      out.write(block.encode('utf-8'))
      written += len(take)
  os.replace(partial, args.out)
  write_s = time.perf_counter() - started
  print(f'read spa-eng: {size} pairs in {read_s:.2f} s')
  print(f'generate: {written} pairs in {write_s:.2f} s = {written / write_s:,.0f} pairs/s; '
        f'{os.path.getsize(args.out) / 2**20:.1f} MiB gzip -> {args.out}')


def open_stream(directory: str, batch_size: int, max_source_length: int,
                max_target_length: int, workers: int):
  """The trainer's training stream over a prepared directory (as data/inputs.py opens it)."""
  from jaxnmt.data import pipeline, prepare  # pylint: disable=g-import-not-at-top
  manifest = prepare.load_manifest(directory)
  if manifest is None:
    sys.exit(f'{directory} holds no manifest.json: run --mode=prepare first')
  stream = pipeline.TrainStream(
      prepare.open_corpora(manifest, directory), manifest['record_dtype'],
      batch_size=batch_size, max_source_length=max_source_length,
      max_target_length=max_target_length, seed=0, num_workers=workers)
  return iter(stream), sum(c['pairs'] for c in manifest['corpora'])


def real_tokens(batch) -> int:
  return int(np.count_nonzero(batch['inputs_segment_ids']) +
             np.count_nonzero(batch['targets_segment_ids']))


def pipeline_speed(args) -> None:
  from jaxnmt.data import pipeline  # pylint: disable=g-import-not-at-top
  for workers in [int(w) for w in args.workers.split(',')]:
    started = time.perf_counter()
    it, pairs = open_stream(args.prepared, args.batch_size, args.max_source_length,
                            args.max_target_length, workers)
    batch = next(it)
    startup_s = time.perf_counter() - started
    batches, tokens, fractions = 0, 0, []
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
      batch = next(it)
      batches += 1
      tokens += real_tokens(batch)
      fractions.append(pipeline.real_token_fraction(batch))
    elapsed = time.perf_counter() - started
    it.close()
    print(f'workers={workers}: start-up {startup_s:.2f} s (open -> first batch); '
          f'{batches / elapsed:.1f} batches/s, {tokens / elapsed:,.0f} real tokens/s, '
          f'real-token fraction {np.mean(fractions):.3f} ({batches} batches of '
          f'{args.batch_size} rows in {elapsed:.1f} s; corpus {pairs:,} pairs)', flush=True)
  self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  print(f'peak RSS of this process: {self_kib / 1024:.0f} MiB (ru_maxrss {self_kib} KiB); '
        f'worker processes are separate: largest finished child {children_kib / 1024:.0f} '
        f'MiB (RUSAGE_CHILDREN, 0 if no workers ran)')


def open_once(args) -> None:
  """Hidden: run in a fresh process by `startup`; prints one JSON line."""
  started = time.perf_counter()
  from jaxnmt.data import pipeline, prepare  # pylint: disable=g-import-not-at-top,unused-import
  imported = time.perf_counter()
  it, pairs = open_stream(args.prepared, 32, args.max_source_length,
                          args.max_target_length, 0)
  next(it)
  done = time.perf_counter()
  it.close()
  print(json.dumps(dict(import_s=imported - started, open_s=done - imported, pairs=pairs,
                        maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))


def startup(args) -> None:
  command = [sys.executable, os.path.abspath(__file__), '_open', '--prepared', args.prepared,
             '--max_source_length', str(args.max_source_length),
             '--max_target_length', str(args.max_target_length)]
  started = time.perf_counter()
  result = subprocess.run(command, check=True, capture_output=True, text=True)
  wall = time.perf_counter() - started
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  print(f'fresh process, workers=0, batch_size=32, corpus {figures["pairs"]:,} pairs: '
        f'open -> first batch {figures["open_s"]:.2f} s (after {figures["import_s"]:.2f} s '
        f'importing jaxnmt.data); peak RSS {figures["maxrss_kib"] / 1024:.0f} MiB '
        f'(ru_maxrss {figures["maxrss_kib"]} KiB); subprocess wall {wall:.2f} s')


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='command', required=True,
                                   metavar='{generate,pipeline,startup}')
  gen = commands.add_parser('generate', help='a synthetic corpus recombined from spa-eng')
  gen.add_argument('--pairs', type=int, required=True)
  gen.add_argument('--out', required=True, help='PATH.tsv.gz')
  gen.add_argument('--seed', type=int, default=0)
  for name in ('pipeline', 'startup', '_open'):
    helps = {'pipeline': 'batches and real tokens/s of the input pipeline alone',
             'startup': 'seconds and peak RSS to the first batch, in a fresh process'}
    sub = commands.add_parser(name, **({'help': helps[name]} if name in helps else {}))
    sub.add_argument('--prepared', required=True, help='a prepared dir with manifest.json')
    sub.add_argument('--max_source_length', type=int, default=56)
    sub.add_argument('--max_target_length', type=int, default=64)
    if name == 'pipeline':
      sub.add_argument('--workers', default='0,1,2', help='comma-separated worker counts')
      sub.add_argument('--seconds', type=float, default=20.0)
      sub.add_argument('--batch_size', type=int, default=256)
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  if args.command != '_open':
    print_header()
  {'generate': generate, 'pipeline': pipeline_speed, 'startup': startup,
   '_open': open_once}[args.command](args)


if __name__ == '__main__':
  main()
