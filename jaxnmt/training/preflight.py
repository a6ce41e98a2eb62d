"""Before a launch: every function a run compiles, compiled for a mesh of any devices
(this job's, or the compile-only devices of a TPU slice this machine does not have),
with what the compiler says each needs per device.

`check` compiles the train step and the eval step through the code a training run
uses (`fit.compile_train_step`, `steps.compile_steps`) and the greedy and beam decoders
of translate and the eval worker (`translation.compile_decoder`), and reads each
program's memory, FLOPs and collectives (`runtime/hlo.py`). `plan` ranks the meshes
of a device count. Nothing is allocated or run.
"""

import dataclasses
import itertools
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnmt import config_lib
from jaxnmt.errors import MeshError
from jaxnmt.decoding import translation
from jaxnmt.model import initialize
from jaxnmt.runtime import hlo
from jaxnmt.runtime import sharding
from jaxnmt.training import fit
from jaxnmt.training import optim
from jaxnmt.training import steps
from jaxnmt.training import train_state

FUNCTIONS = ('train_step', 'eval_step', 'decode_greedy', 'decode_beam')
DECODERS = {'decode_greedy': translation.DecodeOptions(beam_size=1),
            'decode_beam': translation.DecodeOptions(beam_size=4)}


@dataclasses.dataclass
class Report:
  """One compiled function on one mesh; bytes are per device."""
  function: str
  mesh: dict[str, int]
  rows: int                    # batch rows of one call
  state: dict[str, int]        # the run's arrays it holds: params, opt_state, ema
  hbm_bytes: int               # the device's memory
  memory: dict[str, int] = dataclasses.field(default_factory=dict)  # hlo.memory
  flops: float = 0.0           # per device per call
  collectives: list = dataclasses.field(default_factory=list)  # hlo.Collective as dicts
  largest: str = ''            # the largest buffer of the program
  compile_s: float = 0.0
  error: str = ''              # why it does not fit (compiler or arithmetic)
  note: str = ''               # what was compiled differently, and why
  compiled: object = dataclasses.field(default=None, repr=False)  # the executable

  @property
  def needed(self) -> int:
    return self.memory.get('peak', sum(self.state.values()))

  @property
  def fits(self) -> bool:
    return not self.error and self.needed <= self.hbm_bytes

  @property
  def headroom(self) -> int:
    return self.hbm_bytes - self.needed

  def collective_bytes(self, dcn_only: bool = False) -> int:
    return sum(item['bytes'] for item in self.collectives
               if item['crosses_slices'] or not dcn_only)

  def as_dict(self) -> dict:
    record = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
              if field.name != 'compiled'}
    record.update(fits=self.fits, needed=self.needed, headroom=self.headroom)
    return record

  @classmethod
  def from_dict(cls, record: dict) -> 'Report':
    """The report `as_dict` wrote (without its executable)."""
    names = {field.name for field in dataclasses.fields(cls)} - {'compiled'}
    return cls(**{name: value for name, value in record.items() if name in names})


def state_bytes(config, model_cfg, mesh, rules) -> dict[str, int]:
  """Bytes per device (the fullest) of the train state's parts on `mesh`."""
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  abstract = train_state.abstract_train_state(model_cfg, tx, config.ema_decay > 0)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  return {part: sharding.planned_bytes(abstract[part], shardings[part])[1]
          for part in ('params', 'opt_state', 'ema') if part in abstract}


def _compile_eval_step(config, model_cfg, mesh, rules, rows: int):
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  abstract = train_state.abstract_train_state(model_cfg, tx)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  graphdef, _, rest = initialize.abstract_model(model_cfg, config.seed)
  _, eval_fn = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
  where = sharding.batch_sharding(mesh, rules)
  batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=where)
           for key, shape in fit.batch_shapes(config, rows).items()}
  return eval_fn.lower(initialize.with_shardings(abstract['params'], shardings['params']),
                       initialize.with_shardings(rest, sharding.replicated(mesh)),
                       batch).compile()


