"""Training: corpus → tokenizer → Grain batches → jitted train step → TensorBoard and
Orbax checkpoints. `train_and_evaluate` reads top to bottom."""

import functools
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from jaxnmt import checkpoint as checkpoint_lib
from jaxnmt import config_lib
from jaxnmt import data as data_lib
from jaxnmt import losses
from jaxnmt import metrics as metrics_lib
from jaxnmt import model as model_lib
from jaxnmt import optim
from jaxnmt import tokenizer as tokenizer_lib

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became NaN)."""


# ----------------------------------------------------------------------------- setup


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """The run config's model section as the model's own frozen dataclass."""
  return model_lib.ModelConfig(
      vocab_size=vocab_size, **config.model.to_dict(),
      max_length=max(config.data.max_source_length, config.data.max_target_length))


def load_corpus(config) -> data_lib.Splits:
  path = data_lib.resolve_path(config.data.path, config.data.url)
  pairs, report = data_lib.read_pairs(path)
  splits = data_lib.split_pairs(pairs, config.data.valid_fraction,
                                config.data.test_fraction, config.data.split_seed)
  logging.info('Corpus %s: %d pairs (%d malformed lines skipped); split train=%d '
               'valid=%d test=%d', path, report.valid, sum(report.malformed.values()),
               len(splits.train), len(splits.valid), len(splits.test))
  return splits


def load_tokenizer(config, workdir: str, splits: data_lib.Splits | None = None):
  """The workdir's tokenizer; trained on the training split on the first run."""
  def training_sentences():
    return [side for pair in splits.train for side in pair]
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.exists(path) and splits is None:
    raise FileNotFoundError(f'{path} not found: train a model in {workdir} first')
  started = time.time()
  tokenizer = tokenizer_lib.load_or_train(
      path, training_sentences, vocab_size=config.tokenizer.vocab_size,
      model_type=config.tokenizer.model_type,
      max_sentences=config.tokenizer.max_training_sentences, seed=config.seed)
  logging.info('Tokenizer %s: %d pieces (%.1fs)', path, tokenizer.vocab_size,
               time.time() - started)
  return tokenizer


def save_config(config, workdir: str) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as handle:
    handle.write(config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a jaxnmt workdir?')
  with open(path) as handle:
    return ml_collections.ConfigDict(json.load(handle))


# ----------------------------------------------------------------------------- state


def _rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(params=seed, dropout=seed + 1)


def create_model(model_cfg: model_lib.ModelConfig, seed: int):
  """(graphdef, params, rest): the model split into its parameters and the rest
  (dropout RNG streams), parameters initialised from `seed` under jit."""
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, rngs=_rngs(seed)))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)

  @jax.jit
  def init():
    model = model_lib.Transformer(model_cfg, rngs=_rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params, rest
  params, rest = init()
  return graphdef, params, rest


def abstract_train_state(model_cfg: model_lib.ModelConfig, tx) -> dict:
  """Shapes of the train state, e.g. as the target of a checkpoint restore."""
  def build():
    model = model_lib.Transformer(model_cfg, rngs=_rngs(0))
    params = nnx.state(model, nnx.Param)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
  return jax.eval_shape(build)


def count_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- steps


def train_step(graphdef, rest, tx, label_smoothing: float, state: dict, batch: dict,
               dropout_key: jax.Array):
  """One update. state: {'params', 'opt_state', 'step'}; returns (state, metric sums)."""

  def loss_fn(params, rest):
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, dropout=dropout_key)
    logits = model(batch, deterministic=False)
    sums = losses.cross_entropy_sums(logits, batch['targets'],
                                     batch['targets_segment_ids'] > 0, label_smoothing)
    return sums['loss'] / jnp.maximum(sums['tokens'], 1.0), sums

  grads, sums = jax.grad(loss_fn, has_aux=True)(state['params'], rest)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  sums['grad_norm'] = optax.global_norm(grads)
  return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, sums


def eval_step(graphdef, rest, params, batch: dict) -> dict:
  model = nnx.merge(graphdef, params, rest)
  logits = model(batch, deterministic=True)
  return losses.cross_entropy_sums(logits, batch['targets'], batch['targets_segment_ids'] > 0)


def evaluate_loss(eval_fn, params, batches) -> dict[str, float]:
  """Token-weighted validation loss (plain NLL) and accuracy over `batches`."""
  sums = [jax.device_get(eval_fn(params, batch)) for batch in batches]
  summary = metrics_lib.summarize(sums)
  return {'loss': summary['nll'], 'accuracy': summary['accuracy'],
          'perplexity': math.exp(min(summary['nll'], 50.0))}


def is_time(step: int, every: int, total: int) -> bool:
  return step % every == 0 or step == total


