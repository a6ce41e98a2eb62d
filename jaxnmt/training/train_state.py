"""The train state and where its arrays live.

A train state is `{'params', 'opt_state', 'step'}`, plus `'ema'` (an exponential moving
average of the parameters, sharded like them) when config.ema_decay > 0; the model's non-parameter
variables (dropout RNG streams) travel beside it as `rest`. Everything starts from an
*abstract* state (shapes and dtypes, nothing allocated): its shardings come from the
parameters' logical axes, initialisation runs under `jax.jit` straight into them, and a
checkpoint restores onto them (model/initialize.py has the model's side).
"""

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnmt.model import initialize
from jaxnmt.model import transformer
from jaxnmt.runtime import sharding


def new_state(params, tx, ema: bool) -> dict:
  """The state at step 0 of given parameters: a fresh optimizer state, and with `ema`
  the moving average starting at the parameters."""
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
  if ema:
    state['ema'] = jax.tree.map(jnp.copy, params)
  return state


def abstract_train_state(model_cfg: transformer.ModelConfig, tx, ema: bool = False) -> dict:
  """Shapes of the train state, e.g. as the target of a checkpoint restore."""
  return jax.eval_shape(lambda params: new_state(params, tx, ema),
                        initialize.abstract_params(model_cfg))


def create_train_state(model_cfg: transformer.ModelConfig, tx, seed: int, mesh, rules,
                       ema: bool = False):
  """Initialises the model and optimizer (and with `ema` the parameter average)
  directly into their shardings (no host ever holds the whole model). Returns
  (graphdef, state, rest, state_shardings)."""
  abstract = abstract_train_state(model_cfg, tx, ema)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  graphdef, _, _ = initialize.abstract_model(model_cfg, seed)

  @functools.partial(jax.jit, out_shardings=(shardings, sharding.replicated(mesh)))
  def init():
    model = transformer.build(model_cfg, rngs=initialize.rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return new_state(params, tx, ema), rest

  total, per_device = sharding.planned_bytes(abstract, shardings)
  logging.info('Parameters + optimizer state: %.1f MB in all, %.1f MB per device',
               total / 2**20, per_device / 2**20)
  state, rest = init()
  return graphdef, state, rest, shardings


