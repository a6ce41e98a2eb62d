"""The launchers (`launch/*`) and the cluster detection `python -m jaxnmt.main` relies
on. Each launcher's dry run (DRY_RUN=1) must print exactly the commands a real launch
runs: the tests run those lines with stand-ins for python, srun and gcloud that report
the arguments they receive, so the quoting is checked end to end. Cluster detection is
JAX's own (`host.describe_cluster`): the tests give a subprocess the
environment SLURM or Open MPI would and check what JAX derives from it; nothing of
JAX is mocked."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from jaxnmt.runtime import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Arguments a launcher must pass through untouched: a space, a quote, an empty one.
ARGS = ['--config=configs/tiny.py', '--workdir=runs/my run', "--config.name=it's", '']
# Prints the arguments and environment a worker would start with, one JSON line.
_REPORT = ('import json, os, sys; print(json.dumps({"argv": sys.argv[1:], '
           '"XLA_FLAGS": os.environ.get("XLA_FLAGS"), '
           '"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS")}))')
_CLUSTER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'PMIX_', 'TPU_', 'MEGASCALE_',
                     'KUBERNETES_', 'JAX_COORDINATOR_')


def _executable(path, text: str) -> str:
  path.write_text(text, encoding='utf-8')
  path.chmod(0o755)
  return str(path)


@pytest.fixture(name='tools')
def _tools(tmp_path):
  """A folder of stand-ins, first on PATH: `python` reports its arguments; `srun` runs
  its command once, as a one-task step would; `gcloud` runs --command= in a shell, as
  every worker would. Each notes in `calls` that it ran."""
  folder = tmp_path / 'bin'
  folder.mkdir()
  calls = tmp_path / 'calls'
  _executable(folder / 'python', f'#!/bin/sh\necho python >> "{calls}"\n'
              f'exec {shlex.quote(sys.executable)} -c {shlex.quote(_REPORT)} "$@"\n')
  _executable(folder / 'srun', f'#!/bin/sh\necho srun >> "{calls}"\nexec "$@"\n')
  _executable(folder / 'gcloud', f'#!{sys.executable}\n'
              'import subprocess, sys\n'
              f'open({str(calls)!r}, "a").write("gcloud\\n")\n'
              'command = [a for a in sys.argv if a.startswith("--command=")][0]\n'
              'sys.exit(subprocess.call(["bash", "-c", command[len("--command="):]]))\n')
  environ = {name: value for name, value in os.environ.items()
             if not name.startswith(_CLUSTER_PREFIXES + ('DRY_RUN', 'XLA_FLAGS'))}
  environ['PATH'] = f'{folder}{os.pathsep}{environ["PATH"]}'
  return environ, calls


def _launch(script, environ, *args, **env):
  result = subprocess.run(['bash', f'launch/{script}', *args], cwd=ROOT, timeout=60,
                          env={**environ, **env}, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  return result


def _shell_output(line, environ, cwd=ROOT) -> str:
  """Runs a printed command line as a shell would; its standard output."""
  result = subprocess.run(['bash', '-c', line], cwd=cwd, env=environ, timeout=60,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def _shell(line, environ, cwd=ROOT) -> list[dict]:
  """The reports of the stand-ins a printed command line runs."""
  return [json.loads(text) for text in _shell_output(line, environ, cwd).splitlines()]


def _commands(stdout: str) -> list[str]:
  """The command lines of a dry run (lines starting with # explain them)."""
  return [line for line in stdout.splitlines() if not line.startswith('#')]


def test_local_dry_run_prints_each_process_command_and_starts_nothing(tools, tmp_path):
  environ, calls = tools
  log_dir = str(tmp_path / 'my logs')
  env = dict(NUM_PROCESSES='3', DEVICES_PER_PROCESS='2', COORDINATOR_PORT='12345',
             XLA_FLAGS='--xla_dump_to=/tmp/a b', LOG_DIR=log_dir)
  lines = _launch('local.sh', environ, *ARGS, DRY_RUN='1', **env).stdout.splitlines()
  assert len(lines) == 3 and not calls.exists() and not os.path.exists(log_dir)
  flags = '--xla_force_host_platform_device_count=2 --xla_dump_to=/tmp/a b'
  for i, line in enumerate(lines):
    words = shlex.split(line)
    redirect = [] if i == 0 else ['>', f'{log_dir}/process_{i}.log', '2>&1']
    assert words == ['env', 'JAX_PLATFORMS=cpu', f'XLA_FLAGS={flags}', 'python', '-m',
                     'jaxnmt.main', '--coordinator_address=127.0.0.1:12345',
                     '--num_processes=3', f'--process_id={i}', *ARGS, *redirect]
  # The lines run what a real launch runs (the stand-in python reports it).
  def reports(stdout):
    logs = [open(f'{log_dir}/process_{i}.log', encoding='utf-8').read() for i in (1, 2)]
    return [json.loads(text) for text in (stdout, *logs)]

  real = _launch('local.sh', environ, *ARGS, **env)
  assert real.stderr.count('exited with code 0') == 3
  launched = reports(real.stdout)
  printed = reports(''.join(_shell_output(line, environ) for line in lines))
  assert launched == printed and launched[2]['argv'][4] == '--process_id=2'
  assert launched[0]['XLA_FLAGS'] == flags and launched[0]['JAX_PLATFORMS'] == 'cpu'


def test_local_dry_run_picks_one_free_port_for_all(tools):
  environ, _ = tools
  environ['PATH'] = environ['PATH'].split(os.pathsep, 1)[1]  # the real python
  result = _launch('local.sh', environ, DRY_RUN='1', NUM_PROCESSES='2',
                   DEVICES_PER_PROCESS='1', PYTHON=sys.executable)
  addresses = {word for line in result.stdout.splitlines() for word in shlex.split(line)
               if word.startswith('--coordinator_address=127.0.0.1:')}
  assert len(addresses) == 1 and int(addresses.pop().rsplit(':', 1)[1]) > 0


def test_slurm_dry_run_prints_srun_and_each_task_command(tools):
  environ, calls = tools
  result = _launch('slurm.sbatch', environ, *ARGS[2:], DRY_RUN='1',
                   CONFIG='configs/big.py', WORKDIR='/shared/runs/my run')
  srun_line, task_line = _commands(result.stdout)
  assert not calls.exists()  # and it needed no SLURM_NTASKS
  task = ['python', '-m', 'jaxnmt.main', '--config=configs/big.py',
          '--workdir=/shared/runs/my run', *ARGS[2:]]
  assert shlex.split(srun_line) == ['srun', *task] and shlex.split(task_line) == task
  assert _shell(srun_line, environ) == _shell(task_line, environ)
  assert _shell(task_line, environ)[0]['argv'] == task[1:]


def test_slurm_without_sbatch_says_so(tools):
  environ, _ = tools
  result = subprocess.run(['bash', 'launch/slurm.sbatch'], cwd=ROOT, env={
      **environ, 'CONFIG': 'c', 'WORKDIR': 'w'}, capture_output=True, text=True)
  assert result.returncode == 1 and 'run this with sbatch' in result.stderr


def test_tpu_pod_dry_run_prints_gcloud_and_each_worker_command(tools, tmp_path):
  environ, calls = tools
  repo = tmp_path / 'my repo'  # a worker's checkout: its .venv puts the stand-in first
  (repo / '.venv' / 'bin').mkdir(parents=True)
  (repo / '.venv' / 'bin' / 'activate').write_text('true\n', encoding='utf-8')
  env = dict(TPU_NAME='my-pod', ZONE='us-central2-b', CONFIG='configs/big.py',
             WORKDIR="/mnt/it's shared", REPO_DIR=str(repo))
  result = _launch('tpu_pod.sh', environ, *ARGS[2:], DRY_RUN='1', **env)
  gcloud_line, worker_line = _commands(result.stdout)
  assert not calls.exists()  # the dry run needs no gcloud
  words = shlex.split(gcloud_line)
  assert words == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod',
                   '--zone=us-central2-b', '--worker=all', f'--command={worker_line}']
  assert shlex.split(worker_line) == [
      'cd', str(repo), '&&', '.', '.venv/bin/activate', '&&', 'python', '-m',
      'jaxnmt.main', '--config=configs/big.py', "--workdir=/mnt/it's shared", *ARGS[2:]]
  # gcloud hands --command to each worker's shell: run it there, and the line itself.
  reports = _shell(gcloud_line, environ, cwd=str(tmp_path))
  assert reports == _shell(worker_line, environ, cwd=str(tmp_path))
  assert reports[0]['argv'] == ['-m', 'jaxnmt.main', '--config=configs/big.py',
                                "--workdir=/mnt/it's shared", *ARGS[2:]]
  # The default checkout, ~/jaxnmt, is left for the worker's shell to expand.
  env.pop('REPO_DIR')
  worker_line = _commands(_launch('tpu_pod.sh', environ, DRY_RUN='1', **env).stdout)[1]
  assert worker_line.startswith('cd ~/jaxnmt && ')


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
from jaxnmt.runtime import host
import jax._src.clusters  # timed apart: importing JAX takes seconds on a busy machine
reports, clean = {}, dict(os.environ)
for name, environ in json.loads(sys.argv[1]).items():
  os.environ.clear()
  os.environ.update({**clean, **environ})
  start = time.perf_counter()
  cluster = host.describe_cluster()
  detected = host.detected_cluster()
  reports[name] = {'cluster': cluster and dataclasses.asdict(cluster),
                   'detected': detected, 'seconds': time.perf_counter() - start}
from jax._src import xla_bridge
print(json.dumps({'reports': reports, 'backends': len(xla_bridge._backends)}))
'''


@pytest.fixture(scope='module', name='detected')
def _detected() -> dict:
  """Each of SCENARIOS' reports; 'backends': how many JAX started (none, we hope)."""
  environ = {name: value for name, value in os.environ.items()
             if not name.startswith(_CLUSTER_PREFIXES)}
  result = subprocess.run([sys.executable, '-c', _DESCRIBE, json.dumps(SCENARIOS)],
                          cwd=ROOT, timeout=120, env=environ, capture_output=True,
                          text=True)
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
  environ = {name: value for name, value in os.environ.items()
             if not name.startswith(_CLUSTER_PREFIXES)}
  return subprocess.run([sys.executable, '-m', 'jaxnmt.main', *flags], cwd=ROOT,
                        env={**environ, **env}, stdin=subprocess.DEVNULL,
                        capture_output=True, text=True, timeout=120)


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
