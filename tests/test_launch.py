"""The launchers (`launch/*`). Each launcher's dry run (DRY_RUN=1) must print exactly
the commands a real launch runs: the tests run those lines with stand-ins for python,
srun and gcloud that report the arguments they receive, so the quoting is checked end
to end. (The cluster detection the launched processes rely on: tests/runtime/test_clusters.py.)"""

import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.helpers import CLUSTER_PREFIXES, ROOT

# Arguments a launcher must pass through untouched: a space, a quote, an empty one.
ARGS = ['--config=configs/tiny.py', '--workdir=runs/my run', "--config.name=it's", '']
# Prints the arguments and environment a worker would start with, one JSON line.
_REPORT = ('import json, os, sys; print(json.dumps({"argv": sys.argv[1:], '
           '"XLA_FLAGS": os.environ.get("XLA_FLAGS"), '
           '"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS")}))')


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
             if not name.startswith(CLUSTER_PREFIXES + ('DRY_RUN', 'XLA_FLAGS'))}
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