# The compiler's own words when a program does not fit.
_OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'Ran out of memory')


def _compiler_error(error: Exception) -> str:
  """One line of a compile failure: the compiler's out-of-memory summary if it gave one."""
  text = str(error)
  summary = re.search(r'(Ran out of memory[^\n]*|Used [\d.]+[KMGT]? of [\d.]+[KMGT]? '
                      r'[a-z]+[^\n]*|Exceeded [^\n]*)', text)
  return (summary.group(1) if summary else text.splitlines()[0] if text else
          type(error).__name__)[:300].rstrip('.')


def _unless_out_of_memory(compile_fn, report: Report, started: float):
  """compile_fn(), or None with `report.error` set when the compiler said the program
  does not fit (any other failure is raised)."""
  try:
    return compile_fn()
  except Exception as error:  # pylint: disable=broad-except
    if not any(sign in str(error) for sign in _OUT_OF_MEMORY):
      raise
    report.error = _compiler_error(error)
    report.compile_s = time.time() - started
    return None


def _collectives(compiled, mesh) -> list[dict]:
  return [dataclasses.asdict(item) for item in hlo.collectives(compiled, mesh)]


def compile_function(function: str, config, model_cfg, devices, hbm_bytes: int,
                     decode_rows: int = 64) -> Report:
  """`function` (one of FUNCTIONS) compiled for `devices`, with the run's mesh for the
  train and eval steps; the decoders as translate, serve and the eval worker run them:
  on one host's chips (a 1-D mesh), batches of up to `decode_rows` sentences
  (--batch_size)."""
  mesh, rules = sharding.plan_mesh(config, devices)
  started = time.time()
  if function in DECODERS:
    host = [device for device in mesh.devices.flat
            if device.process_index == devices[0].process_index]
    decode_mesh = jax.sharding.Mesh(np.asarray(host), ('data',))
    abstract = initialize.abstract_params(model_cfg)
    replicated = sharding.replicated(decode_mesh)
    params = sharding.planned_bytes(abstract, jax.tree.map(lambda _: replicated, abstract))[1]
    report = Report(function, dict(decode_mesh.shape), 0, {'params': params}, hbm_bytes)
    if params > hbm_bytes:
      report.error = (f'the parameters alone, replicated on every device for decoding, '
                      f'need {params / 2**30:.2f} GiB')
      return report
    def compile_decoder():
      nonlocal decode_mesh
      try:
        compiled, report.rows, _, _ = translation.compile_decoder(
            model_cfg, config, host, DECODERS[function], batch_size=decode_rows)
        return compiled
      except Exception as error:  # pylint: disable=broad-except
        if 'RET_CHECK' not in str(error) or len(host) == mesh.size:
          raise
        # v5e: libtpu compiles no program for part of a slice ("limited ICI routing",
        # device ids outside the target's).
        report.note = ('the TPU compiler refused a program on one host\'s chips of this '
                       f'slice ({_compiler_error(error)[:120]}): compiled over the whole slice')
        decode_mesh = jax.sharding.Mesh(np.asarray(list(mesh.devices.flat)), ('data',))
        report.mesh = dict(decode_mesh.shape)
        compiled, report.rows, _, _ = translation.compile_decoder(
            model_cfg, config, list(mesh.devices.flat), DECODERS[function],
            batch_size=decode_rows)
        return compiled

    compiled = _unless_out_of_memory(compile_decoder, report, started)
    if compiled is None:
      return report
    mesh = decode_mesh
  else:
    state = state_bytes(config, model_cfg, mesh, rules)
    what = 'the train state alone needs'
    if function == 'eval_step':
      state, what = {'params': state['params']}, 'the parameters alone need'
    rows = config.data.batch_size if function == 'train_step' else config.data.eval_batch_size
    report = Report(function, dict(mesh.shape), rows, state, hbm_bytes)
    if sum(state.values()) > hbm_bytes:
      report.error = f'{what} {sum(state.values()) / 2**30:.2f} GiB'
      return report
    compile_step = fit.compile_train_step if function == 'train_step' else _compile_eval_step
    compiled = _unless_out_of_memory(
        lambda: compile_step(config, model_cfg, mesh, rules, rows), report, started)
    if compiled is None:
      return report
  report.compile_s = time.time() - started
  report.memory = hlo.memory(compiled)
  report.flops = hlo.flops(compiled)
  report.collectives = _collectives(compiled, mesh)
  report.largest = hlo.largest_buffer(compiled)
  report.compiled = compiled
  return report


