"""Parameters by name, and a workdir born from given weights.

A model's parameters are an NNX state; converters read and write them as one flat dict
{'decoder_layers.0.cross_attention.query': array, ...} (the names of the state's paths),
which `to_state` turns back into the state for a `ModelConfig`, checking every name
and shape. `write_workdir` makes a jaxnmt workdir whose checkpoint 0 holds given
parameters (with a fresh optimizer state), so that translate, the eval worker, serve,
average, export and training all take it as any trained run's.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxnmt.errors import ConfigError
from jaxnmt.model import initialize
from jaxnmt.model import transformer
from jaxnmt.runtime import checkpointing
from jaxnmt.runtime import files
from jaxnmt.training import optim
from jaxnmt.training import train_state


def _name(path) -> str:
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.GetAttrKey):  # the Variable's `.value`
      continue
    parts.append(str(getattr(key, 'key', getattr(key, 'idx', key))))
  return '.'.join(parts)


def flat(params) -> dict[str, np.ndarray]:
  """{name: float32 host array} of a parameter state."""
  return {_name(path): np.array(jax.device_get(leaf), np.float32)  # writable copies
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def to_state(model_cfg: transformer.ModelConfig, arrays: dict[str, np.ndarray],
             source: str):
  """The parameter state of `model_cfg` holding `arrays` (names as `flat` gives them).
  A name missing or left over, or a shape that differs, is a ConfigError naming it
  and `source` (where the arrays came from)."""
  abstract = initialize.abstract_params(model_cfg)
  wanted = {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  extra = sorted(set(arrays) - set(wanted))
  if extra:
    raise ConfigError(f'{source}: {len(extra)} tensors have no place in the model, e.g. '
                      f'{extra[0]}')
  for name, leaf in wanted.items():
    if name not in arrays:
      raise ConfigError(f'{source}: no tensor for the model parameter {name}')
    if tuple(arrays[name].shape) != tuple(leaf.shape):
      raise ConfigError(f'{source}: {name} has shape {tuple(arrays[name].shape)}, the '
                        f'model needs {tuple(leaf.shape)}')
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(arrays[_name(path)], leaf.dtype), abstract)


def write_workdir(workdir: str, config, params) -> None:
  """Writes `config` and checkpoint 0 (`params`, a fresh optimizer state, and the
  moving average = `params` when config.ema_decay > 0) into `workdir`, whose tokenizer
  (files.tokenizer_path) must be in place: the checkpoint records its hash."""
  tokenizer = files.tokenizer_path(workdir)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  state = train_state.new_state(params, tx, ema=config.ema_decay > 0)
  files.save_config(workdir, config)
  metadata = {'config': config.to_dict(), 'process_count': jax.process_count(),
              'format': checkpointing.FORMAT, 'tokenizer_sha256': files.sha256(tokenizer),
              'data_manifest_sha256': None}
  checkpointer = checkpointing.Checkpointer(workdir)
  try:
    checkpointer.save(0, state, None, metadata)
    checkpointer.wait()
  finally:
    checkpointer.close()
