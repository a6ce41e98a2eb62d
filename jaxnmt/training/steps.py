"""The compiled computations of training: one update (`train_step`), the validation
loss (`eval_step`), both jitted with explicit shardings by `compile_steps`. Used by the
training loop and by `--mode=bench`."""

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxnmt import config_lib
from jaxnmt.model import layers
from jaxnmt.model import losses
from jaxnmt.training import metrics as metrics_lib
from jaxnmt.runtime import sharding


def train_step(graphdef, tx, label_smoothing: float, seed: int, accumulate: int,
               state: dict, rest, batch: dict, rng_impl: str = 'threefry2x32',
               loss_chunks: int = 0, ema_decay: float = 0.0):
  """One update. state: {'params', 'opt_state', 'step'} (+ 'ema' with `ema_decay`);
  returns (state, metric sums).
  Dropout draws from fold_in(key(seed), step): a pure function of the state.

  With `accumulate` > 1 the batch's rows are split into that many micro-batches (rows
  j, j + accumulate, ... form micro-batch j, so every device keeps its share) whose
  gradients of the *summed* loss are added up; the total is divided once by the real
  target tokens of the whole batch, so the update equals the one-batch update however
  the tokens fall into micro-batches.

  `loss_chunks` > 0 computes the output layer and the loss fused, in that many slices
  of the target length (`losses.fused_cross_entropy_sums`); 0 materialises the logits."""
  dropout_key = jax.random.fold_in(jax.random.key(seed, impl=rng_impl), state['step'])

  def loss_fn(params, micro_batch, key):
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, dropout=key)
    targets, weights = micro_batch['targets'], micro_batch['targets_segment_ids'] > 0
    if loss_chunks:
      states, weight = model.output_operands(model.features(micro_batch,
                                                            deterministic=False))
      sums = losses.fused_cross_entropy_sums(states, weight, targets, weights,
                                             label_smoothing, loss_chunks,
                                             model.config.dtype)
    else:
      sums = losses.cross_entropy_sums(model(micro_batch, deterministic=False), targets,
                                       weights, label_smoothing)
    return sums['loss'], sums

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accumulate == 1:
    grads, sums = grad_fn(state['params'], batch, dropout_key)
  else:
    # [B, ...] -> [accumulate, B / accumulate, ...]
    micro_batches = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accumulate, accumulate, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate_one(carry, inputs):
      index, micro_batch = inputs
      grads, sums = grad_fn(state['params'], micro_batch,
                            jax.random.fold_in(dropout_key, index))
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        grad_fn, state['params'], jax.tree.map(lambda x: x[0], micro_batches), dropout_key))
    (grads, sums), _ = jax.lax.scan(accumulate_one, zeros,
                                    (jnp.arange(accumulate), micro_batches))
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums['tokens'], 1.0), grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  sums['grad_norm'] = optax.global_norm(grads)
  sums['source_tokens'] = ((batch['inputs_segment_ids'] > 0).sum().astype(jnp.float32)
                           if 'inputs_segment_ids' in batch else jnp.float32(0))
  new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}
  if 'ema' in state:
    new_state['ema'] = update_ema(state['ema'], params, state['step'], ema_decay)
  return new_state, sums


def update_ema(ema, params, step, decay: float):
  """ema <- d * ema + (1 - d) * params with d = min(decay, (1 + step) / (10 + step)):
  the early, fast-moving parameters are not averaged in with weight `decay`."""
  step = step.astype(jnp.float32)
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda old, new: (rate * old + (1.0 - rate) * new).astype(old.dtype),
                      ema, params)


def eval_step(graphdef, params, rest, batch: dict) -> dict:
  """Summed plain (unsmoothed) loss, hits and token count of a batch."""
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits = model(batch, deterministic=True)
  return losses.cross_entropy_sums(logits, batch['targets'], batch['targets_segment_ids'] > 0)


def _batch_sharded(function, mesh, rules):
  """`function` traced with the residual stream split over the batch's mesh axes only
  (`layers.batch_sharded`)."""
  axes = sharding.mesh_axes_of(rules, sharding.BATCH)

  def traced(*args, **kwargs):
    with layers.batch_sharded(mesh, axes):
      return function(*args, **kwargs)
  # The step's own name, for JAX's logs and profiles (`function` is a partial).
  traced.__name__ = traced.__qualname__ = getattr(function, 'func', function).__name__
  return traced


def compile_steps(graphdef, tx, config, mesh, rules, shardings):
  """(train_step, eval_step) jitted with explicit shardings; the state is donated."""
  replicated = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh, rules)
  step_fn = jax.jit(
      _batch_sharded(functools.partial(
          train_step, graphdef, tx, config.optim.label_smoothing, config.seed,
          config.optim.grad_accum_steps,
          rng_impl=config_lib.dropout_rng(config.dropout_rng, mesh.size),
          loss_chunks=config.optim.loss_chunks, ema_decay=config.get('ema_decay', 0.0)),
          mesh, rules),
      in_shardings=(shardings, replicated, batch), out_shardings=(shardings, replicated),
      donate_argnums=(0,))
  eval_fn = jax.jit(_batch_sharded(functools.partial(eval_step, graphdef), mesh, rules),
                    in_shardings=(shardings['params'], replicated, batch),
                    out_shardings=replicated)
  return step_fn, eval_fn


def evaluate_loss(eval_fn, params, rest, batches) -> dict[str, float]:
  """Token-weighted validation loss (plain NLL), accuracy and perplexity over
  `batches` ({} if there are none)."""
  if not batches:
    return {}
  sums = [jax.device_get(eval_fn(params, rest, batch)) for batch in batches]
  summary = metrics_lib.summarize(sums)
  return {'loss': summary['nll'], 'accuracy': summary['accuracy'],
          'perplexity': math.exp(min(summary['nll'], 50.0))}
