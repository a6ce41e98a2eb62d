"""`--mode=compile`: every step of a run compiled for a TPU slice from this machine,
before any launch.

  python -m jaxnmt.main --mode=compile --config=configs/big.py --topology=v5e-16
  python -m jaxnmt.main --mode=compile --config=configs/big.py --topology=v5e-256 \
      --num_slices=2 --config.data.batch_size=1024 --config.data.eval_batch_size=1024
  python -m jaxnmt.main --mode=compile --config=configs/big.py --topology=v5e-64 --plan

The train step, the eval step and the greedy and beam decoders of translate and the
eval worker are compiled by the TPU compiler (libtpu, `pip install -e
'.[tpu-compile]'`) for the slice's devices, through the code a training run uses, and
a table per function gives the bytes per chip (train state, arguments, outputs,
temporaries, code) against the chip's HBM, the FLOPs per call, and the collectives by
kind with the bytes each moves per call and the mesh axes it runs over. The same goes
to WORKDIR/compile/<slice>.json. A function that does not fit ends the command with
one line (exit 2) naming it, the bytes over, its largest buffer and what to change.
`--plan` ranks the meshes of the slice instead; `--save_compiled` also writes the
compiled train step for `--compiled_step`. Without --topology: this job's own devices.
"""

import json
import logging
import re

import jax

from jaxnmt import config_lib
from jaxnmt.errors import MeshError
from jaxnmt.errors import UserError
from jaxnmt.runtime import files
from jaxnmt.runtime import sharding
from jaxnmt.runtime import topology
from jaxnmt.training import executables
from jaxnmt.training import fit
from jaxnmt.training import preflight

_GIB = 2**30


def _target(flags, config):
  """(devices, HBM bytes per device, a name for the target, the slice or None)."""
  if flags.topology:
    tpu_slice = topology.parse(flags.topology, flags.num_slices)
    return topology.devices(tpu_slice), tpu_slice.hbm_bytes, tpu_slice.name, tpu_slice
  if flags.num_slices != 1:
    raise MeshError('--num_slices needs --topology (the slice each of them is)')
  limit, _ = fit.device_memory_limit(config)
  devices = jax.devices()
  return devices, limit, f'{len(devices)} x {devices[0].device_kind}', None


def _gib(count: int) -> str:
  return f'{count / _GIB:.2f}'


def print_reports(reports, target: str, hbm: int) -> None:
  print(f'{target}: {hbm / _GIB:.1f} GiB per device. Bytes per device, GiB; '
        f'FLOPs per device per call.')
  header = (f'{"function":14s} {"mesh":22s} {"rows":>5s} {"params":>7s} {"opt":>7s} '
            f'{"args":>7s} {"out":>7s} {"temp":>7s} {"code":>6s} {"needed":>7s} '
            f'{"free":>7s} {"fits":>4s} {"TFLOP":>8s} {"comm MiB":>9s} {"compile":>8s}')
  print(header)
  for report in reports:
    mesh = 'x'.join(f'{axis[0]}{size}' for axis, size in report.mesh.items() if size > 1)
    memory = report.memory
    print(f'{report.function:14s} {mesh or "1 device":22s} {report.rows:5d} '
          f'{_gib(report.state.get("params", 0)):>7s} '
          f'{_gib(report.state.get("opt_state", 0) + report.state.get("ema", 0)):>7s} '
          f'{_gib(memory.get("arguments", 0)):>7s} {_gib(memory.get("outputs", 0)):>7s} '
          f'{_gib(memory.get("temporaries", 0)):>7s} {_gib(memory.get("code", 0)):>6s} '
          f'{_gib(report.needed):>7s} {_gib(report.headroom):>7s} '
          f'{"yes" if report.fits else "NO":>4s} {report.flops / 1e12:8.3f} '
          f'{report.collective_bytes() / 2**20:9.1f} {report.compile_s:7.1f}s')
  for report in reports:
    if report.error:
      print(f'{report.function}: {report.error}')
    if report.note:
      print(f'{report.function}: {report.note}')
    for item in report.collectives:
      axes = ','.join(item['axes']) or '-'
      notes = [' over DCN' if item['crosses_slices'] else '',
               ' per decode step' if item['in_unbounded_loop'] else '']
      print(f'  {report.function:14s} {item["kind"]:18s} over {axes:16s} '
            f'{item["bytes"] / 2**20:10.2f} MiB in {item["count"]:4d} ops{"".join(notes)}')


def _file_name(target: str, plan: bool) -> str:
  name = re.sub(r'[^A-Za-z0-9_.-]+', '_', target.replace(' x ', 'x')).strip('_')
  return f'{name}{"-plan" if plan else ""}.json'


def _write(workdir: str, target: str, plan: bool, record: dict) -> str:
  path = files.join(workdir, 'compile', _file_name(target, plan))
  files.makedirs(files.join(workdir, 'compile'))
  files.write_text(path, json.dumps(record, indent=1, default=str) + '\n')
  return path


def _plan_fingerprint(config, target: str, hbm: int) -> dict:
  """What a plan's compiles depend on: the target, the program's config fields and
  the compiler's versions and the sources compiled (a stopped plan is resumed only
  when all match)."""
  return {'target': target, 'hbm_bytes': hbm,
          'config_sha256': executables.config_sha256(executables.program_fields(config)),
          'versions': executables.versions(), 'sources': executables.sources()}


