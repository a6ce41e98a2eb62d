"""The train state and where its arrays live.

A train state is `{'params', 'opt_state', 'step'}`, plus `'ema'` (an exponential moving
average of the parameters, sharded like them) when config.ema_decay > 0; the model's non-parameter
variables (dropout RNG streams) travel beside it as `rest`. Everything starts from an
*abstract* state (shapes and dtypes, nothing allocated): its shardings come from the
parameters' logical axes, initialisation runs under `jax.jit` straight into them, and a
checkpoint restores onto them. For inference `inference_model` gives the parameters'
shapes alone, which `Checkpointer.restore_params` fills: no optimizer moments are ever
allocated to read a model.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnmt import model as model_lib
from jaxnmt import sharding


def _rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1)


def abstract_model(model_cfg: model_lib.ModelConfig, seed: int = 0):
  """(graphdef, abstract params, rest) of the model: shapes only, nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: model_lib.build(model_cfg, rngs=_rngs(seed))),
                   nnx.Param, ...)


def abstract_params(model_cfg: model_lib.ModelConfig):
  """Shapes of the parameters, as a checkpoint stores them."""
  return jax.eval_shape(
      lambda: nnx.state(model_lib.build(model_cfg, rngs=_rngs(0)), nnx.Param))


def _new_state(params, tx, ema: bool) -> dict:
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
  if ema:
    state['ema'] = jax.tree.map(jnp.copy, params)
  return state


def abstract_train_state(model_cfg: model_lib.ModelConfig, tx, ema: bool = False) -> dict:
  """Shapes of the train state, e.g. as the target of a checkpoint restore."""
  def build():
    return _new_state(nnx.state(model_lib.build(model_cfg, rngs=_rngs(0)), nnx.Param), tx,
                      ema)
  return jax.eval_shape(build)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs of `abstract_tree` (arrays or shapes) placed per `shardings` (a
  tree, or one sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=shardings), abstract_tree)
  return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                               sharding=where),
                      abstract_tree, shardings)


def create_train_state(model_cfg: model_lib.ModelConfig, tx, seed: int, mesh, rules,
                       ema: bool = False):
  """Initialises the model and optimizer (and with `ema` the parameter average)
  directly into their shardings (no host ever holds the whole model). Returns
  (graphdef, state, rest, state_shardings)."""
  abstract = abstract_train_state(model_cfg, tx, ema)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  graphdef, _, _ = abstract_model(model_cfg, seed)

  @functools.partial(jax.jit, out_shardings=(shardings, sharding.replicated(mesh)))
  def init():
    model = model_lib.build(model_cfg, rngs=_rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return _new_state(params, tx, ema), rest

  total, per_device = sharding.planned_bytes(abstract, shardings)
  logging.info('Parameters + optimizer state: %.1f MB in all, %.1f MB per device',
               total / 2**20, per_device / 2**20)
  state, rest = init()
  return graphdef, state, rest, shardings


def create_model(model_cfg: model_lib.ModelConfig, seed: int):
  """(graphdef, params, rest) initialised on the default device, unsharded (small
  models: tests, examples)."""
  return nnx.split(model_lib.build(model_cfg, rngs=_rngs(seed)), nnx.Param, ...)


def inference_model(model_cfg: model_lib.ModelConfig, where: jax.sharding.Sharding):
  """(graphdef, abstract params, rest) for inference: the parameters are never
  initialised (they come from a checkpoint); `rest`, the model's few bytes of RNG
  stream state, is built under jit (which drops the unused parameter initialisers)
  and placed per `where`."""
  graphdef, _, _ = abstract_model(model_cfg)

  def build_rest():
    return nnx.split(model_lib.build(model_cfg, rngs=_rngs(0)), nnx.Param, ...)[2]

  return graphdef, abstract_params(model_cfg), jax.jit(build_rest, out_shardings=where)()


def count_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
