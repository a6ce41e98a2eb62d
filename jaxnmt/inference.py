"""The one way to load a trained model: `load(workdir, step=None, devices=None)`.

Translate, the eval worker, generate and bench all start here, never from the
trainer. Only the parameters are restored (no optimizer state is read or allocated),
replicated over `devices` (default: this process's first device), whatever mesh wrote
them. The checkpoint must have been trained with the workdir's tokenizer.
"""

import dataclasses
import logging

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt import checkpoint as checkpoint_lib
from jaxnmt import config_lib
from jaxnmt import model as model_lib
from jaxnmt import train_state
from jaxnmt import workdir as workdir_lib
from jaxnmt.errors import CheckpointError


@dataclasses.dataclass
class LoadedModel:
  config: object  # the run's ml_collections.ConfigDict
  tokenizer: object
  model_config: model_lib.ModelConfig
  mesh: jax.sharding.Mesh  # 1-D, axis 'data': sentences are split over it
  graphdef: object
  rest: object  # the model's non-parameter variables
  params: object
  step: int | None  # None: parameters not from a checkpoint
  abstract_params: object = None  # shapes with their shardings, to restore onto
  tokenizer_sha256: str | None = None

  def reload(self, workdir: str, step: int | None = None) -> None:
    """Swaps in the parameters of another checkpoint of the same run."""
    self.step, self.params = _restore(workdir, step, self.abstract_params,
                                      self.tokenizer, self.tokenizer_sha256)


def load(workdir: str, step: int | None = None, devices=None) -> LoadedModel:
  """The model of checkpoint `step` of `workdir` (default: the latest)."""
  config = workdir_lib.load_config(workdir)
  tokenizer = workdir_lib.load_tokenizer(workdir, config.tokenizer.model_type)
  model_cfg = config_lib.model_config(config, tokenizer.vocab_size)
  mesh = _mesh(devices)
  where = NamedSharding(mesh, PartitionSpec())
  graphdef, abstract_params, rest = train_state.inference_model(model_cfg, where)
  abstract_params = train_state.with_shardings(abstract_params, where)
  tokenizer_sha256 = workdir_lib.file_sha256(tokenizer.model_path)
  step, params = _restore(workdir, step, abstract_params, tokenizer, tokenizer_sha256)
  return LoadedModel(config, tokenizer, model_cfg, mesh, graphdef, rest, params, step,
                     abstract_params, tokenizer_sha256)


def from_params(config, tokenizer, model_cfg: model_lib.ModelConfig, params,
                devices=None) -> LoadedModel:
  """A model of parameters in memory (e.g. an untrained one being benchmarked)."""
  mesh = _mesh(devices)
  where = NamedSharding(mesh, PartitionSpec())
  graphdef, _, rest = train_state.inference_model(model_cfg, where)
  return LoadedModel(config, tokenizer, model_cfg, mesh, graphdef, rest,
                     jax.device_put(params, where), None)


def _mesh(devices) -> jax.sharding.Mesh:
  devices = jax.local_devices()[:1] if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ('data',))


def _restore(workdir: str, step: int | None, abstract_params, tokenizer,
             tokenizer_sha256: str):
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {checkpointer.directory}: train first')
    metadata = checkpointer.read_metadata(step)
    if metadata is None:
      raise CheckpointError(f'checkpoint {step} in {checkpointer.directory} is gone or holds '
                            f'no metadata')
    checkpoint_lib.check_compatible(metadata, checkpointer.directory,
                                    tokenizer.model_path, tokenizer_sha256)
    params = checkpointer.restore_params(step, abstract_params)
  finally:
    checkpointer.close()
  logging.info('Loaded the parameters of checkpoint %d from %s', step, workdir)
  return step, params