def _compiled_before(path: str, fingerprint: dict) -> dict:
  """{Candidate.key: Candidate} of the plan saved at `path` for the same program and
  target, or {} (none, another program, or unreadable: the plan starts afresh)."""
  if not files.exists(path):
    return {}
  try:
    record = json.loads(files.read_text(path))
    saved = [preflight.Candidate.from_dict(item) for item in record['candidates']]
  except (ValueError, KeyError, TypeError) as error:
    logging.warning('Ignoring the plan at %s (unreadable: %s); compiling every mesh',
                    path, error)
    return {}
  differs = [key for key in fingerprint if record.get('fingerprint', {}).get(key) !=
             fingerprint[key]]
  if differs:
    logging.info('The plan at %s was compiled for another %s; compiling every mesh',
                 path, ', '.join(differs))
    return {}
  compiled = {c.key: c for c in saved if c.report is not None}
  print(f'Resuming the plan at {path}: {len(compiled)} meshes compiled before')
  return compiled


def _plan(config, model_cfg, devices, hbm, target: str, workdir: str) -> None:
  print(f'Planning {target} ({len(devices)} devices, {hbm / _GIB:.1f} GiB each): the '
        f'train step compiled per mesh')
  path = files.join(workdir, 'compile', _file_name(target, True))
  fingerprint = _plan_fingerprint(config, target, hbm)

  def save(candidates, complete: bool = False):
    _write(workdir, target, True, {
        'target': target, 'hbm_bytes': hbm, 'complete': complete,
        'fingerprint': fingerprint,
        'candidates': [candidate.as_dict() for candidate in candidates]})

  candidates = preflight.plan(config, model_cfg, devices, hbm,
                              compiled=_compiled_before(path, fingerprint), progress=save)
  print(f'{"rank":4s} {"flags":70s} {"fits":4s} {"needed GiB":>10s} '
        f'{"comm MiB/step":>13s}')
  for rank, candidate in enumerate(candidates, 1):
    report = candidate.report
    needed = f'{report.needed / _GIB:10.2f}' if report else f'{"-":>10s}'
    comm = f'{report.collective_bytes() / 2**20:13.1f}' if report else (
        f'{"cut: " + candidate.cut:>13s}')
    print(f'{rank:4d} {candidate.flags():70s} {"yes" if candidate.fits else "no":4s} '
          f'{needed} {comm}')
  save(candidates, complete=True)
  logging.info('Wrote %s', path)
  best = next((candidate for candidate in candidates if candidate.fits), None)
  if not candidates:
    raise MeshError(f'no data x fsdp x tensor mesh of {target} divides the batch '
                    f'({config.data.batch_size} rows, {config.data.eval_batch_size} to '
                    f'evaluate) and the model\'s dimensions: change config.data.batch_size')
  if best is None:
    raise MeshError(f'no mesh of {target} fits the train step: use more chips, a '
                    f'smaller batch or a smaller model (the ranking above)')
  print(f'best: python -m jaxnmt.main --config=... {best.flags()}')


def main(workdir: str, flags) -> None:
  config = flags.config
  config_lib.validate(config)
  devices, hbm, target, _ = _target(flags, config)
  processes = len({device.process_index for device in devices})
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  if flags.plan:
    _plan(config, model_cfg, devices, hbm, target, workdir)
    return
  config_lib.check_mesh(config, len(devices), processes)
  unknown = [name for name in flags.compile_functions if name not in preflight.FUNCTIONS]
  if unknown or not flags.compile_functions:
    raise UserError(f'--compile_functions: unknown {unknown}; choose from '
                    f'{", ".join(preflight.FUNCTIONS)}')
  functions = list(flags.compile_functions)
  if flags.save_compiled and 'train_step' not in functions:
    functions.insert(0, 'train_step')
  if flags.save_compiled:  # a step from JAX's compilation cache would not serialize whole
    with executables.uncached():
      reports = preflight.check(config, model_cfg, devices, hbm, functions, flags.batch_size)
  else:
    reports = preflight.check(config, model_cfg, devices, hbm, functions, flags.batch_size)
  print_reports(reports, target, hbm)
  path = _write(workdir, target, False, {
      'target': target, 'devices': len(devices), 'processes': processes,
      'hbm_bytes': hbm, 'jax': jax.__version__,
      'functions': [report.as_dict() for report in reports]})
  logging.info('Wrote %s', path)
  if flags.save_compiled:
    train = next(report for report in reports if report.function == 'train_step')
    if train.compiled is not None:
      saved = files.join(workdir, 'compile', _file_name(target, False)[:-5] + '.train_step')
      mesh, _ = sharding.plan_mesh(config, devices)
      executables.save(train.compiled, saved, config=config, mesh=mesh,
                       extra={'target': target})
      print(f'compiled train step: {saved} (train with --compiled_step={saved})')
  for report in reports:
    if not report.fits:
      over = (f'{(report.needed - hbm) / _GIB:.2f} GiB over {hbm / _GIB:.1f} GiB'
              if not report.error else report.error)
      largest = f'; largest buffer {report.largest}' if report.largest else ''
      raise MeshError(f'{report.function} does not fit {target}: {over}{largest}; '
                      f'{preflight.advice(report, config)}')
