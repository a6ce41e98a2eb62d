"""The pod-scale tables of BUILD_NOTES ("Before a launch"): `--mode=compile` for big and
the 3.3 B config on TPU slices, one JSON per target in OUT, then a markdown table of
every JSON there.

  python benchmarks/compile_tables.py --out=runs/compile_tables big-v5e-16 nllb3b-v5e-64
  python benchmarks/compile_tables.py --out=runs/compile_tables --table   # print only
  python benchmarks/compile_tables.py --out=runs/compile_tables --plan big-v5e-64

`--plan` runs `--mode=compile --plan` for a target instead (every data x fsdp x tensor
mesh of the slice; a stopped plan resumes) and prints its ranking.

Targets (name: config, slice, slices, overrides) are in TARGETS; `--functions` limits
what is compiled (the 3.3 B decoders are slow to compile on a small machine).
Each target runs in its own process, as `python -m jaxnmt.main --mode=compile` would.
"""

import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One row per chip at least: the batch splits over data x fsdp.
_BIG = ['--config.data.batch_size=256', '--config.data.eval_batch_size=256']
_BIG_POD = ['--config.data.batch_size=512', '--config.data.eval_batch_size=512']
_NLLB = ['--config.mesh.data=1', '--config.mesh.fsdp=-1']
TARGETS = {
    'big-v5e-16': ('configs/big.py', 'v5e-16', 1, _BIG),
    'big-v4-32': ('configs/big.py', 'v4-32', 1, _BIG),
    'big-v5p-128': ('configs/big.py', 'v5p-128', 1, _BIG),
    'big-v5e-256': ('configs/big.py', 'v5e-256', 1, _BIG),
    'big-2xv5e-256': ('configs/big.py', 'v5e-256', 2, _BIG_POD),
    'nllb3b-v5e-64': ('configs/nllb3b.py', 'v5e-64', 1, _NLLB),
    'nllb3b-v5p-128': ('configs/nllb3b.py', 'v5p-128', 1, _NLLB),
    # fsdp alone does not fit a v5e chip (the gathered layers stay live): heads, MLP
    # and vocabulary split 4 ways as well.
    'nllb3b-v5e-64-tensor4': ('configs/nllb3b.py', 'v5e-64', 1,
                              ['--config.mesh.data=1', '--config.mesh.fsdp=16',
                               '--config.mesh.tensor=4']),
}


# Planned targets: the config's own mesh flags are what the planner varies.
PLANS = {'big-v5e-64': ('configs/big.py', 'v5e-64', 1, _BIG)}


def run(name: str, out: str, functions: str, plan: bool = False) -> int:
  config, topology, slices, overrides = (PLANS if plan else TARGETS)[name]
  command = [sys.executable, '-m', 'jaxnmt.main', '--mode=compile', f'--config={config}',
             f'--topology={topology}', f'--num_slices={slices}',
             f'--workdir={os.path.join(out, name + ("-plan" if plan else ""))}',
             *(['--plan'] if plan else [f'--compile_functions={functions}']), *overrides]
  print(' '.join(command[1:]), flush=True)
  return subprocess.run(command, cwd=ROOT, check=False).returncode


def reports(out: str):
  """(target name, its JSON record, one compiled function's entry) for every function
  of every target under `out`, by target name."""
  for path in sorted(glob.glob(os.path.join(out, '*', 'compile', '*.json'))):
    if not path.endswith('-plan.json'):
      record = json.load(open(path))
      name = os.path.basename(os.path.dirname(os.path.dirname(path)))
      for item in record['functions']:
        yield name, record, item


def _gib(count: int) -> str:
  return f'{count / 2**30:.2f}'


def _mesh(item) -> str:
  return ' x '.join(f'{axis}={size}' for axis, size in item['mesh'].items() if size > 1)


