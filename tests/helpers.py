"""What the tests share (fixtures are in tests/conftest.py): paths and the real corpus,
the tiny configs, a model trained in this process, `python -m jaxnmt.main` run in a
subprocess, and what a run leaves in its workdir (complete checkpoints, the final train
state, the logged losses)."""

import functools
import glob
import os
import random
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnmt.data import inputs
from jaxnmt.data import pipeline
from jaxnmt.data import records as records_lib
from jaxnmt import config_lib
from jaxnmt.model import initialize
from jaxnmt.model import transformer
from jaxnmt.runtime import checkpointing
from jaxnmt.runtime import host
from jaxnmt.training import metrics
from jaxnmt.training import optim
from jaxnmt.training import steps
from jaxnmt.training import train_state
from tests.tiny_config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get('JAXNMT_DATA_DIR',
                             os.path.join(ROOT, '..', 'shared', 'data'))
SHAKESPEARE = os.path.join(SHARED_DATA, 'tinyshakespeare.txt')


def real_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
  """`count` random lines of the real spa-eng corpus, as (english, spanish)."""
  with zipfile.ZipFile(os.path.join(SHARED_DATA, 'spa-eng.zip')) as archive:
    lines = archive.read('spa-eng/spa.txt').decode('utf-8').splitlines()
  picked = random.Random(seed).sample(lines, count)
  return [tuple(line.split('\t')[:2]) for line in picked]


def real_stream(tokenizer, packing: bool = True):
  """A TrainStream of 400 real pairs (the `pairs_tokenizer` fixture's) in batches of
  8 rows at configs/base.py's row lengths (56 source, 64 target tokens)."""
  dtype = records_lib.record_dtype(tokenizer.vocab_size)
  pairs = real_pairs(400)
  records = [records_lib.encode_record(source, target, dtype) for source, target in zip(
      tokenizer.encode_batch([s for s, _ in pairs]),
      tokenizer.encode_batch([t for _, t in pairs]))]
  return pipeline.TrainStream([records_lib.InMemorySource(records)], dtype, batch_size=8,
                              max_source_length=56, max_target_length=64, seed=0,
                              packing=packing)


def ema_config(corpus: str, **overrides):
  """The tiny config with a moving average (decay 0.9) and a checkpoint every 5 steps
  (10 kept): the `ema_run` fixture's; `overrides` set top-level fields."""
  config = tiny_config(corpus)
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 10
  config.ema_decay = 0.9
  for field, value in overrides.items():
    config[field] = value
  return config


# ----------------------------------------------------------------------------- in process


def create_model(model_cfg, seed: int):
  """(graphdef, params, rest) of a new model on the default device, unsharded."""
  return nnx.split(transformer.build(model_cfg, rngs=initialize.rngs(seed)), nnx.Param, ...)


def train_step_fn(graphdef, tx, *, label_smoothing=0.0, accumulate=1, loss_chunks=0):
  """The project's train step, jitted, on unsharded state: (state, rest, batch) ->
  (state, sums)."""
  return jax.jit(functools.partial(steps.train_step, graphdef, tx, label_smoothing, 0,
                                   accumulate, loss_chunks=loss_chunks))


def new_state(params, tx) -> dict:
  return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}


def first_batches(config, workdir: str, count: int) -> list[dict]:
  """The first `count` training batches of `config`'s corpus, prepared in `workdir`."""
  iterator = iter(inputs.training_inputs(config, workdir).train_data)
  batches = [next(iterator) for _ in range(count)]
  iterator.close()
  return batches


# ----------------------------------------------------------------------------- subprocesses

# Variables through which JAX (or a launcher) would see a cluster around the process.
CLUSTER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'PMIX_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_',
                    'JAX_COORDINATOR_')


def without_cluster(environ: dict) -> dict:
  """`environ` less every variable through which JAX would detect a cluster."""
  return {name: value for name, value in environ.items()
          if not name.startswith(CLUSTER_PREFIXES)}


def environment(corpus: str = '', processes: int = 1, devices: int = 8, **extra) -> dict:
  """The environment of a `python -m jaxnmt.main` run on the CPU: `--config=
  tests/tiny_config.py` reads `corpus`; one process sees `devices` devices, several
  (launch/local.sh) get `devices` each."""
  env = dict(os.environ, JAXNMT_TEST_CORPUS=corpus, JAX_PLATFORMS='cpu',
             PYTHON=sys.executable)
  env.pop('XLA_FLAGS', None)
  if processes == 1:
    env['XLA_FLAGS'] = host.cpu_xla_flags(f'--xla_force_host_platform_device_count={devices}')
  else:
    env.update(NUM_PROCESSES=str(processes), DEVICES_PER_PROCESS=str(devices))
  env.update(extra)
  return env


def main_command(*flags, processes: int = 1) -> list[str]:
  if processes == 1:
    return [sys.executable, '-m', 'jaxnmt.main', *flags]
  return ['launch/local.sh', *flags]


def run_main(*flags, corpus: str = '', processes: int = 1, devices: int = 8, stdin=None,
             timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
  """`python -m jaxnmt.main *flags` (or launch/local.sh with several processes) from the
  repository root; its exit code, stdout and stderr. `stdin`: text, or None for none."""
  return subprocess.run(main_command(*flags, processes=processes), cwd=ROOT,
                        env=env or environment(corpus, processes, devices),
                        input=stdin if stdin is not None else '', capture_output=True,
                        text=True, timeout=timeout)


def start_main(*flags, corpus: str = '', processes: int = 1, devices: int = 8,
               **popen) -> subprocess.Popen:
  """`run_main` started, not waited for, in a session of its own (killable as a group)."""
  popen = {'stdout': subprocess.PIPE, 'stderr': subprocess.PIPE, 'text': True,
           'start_new_session': True, **popen}
  # pylint: disable-next=consider-using-with
  env = popen.pop('env', None) or environment(corpus, processes, devices)
  return subprocess.Popen(main_command(*flags, processes=processes), cwd=ROOT, env=env,
                          **popen)


def last_error(stderr: str) -> str:
  """The last line of a failed run: jaxnmt's one-line `error: ...`."""
  lines = stderr.strip().splitlines()
  return lines[-1] if lines else ''


# ----------------------------------------------------------------------------- workdirs


def committed_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints in `workdir`, ascending."""
  folders = (os.path.basename(os.path.dirname(path)) for path in glob.glob(
      os.path.join(str(workdir), 'checkpoints', '*', 'commit_success.txt')))
  return sorted(int(folder) for folder in folders if folder.isdigit())


def final_state(workdir, step: int, config=None) -> list:
  """The leaves of checkpoint `step`'s train state (parameters, optimizer state, step)
  on one device; `config` (default: the tiny test config) gives the model."""
  config = config or tiny_config('')
  tx, _ = optim.make_optimizer(config.optim, step)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=device),
                          train_state.abstract_train_state(model_cfg, tx))
  checkpointer = checkpointing.Checkpointer(str(workdir), read_only=True)
  try:
    state, _, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return jax.tree.leaves(jax.device_get(state))


def logged(workdir, name: str = 'train') -> list[dict]:
  """The records of WORKDIR/<name>/metrics.jsonl (a cut last line skipped)."""
  return metrics.read_jsonl(os.path.join(str(workdir), name, 'metrics.jsonl'))


def losses_by_step(workdir) -> dict[int, float]:
  """{step: training loss} as logged; a step logged twice keeps its last record."""
  return {record['step']: record['loss'] for record in logged(workdir)}

