"""The model's parameters before any training: their shapes, where they live, and a
model to fill from a checkpoint.

Everything starts from an *abstract* model (shapes and dtypes, nothing allocated): the
train state (training/train_state.py) is initialised under `jax.jit` straight into the
shardings of its parameters' logical axes, and for inference `inference_model` gives the
parameters' shapes alone, which a checkpoint restore fills: no optimizer moments are
ever allocated to read a model.
"""

import functools

import jax
import numpy as np
from flax import nnx

from jaxnmt.model import transformer


def rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1)


@functools.lru_cache(maxsize=4)
def _abstract_module(model_cfg: transformer.ModelConfig, seed: int):
  """The model built from shapes alone; kept, as tracing the build of a deep model
  takes seconds (per layer), and every abstract view below starts from it."""
  return nnx.eval_shape(lambda: transformer.build(model_cfg, rngs=rngs(seed)))


def abstract_model(model_cfg: transformer.ModelConfig, seed: int = 0):
  """(graphdef, abstract params, rest) of the model: shapes only, nothing allocated."""
  return nnx.split(_abstract_module(model_cfg, seed), nnx.Param, ...)


def abstract_params(model_cfg: transformer.ModelConfig):
  """Shapes of the parameters, as a checkpoint stores them (a tree of its own: the
  kept module is never handed out)."""
  return jax.tree.map(lambda leaf: leaf, nnx.state(_abstract_module(model_cfg, 0), nnx.Param))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs of `abstract_tree` (arrays or shapes) placed per `shardings` (a
  tree, or one sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=shardings), abstract_tree)
  return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                               sharding=where),
                      abstract_tree, shardings)


def inference_model(model_cfg: transformer.ModelConfig, where: jax.sharding.Sharding):
  """(graphdef, abstract params, rest) for inference: the parameters are never
  initialised (they come from a checkpoint); `rest`, the model's few bytes of RNG
  stream state, is built under jit (which drops the unused parameter initialisers)
  and placed per `where`."""
  graphdef, _, _ = abstract_model(model_cfg)

  def build_rest():
    return nnx.split(transformer.build(model_cfg, rngs=rngs(0)), nnx.Param, ...)[2]

  return graphdef, abstract_params(model_cfg), jax.jit(build_rest, out_shardings=where)()


def count_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
