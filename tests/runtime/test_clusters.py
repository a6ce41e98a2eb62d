"""runtime/clusters: cluster detection, which is JAX's own (`clusters.describe_cluster`): a
subprocess gets the environment SLURM or Open MPI would give and reports what JAX
derives from it (nothing of JAX is mocked); `python -m jaxnmt.main` in a one-task SLURM
step runs as a single process, in a four-task one as a job of four."""

import json
import os
import subprocess
import sys

import pytest

from jaxnmt.runtime import host
from tests.helpers import ROOT, run_main, without_cluster


# What srun gives task 2 of 4 (JAX's SlurmCluster reads exactly these).
SLURM = dict(SLURM_JOB_ID='12345', SLURM_NTASKS='4', SLURM_PROCID='2', SLURM_LOCALID='0',
             SLURM_STEP_NODELIST='node[1-4]')
# What Open MPI 4's mpirun gives rank 2 of 4 (JAX's OmpiCluster; Open MPI 5 sets no
# OMPI_MCA_orte_hnp_uri and JAX 0.10 does not detect it).
OPEN_MPI = dict(OMPI_MCA_orte_hnp_uri='1531576320.0;tcp://10.96.0.1,10.148.0.1:34911',
                OMPI_COMM_WORLD_SIZE='4', OMPI_COMM_WORLD_RANK='2',
                OMPI_COMM_WORLD_LOCAL_RANK='0')
# JAX's TPU detection needs a Cloud TPU VM (TPU chips on the PCI bus and the GCE
# metadata server): it is not mocked here.
SCENARIOS = {
    'none': {},
    'slurm': SLURM,
    'slurm_nodes': {**SLURM, 'SLURM_STEP_NODELIST': 'gpu[007,009-010],cpu1',
                    'JAX_COORDINATOR_PORT': '1234'},
    # The batch script itself, outside srun, has no step node list: no JAX cluster.
    'slurm_batch': {k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'},
    'slurm_one_task': {**SLURM, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'},
    'slurm_unreadable': {**SLURM, 'SLURM_NTASKS': 'four'},
    'open_mpi': OPEN_MPI,
}

# Asks JAX's cluster detection in each environment, as `python -m jaxnmt.main` does
# (JAX reads os.environ on every call); one JSON line.
_DESCRIBE = r'''
import dataclasses, json, os, sys, time
from jaxnmt.runtime import clusters
import jax._src.clusters  # timed apart: importing JAX takes seconds on a busy machine
reports, clean = {}, dict(os.environ)
for name, environ in json.loads(sys.argv[1]).items():
  os.environ.clear()
  os.environ.update({**clean, **environ})
  start = time.perf_counter()
  cluster = clusters.describe_cluster()
  detected = clusters.detected_cluster()
  reports[name] = {'cluster': cluster and dataclasses.asdict(cluster),
                   'detected': detected, 'seconds': time.perf_counter() - start}
from jax._src import xla_bridge
print(json.dumps({'reports': reports, 'backends': len(xla_bridge._backends)}))
'''


@pytest.fixture(scope='module', name='detected')
def _detected() -> dict:
  """Each of SCENARIOS' reports; 'backends': how many JAX started (none, we hope)."""
  result = subprocess.run([sys.executable, '-c', _DESCRIBE, json.dumps(SCENARIOS)],
                          cwd=ROOT, timeout=120, env=without_cluster(os.environ),
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  output = json.loads(result.stdout.splitlines()[-1])
  return {**output['reports'], 'backends': output['backends']}


def test_no_cluster_is_none_fast_and_starts_no_backend(detected):
  report = detected['none']
  assert report['cluster'] is None and report['detected'] is None
  assert report['seconds'] < 2 and detected['backends'] == 0


def test_jax_derives_the_slurm_job(detected):
  cluster = dict(detected['slurm']['cluster'])
  host, port = cluster.pop('coordinator_address').split(':')
  assert cluster == {'name': 'SLURM', 'jax_type': 'SlurmCluster', 'process_count': 4,
                     'process_id': 2, 'local_process_id': 0, 'error': ''}
  assert host == 'node1' and 61440 <= int(port) <= 65535  # JAX's port from the job id
  assert detected['slurm']['detected'] == 'SLURM'
  assert detected['slurm_nodes']['cluster']['coordinator_address'] == 'gpu007:1234'


def test_slurm_outside_a_step_or_with_one_task_is_a_single_process(detected):
  assert detected['slurm_batch'] == {**detected['slurm_batch'], 'cluster': None,
                                     'detected': None}
  report = detected['slurm_one_task']
  assert report['cluster']['process_count'] == 1 and report['detected'] is None


def test_jax_derives_the_open_mpi_job(detected):
  cluster = dict(detected['open_mpi']['cluster'])
  host, port = cluster.pop('coordinator_address').split(':')
  assert cluster == {'name': 'Open MPI', 'jax_type': 'OmpiCluster', 'process_count': 4,
                     'process_id': 2, 'local_process_id': 0, 'error': ''}
  assert host == '10.96.0.1' and 61440 <= int(port) <= 65535  # the launcher's address
  assert detected['open_mpi']['detected'] == 'Open MPI'


def test_a_cluster_jax_cannot_read_runs_as_a_single_process(detected):
  report = detected['slurm_unreadable']
  assert report['detected'] is None and 'ValueError' in report['cluster']['error']


def _main(*flags, **env):
  """`python -m jaxnmt.main` in this environment as a cluster would extend it."""
  return run_main(*flags, env={**without_cluster(os.environ), **env}, timeout=120)


def test_main_in_a_one_task_slurm_step_runs_as_a_single_process(tmp_path):
  result = _main('--mode=translate', f'--workdir={tmp_path / "none"}',
                 **{**SLURM, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'})
  # It joined no job (process 0 of 1), then stopped on the missing workdir.
  assert result.returncode == 2 and 'Process 0 of 1:' in result.stderr
  assert 'a multi-process run' not in result.stderr
  # Detection imported JAX before `prepare`, and the allocator restart still happens.
  host_line = next(line for line in result.stderr.splitlines() if 'Host: allocator:' in line)
  if host.find_tcmalloc() or host.hugepages_available():
    assert 'tcmalloc' in host_line or 'transparent huge pages' in host_line, host_line
  assert 'config.json not found' in result.stderr.splitlines()[-1]


def test_main_in_a_four_task_slurm_step_is_multi_process():
  result = _main('--config=configs/tiny.py', **SLURM)
  assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
      'error: --workdir is required with several processes: they must share one path '
      '(e.g. on a shared filesystem)')


_IMPORTS = r'''
import json, sys, time
from jaxnmt.runtime import clusters
start = time.perf_counter()
detected = clusters.detected_cluster()
print(json.dumps({'detected': detected, 'seconds': time.perf_counter() - start,
                  'jax': 'jax' in sys.modules, 'tpu': clusters.tpu_runtime_installed()}))
'''


@pytest.mark.skipif(host.tpu_host(), reason='a TPU host')
def test_libtpu_without_tpu_chips_leaves_jax_unimported(libtpu):
  """The TPU compiler installed on a CPU machine: no cluster found, without importing
  JAX (JAX's TPU cluster types need TPU chips), so `prepare` may still restart cheaply."""
  env = {k: v for k, v in without_cluster(os.environ).items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run([sys.executable, '-c', _IMPORTS], cwd=ROOT, env=env, timeout=60,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report == {**report, 'detected': None, 'jax': False, 'tpu': False}
  assert report['seconds'] < 0.5, report
