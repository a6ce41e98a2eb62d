"""Cost of asynchronous checkpointing: median train-step time with no saves vs a save
after every step, measured in one process on the same compiled step.

  python benchmarks/checkpoint_cost.py --config=configs/base.py --steps=10
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
from jaxnmt.runtime import sharding
from jaxnmt.training import steps
from jaxnmt.training import train_state

config_flags.DEFINE_config_file('config', 'configs/base.py', 'Run config.')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant.')
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
  config = FLAGS.config
  config_lib.check_mesh(config, jax.device_count(), jax.process_count())
  mesh, rules = sharding.plan_mesh(config)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  graphdef, state, rest, shardings = train_state.create_train_state(model_cfg, tx, 0, mesh, rules)
  step_fn, _ = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
  batch = sharding.to_global(synthetic_batch(config, np.random.default_rng(0)),
                             sharding.batch_sharding(mesh, rules))
  state, metrics = step_fn(state, rest, batch)  # compile
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as workdir:
    checkpointer = checkpointing.Checkpointer(workdir, max_to_keep=2)
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


if __name__ == '__main__':
  app.run(main)
