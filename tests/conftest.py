"""Shared fixtures: a small corpus cut from the real one, a tiny config, and a model
trained once per test session."""

import os
import random
import tempfile
import zipfile

# Eight CPU devices for every test (set before JAX is imported), so the trainer's
# sharded path runs on a real mesh: the default mesh is 8-way data parallel.
# The CPU library fusions `python -m jaxnmt.main` uses are on here too.
from jaxnmt.runtime import host  # pylint: disable=wrong-import-position

os.environ['XLA_FLAGS'] = host.cpu_xla_flags(
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One compilation cache for the session, shared with the processes the tests start
# (JAX reads these variables): a program several tests compile is compiled once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jaxnmt_test_xla_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests.tiny_config import tiny_config  # pylint: disable=wrong-import-position

SHARED_DATA = os.environ.get(
    'JAXNMT_DATA_DIR',
    os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))


def real_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
  """`count` random lines of the real spa-eng corpus, as (english, spanish)."""
  with zipfile.ZipFile(os.path.join(SHARED_DATA, 'spa-eng.zip')) as archive:
    lines = archive.read('spa-eng/spa.txt').decode('utf-8').splitlines()
  picked = random.Random(seed).sample(lines, count)
  return [tuple(line.split('\t')[:2]) for line in picked]


@pytest.fixture(scope='session')
def small_corpus(tmp_path_factory) -> str:
  """A 3,000-pair TSV of real sentence pairs."""
  path = tmp_path_factory.mktemp('corpus') / 'pairs.tsv'
  path.write_text(''.join(f'{en}\t{es}\n' for en, es in real_pairs(3000)), encoding='utf-8')
  return str(path)


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory, small_corpus) -> str:
  """A workdir holding a tiny model trained for 20 steps."""
  from jaxnmt.training import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('trained'))
  loop.train_and_evaluate(tiny_config(small_corpus), workdir)
  return workdir


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
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  log = tmp_path_factory.mktemp('gcs') / 'emulator.log'
  with open(log, 'w', encoding='utf-8') as output:
    emulator = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-m', 'tests.gcs_emulator', f'--port={port}', '--bucket=bucket'],
        cwd=os.path.join(os.path.dirname(__file__), '..'), stdout=output,
        stderr=subprocess.STDOUT)
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