# ----------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config`, writing TensorBoard, config, tokenizer and checkpoints to
  `workdir`. Resumes from the workdir's latest checkpoint. Returns final metrics."""
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)

  # ------------------------------------------------------------- data and tokenizer
  splits = load_corpus(config)
  tokenizer = load_tokenizer(config, workdir, splits)
  save_config(config, workdir)
  data_lib.write_split_files(splits, os.path.join(workdir, 'splits'))
  train_data = data_lib.make_train_dataset(
      splits.train, tokenizer, batch_size=config.data.batch_size,
      max_source_length=config.data.max_source_length,
      max_target_length=config.data.max_target_length,
      num_packing_bins=config.data.num_packing_bins, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  valid_batches = list(data_lib.make_eval_batches(
      splits.valid, tokenizer, batch_size=config.data.eval_batch_size,
      max_source_length=config.data.max_source_length,
      max_target_length=config.data.max_target_length))

  # ------------------------------------------------------------- model and optimizer
  model_cfg = model_config(config, tokenizer.vocab_size)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  graphdef, params, rest = create_model(model_cfg, config.seed)
  state = {'params': params, 'opt_state': jax.jit(tx.init)(params), 'step': jnp.int32(0)}
  logging.info('Model: %s parameters', f'{count_params(params):,}')

  # ------------------------------------------------------------- resume
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.keep_checkpoints)
  train_iterator = iter(train_data)
  latest = checkpointer.latest_step()
  if latest is not None:
    state, iterator_state = checkpointer.restore(latest, checkpoint_lib.abstract_like(state))
    if iterator_state is not None:
      train_iterator.set_state(iterator_state)
    logging.info('Resumed from checkpoint at step %d', latest)
  start_step = int(state['step'])

  # ------------------------------------------------------------- compiled steps
  step_fn = jax.jit(functools.partial(train_step, graphdef, rest, tx,
                                      config.optim.label_smoothing), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, graphdef, rest))
  base_key = jax.random.key(config.seed)

  # ------------------------------------------------------------- train loop
  writer = metrics_lib.Writer(workdir, 'train')
  eval_writer = metrics_lib.Writer(workdir, 'valid')
  total = config.num_train_steps
  time_limit = config.train_time_limit_minutes * 60
  started = time.time()
  pending, real_tokens, slots = [], 0, 0
  interval_start = time.time()
  last_eval = {}
  step = start_step
  progress = tqdm.tqdm(total=total, initial=start_step, desc='train', unit='step',
                       dynamic_ncols=True, disable=jax.process_index() != 0)
  try:
    while step < total:
      batch = next(train_iterator)
      real_tokens += data_lib.real_token_count(batch)
      slots += batch['inputs'].size + batch['targets'].size
      state, step_metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
      pending.append(step_metrics)
      step += 1
      out_of_time = time_limit and time.time() - started > time_limit
      if is_time(step, config.log_every_steps, total) or out_of_time:
        fetched = jax.device_get(pending)
        _check_finite(fetched, step - len(fetched) + 1)
        elapsed = time.time() - interval_start
        summary = metrics_lib.summarize(fetched)
        summary.update(learning_rate=float(schedule(step - 1)),
                       real_tokens_per_sec=real_tokens / elapsed,
                       real_token_fraction=real_tokens / slots,
                       steps_per_sec=len(fetched) / elapsed)
        writer.scalars(step, summary)
        progress.set_postfix(loss=f'{summary["loss"]:.3f}',
                             tok_s=f'{summary["real_tokens_per_sec"]:.0f}')
        progress.update(len(fetched))
        pending, real_tokens, slots, interval_start = [], 0, 0, time.time()
      if is_time(step, config.eval_every_steps, total) or out_of_time:
        last_eval = evaluate_loss(eval_fn, state['params'], valid_batches)
        eval_writer.scalars(step, last_eval)
        logging.info('step %d: validation loss %.4f, accuracy %.3f', step,
                     last_eval['loss'], last_eval['accuracy'])
        interval_start = time.time()
      if is_time(step, config.checkpoint_every_steps, total) or out_of_time:
        _check_finite(jax.device_get(pending), step - len(pending) + 1)  # never save NaNs
        checkpointer.save(step, state, train_iterator.get_state())
      if out_of_time:
        logging.info('Time limit of %.1f minutes reached at step %d',
                     config.train_time_limit_minutes, step)
        break
  except KeyboardInterrupt:
    logging.warning('Interrupted at step %d: saving a checkpoint before exiting', step)
    if checkpointer.latest_step() != step and step > start_step:
      checkpointer.save(step, state, train_iterator.get_state())
  finally:
    progress.close()
    writer.close()
    eval_writer.close()
    checkpointer.close()
    train_iterator.close()
  logging.info('Finished at step %d after %.1f minutes; model in %s', step,
               (time.time() - started) / 60, workdir)
  return {'step': step, **{f'valid_{k}': v for k, v in last_eval.items()}}


def _check_finite(fetched: list[dict], first_step: int) -> None:
  for offset, step_metrics in enumerate(fetched):
    if not np.isfinite(step_metrics['loss']) or not np.isfinite(step_metrics['grad_norm']):
      raise TrainingError(
          f'non-finite loss or gradient at step {first_step + offset}: stopping. Lower '
          f'config.optim.learning_rate or raise config.optim.warmup_steps; the last '
          f'checkpoint is unaffected.')
