"""Parameter + optimizer bytes per device for a config on a mesh, as planned from the
shardings and as actually allocated.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharded_state.py \
      --config=configs/big.py --config.mesh.data=1 --config.mesh.fsdp=2 --config.mesh.tensor=4
"""

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from jaxnmt import config_lib
from jaxnmt.training import optim
from jaxnmt.runtime import host
from jaxnmt.runtime import sharding
from jaxnmt.model import initialize
from jaxnmt.training import train_state

config_flags.DEFINE_config_file('config', 'configs/big.py', 'Run config.')


def main(_):
  host.prepare('auto', 'auto', multi_process=False)  # as jaxnmt.main does
  config = flags.FLAGS.config
  config_lib.check_mesh(config, jax.device_count(), jax.process_count())
  mesh, rules = sharding.plan_mesh(config)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  abstract = train_state.abstract_train_state(model_cfg, tx)
  planned_total, planned_per_device = sharding.planned_bytes(
      abstract, sharding.state_shardings(abstract, mesh, rules))
  _, state, _, _ = train_state.create_train_state(model_cfg, tx, 0, mesh, rules)
  allocated = sharding.bytes_per_device(state)
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  print(f'mesh {dict(mesh.shape)}; {initialize.count_params(state["params"]):,} parameters')
  print(f'unsharded parameters + optimizer state: {total / 2**20:.1f} MiB')
  print(f'planned per device: {planned_per_device / 2**20:.1f} MiB '
        f'({planned_per_device / planned_total:.4f} of the total)')
  print(f'allocated per device: min {min(allocated.values()) / 2**20:.1f} MiB, '
        f'max {max(allocated.values()) / 2**20:.1f} MiB over {len(allocated)} devices')


if __name__ == '__main__':
  app.run(main)
