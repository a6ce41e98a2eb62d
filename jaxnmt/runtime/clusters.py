"""The cluster a process is in, found before JAX starts a backend: the job that
`jax.distributed.initialize()` without arguments would join (SLURM, Open MPI, Cloud
TPU, GKE, Kubernetes), read by JAX's own detection. `main.py` asks `detected_cluster`
first thing, since host settings (`host.prepare`) apply to a single process only.
"""

import dataclasses
import logging
import os

from jaxnmt.runtime import host


# JAX's cluster types by the name messages use ("the SLURM cluster"); others by JAX's.
_CLUSTER_NAMES = {'OmpiCluster': 'Open MPI', 'SlurmCluster': 'SLURM',
                  'GceTpuCluster': 'Cloud TPU', 'GkeTpuCluster': 'GKE TPU',
                  'K8sCluster': 'Kubernetes'}


@dataclasses.dataclass(frozen=True)
class Cluster:
  """What `jax.distributed.initialize()` without arguments reads from the environment
  (`describe_cluster`). Values JAX could not read are None, and `error` says why."""
  name: str  # for messages: 'SLURM', 'Open MPI', 'Cloud TPU', ...
  jax_type: str  # JAX's ClusterEnv subclass, e.g. 'SlurmCluster'
  process_count: int | None
  process_id: int | None
  local_process_id: int | None  # off TPUs JAX shows a process only this local device
  coordinator_address: str | None  # None too when not asked for
  error: str = ''


def describe_cluster(coordinator_timeout_s: int | None = 10) -> Cluster | None:
  """The cluster environment JAX would configure `jax.distributed.initialize()` from,
  found by JAX's own detection rather than ours, so jaxnmt joins exactly the clusters
  JAX can, with the values JAX derives; None where there is none. Mirrors JAX's choice
  (`ClusterEnv.auto_detect_unset_distributed_params`): the first registered type whose
  `is_env_present()` holds, skipping opt-in types (mpi4py) as JAX does unless named.
  A check that raises counts as absent (JAX would raise only once asked to join).

  Fast and offline without a cluster: the TPU types consult the metadata server only
  on a Cloud TPU VM, Kubernetes only inside a pod. `coordinator_timeout_s`: how long
  the TPU and Kubernetes types may wait for the coordinator's name to resolve; None
  leaves the address out. Imports JAX (no backend): call it before `prepare` freely."""
  # pylint: disable-next=g-import-not-at-top
  from jax._src import clusters  # JAX's detection, not a public API: pinned by tests
  found = None
  for kind in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if kind.opt_in_only_method:
      continue
    try:
      present = kind.is_env_present()
    except Exception as error:  # pylint: disable=broad-except
      logging.warning('cluster detection: %s: %s: %s', kind.__name__,
                      type(error).__name__, error)
      continue
    if present:
      found = kind
      break
  if found is None:
    return None
  errors = []

  def read(getter):
    try:
      return getter()
    except Exception as error:  # pylint: disable=broad-except
      errors.append(f'{type(error).__name__}: {error}')
      return None

  coordinator = None
  if coordinator_timeout_s is not None:
    coordinator = os.environ.get('JAX_COORDINATOR_ADDRESS') or read(
        lambda: found.get_coordinator_address(
            timeout_secs=coordinator_timeout_s,
            override_coordinator_port=os.environ.get('JAX_COORDINATOR_PORT')))
  return Cluster(name=_CLUSTER_NAMES.get(found.__name__, found.name or found.__name__),
                 jax_type=found.__name__, process_count=read(found.get_process_count),
                 process_id=read(found.get_process_id),
                 local_process_id=read(found.get_local_process_id),
                 coordinator_address=coordinator, error='; '.join(errors))


# Every cluster type JAX detects needs one of these (see each `is_env_present`), or
# the TPU runtime on a TPU host: without them there is no cluster, and JAX need not be
# imported before `prepare` (which may restart the process).
_CLUSTER_VARIABLES = ('SLURM_JOB_ID', 'OMPI_MCA_orte_hnp_uri', 'KUBERNETES_SERVICE_HOST')


def tpu_runtime_installed(environ=os.environ) -> bool:
  """Whether JAX's TPU cluster types could be present: they need JAX to find a Cloud
  TPU VM at import, i.e. libtpu and TPU chips (`host.tpu_host`). libtpu alone, the
  TPU compiler of a CPU machine (`--mode=compile`), keeps JAX unimported here."""
  return host.tpu_runtime_installed(environ) and host.tpu_host(environ)


def detected_cluster() -> str | None:
  """The name of the cluster environment JAX joins by itself (`describe_cluster`) when
  it holds more than one process, else None. A one-task job (`srun -n 1`) runs as a
  single process like no cluster; so does one JAX cannot read, with a warning: joining
  it would fail, and explicit --coordinator_address flags still work there."""
  if not (tpu_runtime_installed() or any(name in os.environ for name in _CLUSTER_VARIABLES)):
    return None  # the common case, decided without importing JAX
  cluster = describe_cluster(coordinator_timeout_s=None)
  if cluster is None:
    return None
  if cluster.error:
    logging.warning('%s environment found, but JAX cannot read it (%s): running as a '
                    'single process', cluster.name, cluster.error)
    return None
  return cluster.name if cluster.process_count > 1 else None
