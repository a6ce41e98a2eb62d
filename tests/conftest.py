"""Shared fixtures: a small corpus cut from the real one, models trained once per test
session (each pytest-xdist worker has its own session), and a local GCS emulator.
Helpers that are not fixtures live in tests/helpers.py."""

import fcntl
import functools
import importlib
import os
import shutil
import tempfile

# Eight CPU devices for every test (set before JAX is imported), so the trainer's
# sharded path runs on a real mesh: the default mesh is 8-way data parallel.
# The CPU library fusions `python -m jaxnmt.main` uses are on here too.
from jaxnmt.runtime import host  # pylint: disable=wrong-import-position

os.environ['XLA_FLAGS'] = host.cpu_xla_flags(
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu, where installed without TPU chips, compiles for TPUs only: let every test
# process load it at once (as `host.prepare` does for `python -m jaxnmt.main`).
if host.tpu_compiler_only():
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# One compilation cache for the session, shared with the processes the tests start
# (JAX reads these variables): a program several tests compile is compiled once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jaxnmt_test_xla_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# real_pairs stays importable from here: benchmarks/ import it.
from tests.helpers import ema_config, real_pairs  # pylint: disable=wrong-import-position
from tests.tiny_config import tiny_config  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def libtpu() -> str:
  """The TPU compiler (libtpu, from the `tpu-compile` extra, which `test` includes): the
  path of its library. Request it in every test that compiles for TPU slices
  (`jax.experimental.topologies.get_topology_desc(platform='tpu', ...)`):

      def test_base_on_v5e_8(libtpu): ...
      pytestmark = pytest.mark.usefixtures('libtpu')  # or for a whole module

  Without libtpu such a test is skipped, except under CI=true (.ci/run), where it
  fails: CI installs the extra, and TPU tests that skip there would prove nothing."""
  try:
    return importlib.import_module('libtpu').get_library_path()
  except ImportError as error:
    message = f"libtpu is not importable ({error}): pip install -e '.[tpu-compile]'"
  if os.environ.get('CI', '').lower() in ('true', '1'):
    pytest.fail(f'{message}; CI=true, so the TPU-compile tests fail rather than skip',
                pytrace=False)
  pytest.skip(message)


def built_once(tmp_path_factory, name: str, build) -> str:
  """A folder that `build(path)` fills once per test run: the pytest-xdist workers of a
  run share it (the first to ask builds it, the others wait for it, rather than each
  building its own). Tests must only read it."""
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    path = str(tmp_path_factory.mktemp(name))
    build(path)
    return path
  shared = tmp_path_factory.getbasetemp().parent  # this run's, common to its workers
  path, done = shared / name, shared / f'{name}.done'
  with open(shared / f'{name}.lock', 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)  # what a failed build left
      path.mkdir()
      build(str(path))
      done.touch()
  return str(path)


@pytest.fixture(scope='session')
def build_once(tmp_path_factory):
  """`built_once` for tests: build_once(name, build) -> the folder `build` filled once
  in this test run."""
  return functools.partial(built_once, tmp_path_factory)


@pytest.fixture(scope='session')
def small_corpus(tmp_path_factory) -> str:
  """A 3,000-pair TSV of real sentence pairs (one path for every worker, as the shared
  workdirs below record it)."""
  def write(folder):
    with open(os.path.join(folder, 'pairs.tsv'), 'w', encoding='utf-8') as handle:
      handle.writelines(f'{en}\t{es}\n' for en, es in real_pairs(3000))
  return os.path.join(built_once(tmp_path_factory, 'corpus', write), 'pairs.tsv')


def _train(config, workdir: str) -> None:
  from jaxnmt.training import loop  # pylint: disable=g-import-not-at-top
  loop.train_and_evaluate(config, workdir)


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, small_corpus) -> str:
  """A workdir holding a tiny model trained for 20 steps (checkpoints 10 and 20).
  Read it only: a test that changes a workdir takes `workdir_copy`."""
  return built_once(tmp_path_factory, 'trained',
                    lambda path: _train(tiny_config(small_corpus), path))


@pytest.fixture
def workdir_copy(trained_workdir, tmp_path) -> str:
  """A copy of `trained_workdir` of the test's own."""
  path = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, path)
  return path


@pytest.fixture(scope='session')
def ema_run(small_corpus, tmp_path_factory) -> str:
  """20 steps of `ema_config` (checkpoints 5, 10, 15, 20). Read it only: a test that
  changes it takes `ema_copy`."""
  return built_once(tmp_path_factory, 'ema', lambda path: _train(ema_config(small_corpus),
                                                                   path))


@pytest.fixture(scope='session')
def loaded(trained_workdir):
  """`trained_workdir`'s model loaded for inference on every local device."""
  # pylint: disable=g-import-not-at-top
  import jax
  from jaxnmt.decoding import inference
  return inference.load(trained_workdir, devices=jax.local_devices())


@pytest.fixture(scope='session')
def pairs_tokenizer(tmp_path_factory):
  """A 600-piece SentencePiece model of 400 real pairs."""
  from jaxnmt.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  tokenizer_lib.train([side for pair in real_pairs(400) for side in pair], path,
                      vocab_size=600)
  return tokenizer_lib.load(path, 'unigram')


@pytest.fixture(scope='session')
def gcs_bucket(tmp_path_factory):
  """gs://bucket on a local GCS emulator (tests/gcs_emulator.py) run as a subprocess
  on a free port, with this process's environment pointed at it; stopped at the end.
  Skips where the `gcs` extra is not installed."""
  # pylint: disable=g-import-not-at-top
  pytest.importorskip('gcsfs')
  pytest.importorskip('gcp_storage_emulator')
  import socket
  import subprocess
  import sys
  import time
  from tests import gcs_emulator
  from tests.helpers import ROOT
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  log = tmp_path_factory.mktemp('gcs') / 'emulator.log'
  with open(log, 'w', encoding='utf-8') as output:
    emulator = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-m', 'tests.gcs_emulator', f'--port={port}', '--bucket=bucket'],
        cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
      except OSError:
        if emulator.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f'the GCS emulator did not start: {log.read_text()}') from None
        time.sleep(0.1)
    saved = {name: os.environ.get(name) for name in gcs_emulator.environment(port)}
    os.environ.update(gcs_emulator.environment(port))
    try:
      yield 'gs://bucket'
    finally:
      for name, value in saved.items():
        if value is None:
          os.environ.pop(name, None)
        else:
          os.environ[name] = value
  finally:
    emulator.terminate()
    emulator.wait(timeout=30)


@pytest.fixture
def ema_copy(ema_run, tmp_path) -> str:
  """A copy of `ema_run` of the test's own."""
  path = str(tmp_path / 'ema_run')
  shutil.copytree(ema_run, path)
  return path


@pytest.fixture
def gcs_dir(gcs_bucket, request) -> str:
  """A fresh prefix of the emulator's bucket for one test."""
  import uuid  # pylint: disable=g-import-not-at-top
  return f'{gcs_bucket}/{request.node.name.split("[")[0]}-{uuid.uuid4().hex[:8]}'
