"""Multi-process start-up with JAX's own runtime (`jax.distributed`): NCCL on GPUs,
ICI/DCN on TPU pods, gloo on CPUs."""

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxnmt.errors import DistributedError, RuntimeFailure
from jaxnmt.host_runtime import detected_cluster


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, timeout_s: int) -> None:
  """Joins the job: explicitly (all three arguments), by cluster auto-detection, or not
  at all (a single process). Fails within `timeout_s` if the coordinator is unreachable."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise DistributedError('--coordinator_address, --num_processes and --process_id '
                             'must be given together')
    if not 0 <= process_id < num_processes:
      raise DistributedError(f'--process_id={process_id} must be in [0, {num_processes})')
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    where = f'coordinator {coordinator_address}'
  else:
    cluster = detected_cluster()
    if cluster is None:
      return
    kwargs, where = {}, f'{cluster} cluster'
  # CPU collectives across processes go through gloo (ignored on GPUs and TPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except Exception as error:  # the runtime raises several types (XlaRuntimeError, ...)
    raise RuntimeFailure(f'could not join the job through the {where} within '
                           f'{timeout_s}s: {str(error).splitlines()[0][:200]}') from error


def agree(local_flags) -> np.ndarray:
  """Element-wise OR of every process's boolean flags: what one process saw, all act
  on. Collective: every process calls it at the same step with the same number of
  flags."""
  local_flags = np.asarray(local_flags, dtype=bool)
  if jax.process_count() == 1:
    return local_flags
  gathered = multihost_utils.process_allgather(local_flags.astype(np.int32))
  return np.asarray(gathered).reshape(jax.process_count(), -1).any(axis=0)
