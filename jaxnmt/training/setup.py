"""What a training run builds before its first step, the same for the training loop and
`--mode=bench`: the checked config's mesh (`plan`), then the inputs with the batch
fitted to device memory, the sharded train state and the jitted steps, or a train step
compiled ahead of time and loaded from a file (`build`)."""

import dataclasses
import logging

import jax

from jaxnmt import config_lib
from jaxnmt.data import inputs as inputs_lib
from jaxnmt.model import initialize
from jaxnmt.model import transformer
from jaxnmt.runtime import files
from jaxnmt.runtime import sharding
from jaxnmt.training import executables
from jaxnmt.training import fit
from jaxnmt.training import optim
from jaxnmt.training import steps
from jaxnmt.training import train_state
from jaxnmt.errors import CompiledStepError


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a run steps with, except the train state (which each step replaces)."""
  inputs: inputs_lib.TrainingInputs
  model_cfg: transformer.ModelConfig
  schedule: object  # step -> learning rate
  graphdef: object
  rest: object  # the model's non-parameter variables (dropout RNG streams)
  shardings: dict  # of the train state
  batch_sharding: jax.sharding.NamedSharding
  # jitted (state, rest, batch) -> (state, metric sums), donating the state; or the same
  # loaded from --compiled_step (an executables.CompiledStep)
  step_fn: object
  eval_fn: object  # jitted (params, rest, batch) -> loss sums
  # config.data.fit_batch_to_memory: {'rows': the batch chosen, 'bytes_by_rows': {rows
  # tried: compiled step bytes per device}}; else None.
  memory_fit: dict | None


def plan(config) -> tuple[jax.sharding.Mesh, list]:
  """Checks `config` against itself and this job's devices; returns (mesh, rules)."""
  config_lib.validate(config)
  config_lib.check_mesh(config, jax.device_count(), jax.process_count())
  mesh, rules = sharding.plan_mesh(config)
  logging.info('Mesh %s over %d devices in %d processes', dict(mesh.shape),
               jax.device_count(), jax.process_count())
  return mesh, rules


def build(config, workdir: str, mesh, rules, compiled_step: str = '') -> tuple[Run, dict]:
  """(the run, its freshly initialised train state). With config.data.fit_batch_to_memory
  it first sets config.data.batch_size to the largest batch that fits (the caller
  decides whether to save the changed config).

  `compiled_step`: a file of `executables.save`, loaded (and checked against this
  config and mesh, before any data is prepared) as the train step instead of compiling
  it; the eval step is jitted as always. It cannot go with fit_batch_to_memory: the
  step is compiled for one batch size, and fitting would compile the step for others,
  the very work a saved step spares."""
  files.makedirs(workdir)
  loaded = None
  if compiled_step:
    if config.data.fit_batch_to_memory:
      raise CompiledStepError(
          '--compiled_step cannot go with config.data.fit_batch_to_memory: the step is '
          'compiled for one batch size; set fit_batch_to_memory=False and data.batch_size '
          'to the size it was compiled for')
    loaded = executables.load(compiled_step, config=config, mesh=mesh)
  run_inputs = inputs_lib.training_inputs(config, workdir)
  model_cfg = config_lib.model_config(config, run_inputs.tokenizer.vocab_size)
  memory_fit = None
  if config.data.fit_batch_to_memory:
    rows, tried = fit.fit_batch_size(config, model_cfg, mesh, rules)
    memory_fit = {'rows': rows, 'bytes_by_rows': tried}
    if rows != config.data.batch_size:
      logging.warning('Memory fit: batch_size %d -> %d rows', config.data.batch_size, rows)
      config.data.batch_size = rows
      run_inputs = inputs_lib.training_inputs(config, workdir)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  graphdef, state, rest, shardings = train_state.create_train_state(
      model_cfg, tx, config.seed, mesh, rules, ema=config.ema_decay > 0)
  logging.info('Model: %s parameters; %d rows per batch, %d per process',
               f'{initialize.count_params(state["params"]):,}', config.data.batch_size,
               config.data.batch_size // jax.process_count())
  step_fn, eval_fn = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
  if loaded is not None:
    step_fn = loaded  # the jitted one is never called, so never compiled
  return Run(inputs=run_inputs, model_cfg=model_cfg, schedule=schedule, graphdef=graphdef,
             rest=rest, shardings=shardings,
             batch_sharding=sharding.batch_sharding(mesh, rules), step_fn=step_fn,
             eval_fn=eval_fn, memory_fit=memory_fit), state
