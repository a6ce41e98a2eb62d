"""Cost of asynchronous checkpointing: median train-step time with no saves vs a save
after every step, measured in one process on the same compiled step; then the cost of
restoring: Orbax's restore of the newest step alone against `restore_latest` (the
checksums of its files verified first), alternated, median of --restores each.

  python benchmarks/checkpoint_cost.py --config=configs/base.py --steps=10
  python benchmarks/checkpoint_cost.py --config=configs/base.py --steps=0   # restore only
"""

import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from jaxnmt.runtime import checkpointing
from jaxnmt import config_lib
from jaxnmt.training import optim
from jaxnmt.runtime import host
from jaxnmt.runtime import sharding
from jaxnmt.training import steps
from jaxnmt.training import train_state

config_flags.DEFINE_config_file('config', 'configs/base.py', 'Run config.')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant (0: save once, time restores).')
flags.DEFINE_integer('restores', 5, 'Timed restores per variant.')
FLAGS = flags.FLAGS


def synthetic_batch(config, rng):
  rows, source, target = (config.data.batch_size, config.data.max_source_length,
                          config.data.max_target_length)
  vocab = config.tokenizer.vocab_size
  batch = {}
  for side, length in (('inputs', source), ('targets', target)):
    batch[side] = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    batch[f'{side}_segment_ids'] = np.ones((rows, length), np.int32)
    batch[f'{side}_positions'] = np.broadcast_to(np.arange(length, dtype=np.int32),
                                                 (rows, length)).copy()
  batch['decoder_inputs'] = batch['targets']
  return batch


def main(_):
  host.prepare('auto', 'auto', multi_process=False)  # as jaxnmt.main does
  config = FLAGS.config
  config_lib.check_mesh(config, jax.device_count(), jax.process_count())
  mesh, rules = sharding.plan_mesh(config)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  graphdef, state, rest, shardings = train_state.create_train_state(model_cfg, tx, 0, mesh, rules)
  with tempfile.TemporaryDirectory() as workdir:
    checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=2)
    if FLAGS.steps:
      state = time_steps(config, graphdef, tx, mesh, rules, shardings, state, rest,
                         checkpointer)
    else:
      checkpointer.save(1, state)
      checkpointer.close()
    time_restores(workdir, state)


def time_steps(config, graphdef, tx, mesh, rules, shardings, state, rest, checkpointer):
  step_fn, _ = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
  batch = sharding.to_global(synthetic_batch(config, np.random.default_rng(0)),
                             sharding.batch_sharding(mesh, rules))
  state, metrics = step_fn(state, rest, batch)  # compile
  jax.block_until_ready(metrics)
  times = {'no saving': [], 'save every step': []}
  for variant in times:
    for step in range(FLAGS.steps):
      started = time.perf_counter()
      state, metrics = step_fn(state, rest, batch)
      if variant == 'save every step':
        checkpointer.save(int(1 + len(times['save every step'])), state)
      jax.block_until_ready(metrics)
      times[variant].append(time.perf_counter() - started)
  started = time.perf_counter()
  checkpointer.close()
  drain = time.perf_counter() - started
  medians = {variant: statistics.median(values) for variant, values in times.items()}
  for variant, median in medians.items():
    print(f'{variant}: median step {median:.3f} s over {FLAGS.steps} steps')
  print(f'ratio save-every-step / no-saving: '
        f'{medians["save every step"] / medians["no saving"]:.3f}; '
        f'final wait for pending writes {drain:.2f} s; '
        f'state {sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20:.0f} MiB')
  return state


def time_restores(workdir, state) -> None:
  """Orbax's restore alone vs checksums verified, then restored (restore_latest);
  alternated, so both read from the same page cache."""
  abstract = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding),
      state)
  reader = checkpointing.Checkpointer(workdir, read_only=True)
  step = reader.latest_step()
  times = {'restore': [], 'verify + restore': [], 'verify': []}
  jax.block_until_ready(reader.restore(step, abstract)[0])  # warm: page cache, compiles
  for _ in range(FLAGS.restores):
    started = time.perf_counter()
    jax.block_until_ready(reader.restore(step, abstract)[0])
    times['restore'].append(time.perf_counter() - started)
    started = time.perf_counter()
    assert reader._corrupt_files(step) is None  # pylint: disable=protected-access
    times['verify'].append(time.perf_counter() - started)
    started = time.perf_counter()
    found, restored, _, _ = reader.restore_latest(abstract)
    jax.block_until_ready(restored)
    assert found == step
    times['verify + restore'].append(time.perf_counter() - started)
  medians = {variant: statistics.median(values) for variant, values in times.items()}
  print(f'restore of step {step}: ' + ', '.join(
      f'{variant} median {median:.3f} s' for variant, median in medians.items()) +
      f' over {FLAGS.restores}; ratio {medians["verify + restore"] / medians["restore"]:.3f}'
      f' ({sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20:.0f} MiB)')


if __name__ == '__main__':
  app.run(main)
