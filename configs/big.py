"""Transformer-big (Vaswani et al. 2017) for English→Spanish; meant for accelerators.

  python -m jaxnmt.main --config=configs/big.py                       # workdir runs/big
  CONFIG=configs/big.py WORKDIR=/shared/runs/big sbatch --nodes=2 launch/slurm.sbatch
  TPU_NAME=pod ZONE=us-central2-b CONFIG=configs/big.py WORKDIR=/mnt/shared/big \
      launch/tpu_pod.sh

Measured figures (sharded state bytes): BUILD_NOTES.md, "Configs".
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.d_model = 1024
  config.model.num_heads = 16
  config.model.d_ff = 4096
  config.model.dropout_rate = 0.3
  config.optim.learning_rate = 5e-4
  return config