def check(config, model_cfg, devices, hbm_bytes: int, functions=FUNCTIONS,
          decode_rows: int = 64) -> list[Report]:
  """A report per function of `functions`, compiled for `devices`."""
  if config.task == 'lm':
    functions = [name for name in functions if name not in DECODERS]
  return [compile_function(name, config, model_cfg, devices, hbm_bytes, decode_rows)
          for name in functions]


def advice(report: Report, config) -> str:
  """What to change when `report` does not fit."""
  if report.function in DECODERS:
    return ('decode fewer sentences at once (--batch_size), or a smaller model: decoding '
            'replicates the parameters on every chip')
  state = sum(report.state.values())
  if state > report.hbm_bytes / 2:  # the state itself: split it further
    fsdp = report.mesh.get('fsdp', 1) * 2
    while state * report.mesh.get('fsdp', 1) / fsdp > 0.5 * report.hbm_bytes:
      fsdp *= 2
    return (f'split the train state over more chips (--config.mesh.fsdp={fsdp}; it '
            f'needs at least that many chips)')
  changes = []
  if report.mesh.get('fsdp', 1) > 1 and report.mesh.get('tensor', 1) == 1:
    changes.append('split each layer with tensor parallelism too (--config.mesh.tensor=4): '
                   'fsdp gathers whole layers, and the compiler may keep them all')
  if report.function == 'train_step' and config.model.remat == 'none':
    changes.append('recompute activations (--config.model.remat=full)')
  if report.function == 'train_step' and report.rows > 1:
    changes.append(f'fewer rows per micro-batch (--config.optim.grad_accum_steps='
                   f'{2 * config.optim.grad_accum_steps}, or --config.data.batch_size='
                   f'{report.rows // 2})')
  if config.model.dtype == 'float32':
    changes.append('bf16 compute (--config.model.dtype=bfloat16)')
  return '; '.join(changes) or 'a smaller model'