def compact(out: str) -> None:
  """The train step of each target, one line each (README)."""
  print('| config | slice | mesh | train step per chip: needed of HBM | sent per step | '
        'compile here |')
  print('|---|---|---|---|---|---|')
  for name, record, item in reports(out):
    if item['function'] == 'train_step':
      sent = sum(c['bytes'] for c in item['collectives'])
      dcn = sum(c['bytes'] for c in item['collectives'] if c['crosses_slices'])
      needed = (f'{item["needed"] / 2**30:.2f} of {item["hbm_bytes"] / 2**30:.0f} GiB'
                if item['fits'] else f'does not fit: {item["error"][:60] or "over HBM"}')
      print(f'| {name.split("-")[0]} | {record["target"]} | {_mesh(item)} | {needed} | '
            f'{sent / 2**30:.2f} GiB{f" ({dcn / 2**20:.0f} MiB over DCN)" if dcn else ""} | '
            f'{item["compile_s"]:.0f} s |')


def table(out: str) -> None:
  print('| target | function | mesh | per-chip GiB (params / opt / temp / needed of HBM) | '
        'fits | TFLOP per chip | collectives per call (MiB) | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  for name, record, item in reports(out):
    state = item['state']
    comm = {}
    for collective in item['collectives']:
      key = (f'{collective["kind"]} {"+".join(collective["axes"])}'
             f'{" DCN" if collective["crosses_slices"] else ""}')
      comm[key] = comm.get(key, 0) + collective['bytes']
    comm_text = ', '.join(f'{key} {count / 2**20:.0f}'
                          for key, count in sorted(comm.items(), key=lambda kv: -kv[1])
                          if count >= 2**20) or '< 1'
    fits = 'yes' if item['fits'] else f'no: {item["error"] or "over HBM"}'
    print(f'| {name} | {item["function"]} | {_mesh(item)} | '
          f'{_gib(state.get("params", 0))} / '
          f'{_gib(state.get("opt_state", 0) + state.get("ema", 0))} / '
          f'{_gib(item["memory"].get("temporaries", 0))} / {_gib(item["needed"])} of '
          f'{_gib(item["hbm_bytes"])} | {fits} | '
          f'{item["flops"] / 1e12:.2f} | {comm_text} | {item["compile_s"]:.0f} |')


def ranking(out: str) -> None:
  """Each plan under `out`, ranked as the planner ranked it (markdown)."""
  for path in sorted(glob.glob(os.path.join(out, '*', 'compile', '*-plan.json'))):
    record = json.load(open(path))
    print(f'{record["target"]}{"" if record.get("complete") else " (stopped: partial)"}')
    print('| rank | mesh | remat | fits | needed GiB | sent per step (MiB) | largest kinds | '
          'compile s |')
    print('|---|---|---|---|---|---|---|---|')
    for rank, candidate in enumerate(record['candidates'], 1):
      item = candidate['report']
      if item is None:
        print(f'| {rank} | {_mesh(candidate) or "1 device"} | {candidate["remat"]} | no | - | '
              f'cut: {candidate["cut"]} | | |')
        continue
      kinds = {}
      for collective in item['collectives']:
        key = f'{collective["kind"]} {"+".join(collective["axes"]) or "?"}'
        kinds[key] = kinds.get(key, 0) + collective['bytes']
      largest = ', '.join(f'{key} {count / 2**20:.0f}' for key, count in
                          sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
      sent = sum(c['bytes'] for c in item['collectives'])
      print(f'| {rank} | {_mesh(item) or "1 device"} | {candidate["remat"]} | '
            f'{"yes" if candidate["fits"] else "no"} | {_gib(item["needed"])} | '
            f'{sent / 2**20:,.0f} | {largest} | {item["compile_s"]:.0f} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('targets', nargs='*', help=', '.join([*TARGETS, *PLANS]))
  parser.add_argument('--out', default='runs/compile_tables')
  parser.add_argument('--functions', default='train_step,eval_step,decode_greedy,decode_beam')
  parser.add_argument('--table', action='store_true', help='only print the table')
  parser.add_argument('--compact', action='store_true',
                      help='only print the train steps, one line each')
  parser.add_argument('--plan', action='store_true',
                      help='rank the meshes of the targets (PLANS) instead')
  args = parser.parse_args()
  known = PLANS if args.plan else TARGETS
  unknown = [name for name in args.targets if name not in known]
  if unknown:
    parser.error(f'unknown targets {unknown}; known: {", ".join(known)}')
  if not (args.table or args.compact):
    for name in args.targets:
      run(name, args.out, args.functions, plan=args.plan)
  if args.plan:
    ranking(args.out)
  else:
    (compact if args.compact else table)(args.out)


if __name__ == '__main__':
  main()
