"""`config.data.fit_batch_to_memory`: the largest batch whose compiled train step fits
in device memory, found by compiling the step ahead of time from shapes alone (nothing
is allocated) and reading its memory analysis."""

import logging
import math
import os
import time

import jax
import jax.numpy as jnp

from jaxnmt.model import transformer
from jaxnmt.training import optim
from jaxnmt.runtime import sharding
from jaxnmt.training import steps
from jaxnmt.model import initialize
from jaxnmt.training import train_state
from jaxnmt.errors import MeshError


def batch_shapes(config, rows: int) -> dict[str, tuple[int, int]]:
  """Shapes of a global training batch of `rows` rows."""
  target = config.data.max_target_length
  shapes = {key: (rows, target) for key in ('decoder_inputs', 'targets',
                                            'targets_segment_ids', 'targets_positions')}
  if config.task != 'lm':
    shapes.update({key: (rows, config.data.max_source_length) for key in (
        'inputs', 'inputs_segment_ids', 'inputs_positions')})
  return shapes


def compile_train_step(config, model_cfg: transformer.ModelConfig, mesh, rules, rows: int):
  """The train step compiled ahead of time for batches of `rows` rows, from shapes
  alone (nothing is allocated): its `memory_analysis()` is the step's footprint."""
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  abstract = train_state.abstract_train_state(model_cfg, tx, config.get('ema_decay', 0.0) > 0)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  graphdef, _, rest = initialize.abstract_model(model_cfg, config.seed)
  step_fn, _ = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
  state = initialize.with_shardings(abstract, shardings)
  rest = initialize.with_shardings(rest, sharding.replicated(mesh))
  where = sharding.batch_sharding(mesh, rules)
  batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=where)
           for key, shape in batch_shapes(config, rows).items()}
  return step_fn.lower(state, rest, batch).compile()


def step_bytes(compiled) -> int:
  """Peak bytes per device of a compiled step: arguments + outputs (less donated
  buffers reused for outputs) + temporaries."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def device_memory_limit(config) -> tuple[int, str]:
  """(usable bytes per device, where that figure comes from)."""
  if config.data.device_memory_gb:
    return int(config.data.device_memory_gb * 2**30), 'config.data.device_memory_gb'
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get('bytes_limit'):
    # Leave a tenth for fragmentation and buffers outside the step (batches in flight).
    return int(0.9 * stats['bytes_limit']), 'the device (90% of its limit)'
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return int(0.9 * ram / jax.local_device_count()), 'host RAM (90%) / local devices'


def fit_batch_size(config, model_cfg: transformer.ModelConfig, mesh, rules,
                   max_doublings: int = 6) -> tuple[int, dict[int, int]]:
  """The largest batch (rows) of the form batch_size * 2^k, |k| <= max_doublings,
  whose compiled train step fits in device memory. Returns (rows, {rows tried: bytes})."""
  limit, source = device_memory_limit(config)
  accumulate = config.optim.grad_accum_steps
  parts = math.prod(mesh.shape[axis] for axis in sharding.mesh_axes_of(rules, sharding.BATCH))
  granule = math.lcm(accumulate * parts, accumulate * jax.process_count())
  tried = {}

  def fits(rows: int) -> bool:
    if rows not in tried:
      started = time.time()
      tried[rows] = step_bytes(compile_train_step(config, model_cfg, mesh, rules, rows))
      logging.info('Memory fit: %d rows need %.1f MiB per device (limit %.1f MiB from %s; '
                   'compiled in %.1fs)', rows, tried[rows] / 2**20, limit / 2**20, source,
                   time.time() - started)
    return tried[rows] <= limit

  rows = config.data.batch_size
  if fits(rows):
    for _ in range(max_doublings):
      if not fits(rows * 2):
        break
      rows *= 2
    return rows, tried
  for _ in range(max_doublings):
    smaller = rows // 2
    if smaller < granule or smaller % granule:
      break
    rows = smaller
    if fits(rows):
      return rows, tried
  raise MeshError(
      f'no batch size fits in device memory: {rows} rows need {tried[rows] / 2**30:.2f} GiB '
      f'per device, {source} allows {limit / 2**30:.2f} GiB; shard the model '
      f'(config.mesh.fsdp/tensor), use config.model.remat or a smaller model')