def candidate_meshes(config, devices: int, processes: int = 1,
                     slices: int = 1) -> list[dict[str, int]]:
  """Every data x fsdp x tensor mesh of `devices` whose axes divide the model's
  dimensions and the batch, with the batch split over `processes` and `data` spanning
  `slices` (tensor at most 8: a tensor group stays within a host's chips)."""
  found = []
  for tensor, fsdp in itertools.product([1, 2, 4, 8], _divisors(devices)):
    if devices % (tensor * fsdp) or (devices // (tensor * fsdp)) % slices:
      continue
    sizes = {'data': devices // (tensor * fsdp), 'fsdp': fsdp, 'tensor': tensor}
    trial = config.copy_and_resolve_references()
    trial.mesh.update(sizes)
    try:
      config_lib.check_mesh(trial, devices, processes)
    except MeshError:
      continue
    found.append(sizes)
  return found


def _divisors(number: int) -> list[int]:
  return [d for d in range(1, number + 1) if number % d == 0]


def candidate_key(mesh: dict[str, int], remat: str) -> tuple:
  """What a plan compiles once: the mesh and the remat setting."""
  return tuple(sorted(mesh.items())), remat


@dataclasses.dataclass
class Candidate:
  mesh: dict[str, int]
  remat: str
  state_bytes: int             # params + optimizer (+ ema) per device, by arithmetic
  report: Report | None = None  # the compiled train step; None: cut before compiling
  cut: str = ''                # why it was not compiled

  @property
  def fits(self) -> bool:
    return self.report is not None and self.report.fits

  @property
  def key(self) -> tuple:
    return candidate_key(self.mesh, self.remat)

  def flags(self) -> str:
    parts = [f'--config.mesh.{axis}={size}' for axis, size in self.mesh.items()]
    if self.remat != 'none':
      parts.append(f'--config.model.remat={self.remat}')
    return ' '.join(parts)

  def as_dict(self) -> dict:
    return {'mesh': self.mesh, 'remat': self.remat, 'state_bytes': self.state_bytes,
            'cut': self.cut, 'fits': self.fits,
            'report': self.report.as_dict() if self.report else None}

  @classmethod
  def from_dict(cls, record: dict) -> 'Candidate':
    report = record.get('report')
    return cls(dict(record['mesh']), record['remat'], record['state_bytes'],
               Report.from_dict(report) if report else None, record.get('cut', ''))


def plan(config, model_cfg, devices, hbm_bytes: int, log=print,
         compiled: dict | None = None, progress=None) -> list[Candidate]:
  """The train step compiled for each candidate mesh of `devices` (with remat if it
  does not fit without), ranked: fitting first, then by bytes communicated per step,
  then by memory needed. A mesh whose train state alone exceeds the memory is cut
  before compiling.

  `compiled`: {Candidate.key: Candidate} compiled before for the same program and
  target (a plan that was stopped), reused instead of compiling again. `progress`:
  called with the candidates so far after each compile, to save them."""
  compiled = compiled or {}
  candidates, attempts = [], []  # ranked at the end; everything compiled or cut
  processes = len({device.process_index for device in devices})
  slices = len({getattr(device, 'slice_index', 0) or 0 for device in devices})
  for sizes in candidate_meshes(config, len(devices), processes, slices):
    trial = config.copy_and_resolve_references()
    trial.mesh.update(sizes)
    mesh, rules = sharding.plan_mesh(trial, devices)
    state = sum(state_bytes(trial, model_cfg, mesh, rules).values())
    if state > hbm_bytes:
      candidates.append(Candidate(sizes, config.model.remat, state,
                                  cut=f'state {state / 2**30:.1f} GiB > HBM'))
      attempts.append(candidates[-1])
      continue
    for remat in dict.fromkeys([config.model.remat, 'full']):
      candidate = compiled.get(candidate_key(sizes, remat))
      if candidate is None or candidate.report is None:
        trial.model.remat = remat
        trial_model = config_lib.model_config(trial, model_cfg.vocab_size)
        report = compile_function('train_step', trial, trial_model, devices, hbm_bytes)
        report.compiled = None  # the executable is not kept: one per mesh adds up
        candidate, reused = Candidate(sizes, remat, state, report), ''
      else:
        report, reused = candidate.report, ', compiled before'
      log(f'  {candidate.flags():70s} {"fits" if candidate.fits else "does not fit":12s} '
          f'{report.needed / 2**30:7.2f} GiB  {report.collective_bytes() / 2**20:9.1f} MiB '
          f'communicated  ({report.compile_s:.0f} s{reused})')
      attempts.append(candidate)
      if progress:
        progress(attempts)
      if candidate.fits or remat == 'full':
        candidates.append(candidate)
        break
  return rank(candidates)


def rank(candidates: list[Candidate]) -> list[Candidate]:
  """Fitting first, then by bytes communicated per step, then by memory needed; the
  meshes cut before compiling last."""
  return sorted(candidates, key=lambda c: (
      not c.fits, c.report is None,
      c.report.collective_bytes() if c.report else 0,
      c.report.needed if c.report else c.state_bytes))
