"""The one way to load a trained model: `load(workdir, step=None, devices=None,
weights='auto')`.

Translate, the eval worker, generate and bench all start here, never from the
trainer. Only the parameters are restored (no optimizer state is read or allocated),
replicated over `devices` (default: this process's first device), whatever mesh wrote
them. The checkpoint must have been trained with the workdir's tokenizer.

Which weights (`weights`, the --weights flag): 'auto' (the default) takes a
checkpoint's moving average of the parameters when the run kept one
(config.ema_decay > 0), else its parameters; 'raw' always the parameters; 'ema' the
average (an error if there is none); any other name the averaged weights
`--mode=average` wrote under that name (no checkpoint step then).
"""

import dataclasses
import logging

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.decoding import averaging
from jaxnmt.runtime import checkpointing
from jaxnmt import config_lib
from jaxnmt.model import transformer
from jaxnmt.model import initialize
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.runtime import files
from jaxnmt.errors import CheckpointError


@dataclasses.dataclass
class LoadedModel:
  config: object  # the run's ml_collections.ConfigDict
  tokenizer: object
  model_config: transformer.ModelConfig
  mesh: jax.sharding.Mesh  # 1-D, axis 'data': sentences are split over it
  graphdef: object
  rest: object  # the model's non-parameter variables
  params: object
  step: int | None  # None: parameters not from a checkpoint
  abstract_params: object = None  # shapes with their shardings, to restore onto
  tokenizer_sha256: str | None = None
  weights: str = 'raw'  # what `params` are: 'raw', 'ema' or an averaged set's name

  def reload(self, workdir: str, step: int | None = None, weights: str = 'auto') -> None:
    """Swaps in the parameters of another checkpoint of the same run."""
    self.step, self.weights, self.params = _restore(
        workdir, step, weights, self.abstract_params, self.tokenizer, self.tokenizer_sha256)


def load(workdir: str, step: int | None = None, devices=None,
         weights: str = 'auto') -> LoadedModel:
  """The model of checkpoint `step` of `workdir` (default: the latest), or of the
  averaged weights named `weights`."""
  config = files.load_config(workdir)
  tokenizer = tokenizer_lib.from_workdir(workdir, config.tokenizer.model_type)
  model_cfg = config_lib.model_config(config, tokenizer.vocab_size)
  mesh = data_mesh(devices)
  where = NamedSharding(mesh, PartitionSpec())
  graphdef, abstract_params, rest = initialize.inference_model(model_cfg, where)
  abstract_params = initialize.with_shardings(abstract_params, where)
  tokenizer_sha256 = files.sha256(tokenizer.model_path)
  step, weights, params = _restore(workdir, step, weights, abstract_params, tokenizer,
                                   tokenizer_sha256)
  return LoadedModel(config, tokenizer, model_cfg, mesh, graphdef, rest, params, step,
                     abstract_params, tokenizer_sha256, weights)


def from_params(config, tokenizer, model_cfg: transformer.ModelConfig, params,
                devices=None) -> LoadedModel:
  """A model of parameters in memory (e.g. an untrained one being benchmarked)."""
  mesh = data_mesh(devices)
  where = NamedSharding(mesh, PartitionSpec())
  graphdef, _, rest = initialize.inference_model(model_cfg, where)
  return LoadedModel(config, tokenizer, model_cfg, mesh, graphdef, rest,
                     jax.device_put(params, where), None)


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """The 1-D 'data' mesh inference splits sentences over (default: this process's
  first device)."""
  devices = jax.local_devices()[:1] if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ('data',))


def _restore(workdir: str, step: int | None, weights: str, abstract_params, tokenizer,
             tokenizer_sha256: str) -> tuple[int | None, str, object]:
  """(step, which weights, parameters)."""
  if weights not in averaging.RESERVED:
    if step is not None:
      raise CheckpointError(f'--weights={weights} names averaged weights, which belong to '
                            f'no single checkpoint: drop --checkpoint_step')
    info, params = averaging.restore(workdir, weights, abstract_params,
                                     tokenizer.model_path, tokenizer_sha256)
    logging.info('Loaded the averaged weights %r (checkpoints %s) from %s', weights,
                 info['steps'], workdir)
    return info['steps'][-1], weights, params
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {checkpointer.directory}: train first')
    metadata = checkpointer.read_metadata(step)
    if metadata is None:
      raise CheckpointError(f'checkpoint {step} in {checkpointer.directory} is gone or holds '
                            f'no metadata')
    checkpointing.check_compatible(metadata, checkpointer.directory,
                                    tokenizer.model_path, tokenizer_sha256)
    has_ema = (metadata.get('config') or {}).get('ema_decay', 0.0) > 0
    if weights == 'ema' and not has_ema:
      raise CheckpointError(f'checkpoint {step} in {checkpointer.directory} holds no moving '
                            f'average (the run had config.ema_decay=0): use --weights=raw')
    which = 'ema' if weights == 'ema' or (weights == 'auto' and has_ema) else 'raw'
    params = checkpointer.restore_params(step, abstract_params,
                                         'ema' if which == 'ema' else 'params')
  finally:
    checkpointer.close()
  logging.info('Loaded the %s weights of checkpoint %d from %s', which, step, workdir)
  return step, which, params
