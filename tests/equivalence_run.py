"""Driver for the parallelism equivalence tests: trains a small Transformer for a few
steps on fixed global batches with the trainer's own state creation, sharding and
compiled step, then writes the per-step losses and the final parameters (process 0).

  python -m tests.equivalence_run --mesh=2,2,2 --out=/tmp/run.npz
  NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 JAXNMT_MAIN=tests.equivalence_run \
      launch/local.sh --mesh=2,2,2 --out=/tmp/run.npz
"""

import jax
import numpy as np
from absl import app
from absl import flags
from jax.experimental import multihost_utils

from configs import tiny
from jaxnmt import config_lib
from jaxnmt.runtime import distributed
from jaxnmt.training import optim
from jaxnmt.runtime import sharding
from jaxnmt.training import steps
from jaxnmt.training import train_state

flags.DEFINE_string('mesh', '1,1,1', 'data,fsdp,tensor sizes.')
flags.DEFINE_integer('steps', 12, 'Train steps.')
flags.DEFINE_string('out', None, 'Where process 0 writes losses and parameters (.npz).')
flags.DEFINE_string('coordinator_address', None, '')
flags.DEFINE_integer('num_processes', None, '')
flags.DEFINE_integer('process_id', None, '')
FLAGS = flags.FLAGS

ROWS, LENGTH, VOCAB = 8, 16, 512


def small_config():
  config = tiny.get_config()
  config.data.batch_size = ROWS
  config.data.eval_batch_size = ROWS
  config.data.max_source_length = LENGTH
  config.data.max_target_length = LENGTH
  config.tokenizer.vocab_size = VOCAB
  config.model.num_encoder_layers = 2
  config.model.num_decoder_layers = 2
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.d_ff = 128
  config.optim.warmup_steps = 4
  config.dropout_rng = 'threefry2x32'  # the same masks on every mesh ('auto' is not)
  return config


def global_batch(step: int) -> dict[str, np.ndarray]:
  """A packed-style global batch that every process can rebuild: two pairs per row."""
  rng = np.random.default_rng(step)
  batch = {}
  for side in ('inputs', 'targets'):
    split = rng.integers(3, LENGTH - 4, ROWS)
    end = rng.integers(LENGTH - 3, LENGTH + 1, ROWS)
    index = np.arange(LENGTH)
    segments = np.where(index < split[:, None], 1, np.where(index < end[:, None], 2, 0))
    positions = np.where(segments == 1, index, index - split[:, None]) * (segments > 0)
    batch[f'{side}_segment_ids'] = segments.astype(np.int32)
    batch[f'{side}_positions'] = positions.astype(np.int32)
    batch[side] = (rng.integers(4, VOCAB, (ROWS, LENGTH)) * (segments > 0)).astype(np.int32)
  batch['decoder_inputs'] = np.where(batch['targets_positions'] == 0, 2,
                                     np.roll(batch['targets'], 1, axis=1)) * (
                                         batch['targets_segment_ids'] > 0)
  return {key: value.astype(np.int32) for key, value in batch.items()}


def main(_):
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         timeout_s=60)
  config = small_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = map(int, FLAGS.mesh.split(','))
  mesh, rules = sharding.plan_mesh(config)
  tx, _ = optim.make_optimizer(config.optim, FLAGS.steps)
  model_cfg = config_lib.model_config(config, VOCAB)
  graphdef, state, rest, shardings = train_state.create_train_state(model_cfg, tx, config.seed,
                                                              mesh, rules)
  step_fn, _ = steps.compile_steps(graphdef, tx, config, mesh, rules, shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  rows = ROWS // jax.process_count()
  begin = jax.process_index() * rows
  losses = []
  for step in range(FLAGS.steps):
    local = {k: v[begin:begin + rows] for k, v in global_batch(step).items()}
    state, sums = step_fn(state, rest, sharding.to_global(local, batch_sharding))
    sums = jax.device_get(sums)
    losses.append(float(sums['loss'] / sums['tokens']))
  params = multihost_utils.process_allgather(state['params'], tiled=True)
  flat = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  if jax.process_index() == 0 and FLAGS.out:
    np.savez(FLAGS.out, losses=np.asarray(losses), **flat)
  print('losses', ' '.join(f'{loss:.6f}' for loss in losses))


if __name__ == '__main__':
  app.run(main)
