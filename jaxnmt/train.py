"""Training: corpus → tokenizer → Grain batches → jitted train step → TensorBoard and
Orbax checkpoints. `train_and_evaluate` reads top to bottom."""

import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import queue
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from jaxnmt import checkpoint as checkpoint_lib
from jaxnmt import config_lib
from jaxnmt import data as data_lib
from jaxnmt import losses
from jaxnmt import metrics as metrics_lib
from jaxnmt import model as model_lib
from jaxnmt import optim
from jaxnmt import sharding
from jaxnmt import tokenizer as tokenizer_lib

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
CHAR_VOCAB_MULTIPLE = 64
FINISHED_FILE = os.path.join('train', 'finished.json')


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became NaN)."""


# ----------------------------------------------------------------------------- setup


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.ModelConfig:
  """The run config's model section as the model's own frozen dataclass."""
  if config.tokenizer.model_type == 'char':
    # A data-dependent character vocabulary, padded so any tensor axis divides it.
    vocab_size = CHAR_VOCAB_MULTIPLE * -(-vocab_size // CHAR_VOCAB_MULTIPLE)
  return model_lib.ModelConfig(
      vocab_size=vocab_size, **config.model.to_dict(),
      kind='decoder_lm' if config.get('task') == 'lm' else 'transformer',
      max_length=(config.data.max_target_length if config.get('task') == 'lm' else
                  max(config.data.max_source_length, config.data.max_target_length)))


def load_corpus(config) -> data_lib.Splits:
  path = data_lib.resolve_path(config.data.path, config.data.url, config.data.filename)
  pairs, report = data_lib.read_pairs(path)
  splits = data_lib.split_pairs(pairs, config.data.valid_fraction,
                                config.data.test_fraction, config.data.split_seed)
  logging.info('Corpus %s: %d pairs (%d malformed lines skipped); split train=%d '
               'valid=%d test=%d', path, report.valid, sum(report.malformed.values()),
               len(splits.train), len(splits.valid), len(splits.test))
  return splits


def load_tokenizer(config, workdir: str, training_text=None):
  """The workdir's tokenizer; on the first run trained on `training_text()` (a list of
  sentences, or one string for a char vocabulary) by process 0."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  model_type = config.tokenizer.model_type
  if not os.path.exists(path) and training_text is None:
    raise FileNotFoundError(f'{path} not found: train a model in {workdir} first')
  started = time.time()
  # Process 0 trains (SentencePiece training is not bit-reproducible across runs); the
  # others wait for it and load the same file (the workdir is on a shared filesystem).
  if jax.process_index() == 0 and not os.path.exists(path):
    if model_type == 'char':
      tokenizer_lib.train_chars(training_text(), path)
    else:
      tokenizer_lib.train(training_text(), path, vocab_size=config.tokenizer.vocab_size,
                          model_type=model_type,
                          max_sentences=config.tokenizer.max_training_sentences,
                          seed=config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer ready')
  tokenizer = tokenizer_lib.load(path, model_type)
  logging.info('Tokenizer %s: %d pieces (%.1fs)', path, tokenizer.vocab_size,
               time.time() - started)
  return tokenizer


def prepare_translation_data(config, workdir: str):
  """(tokenizer, endless packed training batches, validation batches) of the corpus;
  writes the held-out splits to WORKDIR/splits."""
  splits = load_corpus(config)
  tokenizer = load_tokenizer(config, workdir,
                             lambda: [side for pair in splits.train for side in pair])
  if jax.process_index() == 0:
    data_lib.write_split_files(splits, os.path.join(workdir, 'splits'))
  train_data = data_lib.make_train_dataset(
      splits.train, tokenizer, batch_size=config.data.batch_size,
      max_source_length=config.data.max_source_length,
      max_target_length=config.data.max_target_length,
      num_packing_bins=config.data.num_packing_bins, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      packing=config.data.packing)
  valid_batches = list(data_lib.make_eval_batches(
      splits.valid, tokenizer, batch_size=config.data.eval_batch_size,
      max_source_length=config.data.max_source_length,
      max_target_length=config.data.max_target_length))
  return tokenizer, train_data, valid_batches


def prepare_lm_data(config, workdir: str):
  """(tokenizer, endless batches of training blocks, validation blocks) of a text: the
  last `data.valid_fraction` of it is validation."""
  path = data_lib.resolve_path(config.data.path, config.data.url, config.data.filename)
  train_text, valid_text = data_lib.split_text(data_lib.read_text(path),
                                               config.data.valid_fraction)
  logging.info('Text %s: %d training and %d validation characters', path, len(train_text),
               len(valid_text))
  if config.tokenizer.model_type == 'char':
    training_text = lambda: train_text
  else:
    training_text = lambda: [line for line in train_text.splitlines() if line.strip()]
  tokenizer = load_tokenizer(config, workdir, training_text)
  encode = lambda text: np.asarray(tokenizer.encode(text), np.int32)
  block = config.data.max_target_length
  train_data = data_lib.make_lm_dataset(
      encode(train_text), batch_size=config.data.batch_size, block_length=block,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  blocks = data_lib.lm_blocks(encode(valid_text), block)
  rows = config.data.eval_batch_size
  valid_batches = [data_lib.lm_batch(blocks[start:start + rows])
                   for start in range(0, len(blocks) - rows + 1, rows)]
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, 'splits'), exist_ok=True)
    with open(os.path.join(workdir, 'splits', 'valid.txt'), 'w', encoding='utf-8') as handle:
      handle.write(valid_text)
  return tokenizer, train_data, valid_batches


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


def plan_mesh(config, num_devices: int | None = None):
  """(mesh, rules) for `config` on this job's devices; a MeshError (one line) if the mesh
  does not fit the devices or the model's dimensions do not divide by it."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  sizes = sharding.mesh_sizes(config.mesh, num_devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  sharding.check_divisibility(sizes, rules, {'batch': config.data.eval_batch_size})
  vocab = CHAR_VOCAB_MULTIPLE if config.tokenizer.model_type == 'char' else (
      config.tokenizer.vocab_size)
  # Each micro-batch of gradient accumulation is split over the devices like a batch.
  micro_batch = config.data.batch_size // config.optim.grad_accum_steps
  sharding.check_divisibility(sizes, rules, {
      'batch': micro_batch, 'heads': config.model.num_heads,
      'mlp': config.model.d_ff, 'vocab': vocab, 'embed': config.model.d_model})
  for field in ('batch_size', 'eval_batch_size'):
    if config.data[field] % jax.process_count():
      raise sharding.MeshError(f'config.data.{field}={config.data[field]} must divide by '
                               f'the {jax.process_count()} processes')
  dropout_rng(config.dropout_rng, num_devices)  # a one-line error if it cannot be sharded
  if micro_batch % jax.process_count():
    raise sharding.MeshError(f'config.data.batch_size / config.optim.grad_accum_steps = '
                             f'{micro_batch} rows must divide by the {jax.process_count()} '
                             f'processes')
  return sharding.make_mesh(sizes), rules


def create_train_state(model_cfg: model_lib.ModelConfig, tx, seed: int, mesh, rules):
  """Initialises the model and optimizer directly into their shardings (no host ever
  holds the whole model). Returns (graphdef, state, rest, state_shardings) where
  state = {'params', 'opt_state', 'step'} and rest holds the dropout RNG streams."""
  abstract = abstract_train_state(model_cfg, tx)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  graphdef, _, _ = nnx.split(
      nnx.eval_shape(lambda: model_lib.build(model_cfg, rngs=_rngs(seed))),
      nnx.Param, ...)

  @functools.partial(jax.jit, out_shardings=(shardings, sharding.replicated(mesh)))
  def init():
    model = model_lib.build(model_cfg, rngs=_rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}, rest
  total, per_device = sharding.planned_bytes(abstract, shardings)
  logging.info('Parameters + optimizer state: %.1f MB in all, %.1f MB per device',
               total / 2**20, per_device / 2**20)
  state, rest = init()
  return graphdef, state, rest, shardings


def create_model(model_cfg: model_lib.ModelConfig, seed: int):
  """(graphdef, params, rest) on the default device, for inference and tests."""
  model = model_lib.build(model_cfg, rngs=_rngs(seed))
  return nnx.split(model, nnx.Param, ...)


def abstract_train_state(model_cfg: model_lib.ModelConfig, tx) -> dict:
  """Shapes of the train state, e.g. as the target of a checkpoint restore."""
  def build():
    model = model_lib.build(model_cfg, rngs=_rngs(0))
    params = nnx.state(model, nnx.Param)
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.int32(0)}
  return jax.eval_shape(build)


def count_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- steps


def train_step(graphdef, tx, label_smoothing: float, seed: int, accumulate: int,
               state: dict, rest, batch: dict, rng_impl: str = 'threefry2x32',
               loss_chunks: int = 0):
  """One update. state: {'params', 'opt_state', 'step'}; returns (state, metric sums).
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
      sums = losses.fused_cross_entropy_sums(
          model.features(micro_batch, deterministic=False), model.output_weight(), targets,
          weights, label_smoothing, loss_chunks, model.config.dtype)
    else:
      sums = losses.cross_entropy_sums(model(micro_batch, deterministic=False), targets,
                                       weights, label_smoothing)
    return sums['loss'], sums

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accumulate == 1:
    grads, sums = grad_fn(state['params'], batch, dropout_key)
  else:
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
  return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, sums


def eval_step(graphdef, params, rest, batch: dict) -> dict:
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits = model(batch, deterministic=True)
  return losses.cross_entropy_sums(logits, batch['targets'], batch['targets_segment_ids'] > 0)


def dropout_rng(name: str, num_devices: int) -> str:
  """The jax.random implementation of dropout masks for config.dropout_rng."""
  if name == 'auto':
    return 'philox4x32' if num_devices == 1 else 'threefry2x32'
  if name == 'philox4x32' and num_devices > 1:
    raise sharding.MeshError('config.dropout_rng=philox4x32 works on one device only (jax '
                             'cannot shard it); use threefry2x32 or auto on this mesh')
  return name


def compile_steps(graphdef, tx, config, mesh, rules, shardings):
  """(train_step, eval_step) jitted with explicit shardings; the state is donated."""
  replicated = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh, rules)
  step_fn = jax.jit(
      functools.partial(train_step, graphdef, tx, config.optim.label_smoothing, config.seed,
                        config.optim.grad_accum_steps,
                        rng_impl=dropout_rng(config.dropout_rng, mesh.size),
                        loss_chunks=config.optim.loss_chunks),
      in_shardings=(shardings, replicated, batch), out_shardings=(shardings, replicated),
      donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, graphdef),
                    in_shardings=(shardings['params'], replicated, batch),
                    out_shardings=replicated)
  return step_fn, eval_fn


# ----------------------------------------------------------------------------- memory fit


def batch_shapes(config, rows: int) -> dict[str, tuple[int, int]]:
  """Shapes of a global training batch of `rows` rows."""
  target = config.data.max_target_length
  shapes = {key: (rows, target) for key in ('decoder_inputs', 'targets',
                                            'targets_segment_ids', 'targets_positions')}
  if config.task != 'lm':
    shapes.update({key: (rows, config.data.max_source_length) for key in (
        'inputs', 'inputs_segment_ids', 'inputs_positions')})
  return shapes


def compile_train_step(config, model_cfg: model_lib.ModelConfig, mesh, rules, rows: int):
  """The train step compiled ahead of time for batches of `rows` rows, from shapes
  alone (nothing is allocated): its `memory_analysis()` is the step's footprint."""
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  abstract = abstract_train_state(model_cfg, tx)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  graphdef, _, rest = nnx.split(
      nnx.eval_shape(lambda: model_lib.build(model_cfg, rngs=_rngs(config.seed))),
      nnx.Param, ...)
  step_fn, _ = compile_steps(graphdef, tx, config, mesh, rules, shardings)
  state = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                sharding=where),
                       abstract, shardings)
  rest = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=sharding.replicated(mesh)), rest)
  where = sharding.batch_sharding(mesh, rules)
  batch = {key: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=where)
           for key, shape in batch_shapes(config, rows).items()}
  return step_fn.lower(state, rest, batch).compile()


def step_bytes(compiled) -> int:
  """Peak bytes per device of a compiled step: arguments + outputs (less donated
  buffers reused for outputs) + temporaries."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def device_memory_limit(config) -> tuple[int, str]:
  """(usable bytes per device, where that figure comes from)."""
  if config.data.device_memory_gb:
    return int(config.data.device_memory_gb * 2**30), 'config.data.device_memory_gb'
  stats = jax.local_devices()[0].memory_stats() or {}
  if stats.get('bytes_limit'):
    # Leave a tenth for fragmentation and buffers outside the step (batches in flight).
    return int(0.9 * stats['bytes_limit']), 'the device (90% of its limit)'
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return int(0.9 * ram / jax.local_device_count()), 'host RAM (90%) / local devices'


def fit_batch_size(config, model_cfg: model_lib.ModelConfig, mesh, rules,
                   max_doublings: int = 6) -> tuple[int, dict[int, int]]:
  """The largest batch (rows) of the form batch_size * 2^k, |k| <= max_doublings,
  whose compiled train step fits in device memory. Returns (rows, {rows tried: bytes})."""
  limit, source = device_memory_limit(config)
  accumulate = config.optim.grad_accum_steps
  parts = math.prod(mesh.shape[axis] for axis in sharding.mesh_axes_of(rules, sharding.BATCH))
  granule = math.lcm(accumulate * parts, accumulate * jax.process_count())
  tried = {}

  def fits(rows: int) -> bool:
    if rows not in tried:
      started = time.time()
      tried[rows] = step_bytes(compile_train_step(config, model_cfg, mesh, rules, rows))
      logging.info('Memory fit: %d rows need %.1f MiB per device (limit %.1f MiB from %s; '
                   'compiled in %.1fs)', rows, tried[rows] / 2**20, limit / 2**20, source,
                   time.time() - started)
    return tried[rows] <= limit

  rows = config.data.batch_size
  if fits(rows):
    for _ in range(max_doublings):
      if not fits(rows * 2):
        break
      rows *= 2
    return rows, tried
  for _ in range(max_doublings):
    smaller = rows // 2
    if smaller < granule or smaller % granule:
      break
    rows = smaller
    if fits(rows):
      return rows, tried
  raise TrainingError(
      f'no batch size fits in device memory: {rows} rows need {tried[rows] / 2**30:.2f} GiB '
      f'per device, {source} allows {limit / 2**30:.2f} GiB; shard the model '
      f'(config.mesh.fsdp/tensor), use config.model.remat or a smaller model')


def evaluate_loss(eval_fn, params, rest, batches) -> dict[str, float]:
  """Token-weighted validation loss (plain NLL) and accuracy over `batches` ({} if
  there are none)."""
  if not batches:
    return {}
  sums = [jax.device_get(eval_fn(params, rest, batch)) for batch in batches]
  summary = metrics_lib.summarize(sums)
  return {'loss': summary['nll'], 'accuracy': summary['accuracy'],
          'perplexity': math.exp(min(summary['nll'], 50.0))}


def is_time(step: int, every: int, total: int) -> bool:
  return step % every == 0 or step == total


# ----------------------------------------------------------------------------- loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config`, writing TensorBoard, config, tokenizer and checkpoints to
  `workdir`. Resumes from the workdir's latest readable checkpoint. Returns final
  metrics."""
  config_lib.validate(config)

  # ------------------------------------------------------------- mesh and workdir
  mesh, rules = plan_mesh(config)
  logging.info('Mesh %s over %d devices in %d processes', dict(mesh.shape),
               jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  lock = lock_workdir(workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=None)  # see save()
  try:
    check_resumable(checkpointer, config, workdir)
    if jax.process_index() == 0:
      save_config(config, workdir)
      _remove(os.path.join(workdir, FINISHED_FILE))  # this run decides the final step
    return _train(config, workdir, mesh, rules, checkpointer)
  finally:
    checkpointer.close()
    lock.close()


def _train(config, workdir: str, mesh, rules, checkpointer) -> dict:
  """The body of `train_and_evaluate`, once the workdir is locked."""
  # ------------------------------------------------------------- data and tokenizer
  prepare = prepare_lm_data if config.task == 'lm' else prepare_translation_data
  tokenizer, train_data, valid_batches = prepare(config, workdir)
  if config.data.fit_batch_to_memory:
    rows, _ = fit_batch_size(config, model_config(config, tokenizer.vocab_size), mesh, rules)
    if rows != config.data.batch_size:
      logging.warning('Memory fit: batch_size %d -> %d rows', config.data.batch_size, rows)
      config.data.batch_size = rows
      if jax.process_index() == 0:
        save_config(config, workdir)
      tokenizer, train_data, valid_batches = prepare(config, workdir)
  process_rows = config.data.batch_size // jax.process_count()
  batch_sharding = sharding.batch_sharding(mesh, rules)
  eval_rows = config.data.eval_batch_size
  valid_batches = [sharding.to_global(_process_rows(batch, eval_rows), batch_sharding)
                   for batch in valid_batches]

  # ------------------------------------------------------------- model and optimizer
  model_cfg = model_config(config, tokenizer.vocab_size)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  graphdef, state, rest, shardings = create_train_state(model_cfg, tx, config.seed, mesh,
                                                        rules)
  row = (f'{config.data.max_target_length}' if config.task == 'lm' else
         f'({config.data.max_source_length} + {config.data.max_target_length})')
  logging.info('Model: %s parameters; %d rows x %s tokens per batch, %d per process',
               f'{count_params(state["params"]):,}', config.data.batch_size, row,
               process_rows)

  # ------------------------------------------------------------- resume
  # Order: the workdir's newest readable checkpoint, else a fresh start.
  train_iterator = iter(train_data)
  restored = checkpointer.restore_latest(checkpoint_lib.abstract_like(state, shardings))
  if restored is not None:
    latest, state, iterator_state, _ = restored
    if iterator_state is not None:
      train_iterator.set_state(iterator_state)
    logging.info('Resumed from checkpoint at step %d', latest)
  start_step = int(state['step'])
  metadata = {'config': config.to_dict(), 'tokenizer_sha256': file_sha256(tokenizer.model_path),
              'process_count': jax.process_count()}

  def save(step):
    _check_finite(jax.device_get(pending), step - len(pending) + 1)  # never save NaNs
    checkpointer.save(step, state, feeder.iterator_state(), metadata)
    # Keep the newest `keep_checkpoints`, and any a live eval worker has not scored.
    protected = set()
    if not config.delete_unscored_checkpoints and checkpoint_lib.worker_alive(workdir):
      protected = set(checkpointer.all_steps()) - checkpoint_lib.scored_steps(workdir)
    checkpointer.prune(config.keep_checkpoints, protected, saving=step)

  # ------------------------------------------------------------- compiled steps
  step_fn, eval_fn = compile_steps(graphdef, tx, config, mesh, rules, shardings)

  # ------------------------------------------------------------- train loop
  feeder = DeviceFeeder(train_iterator, batch_sharding, config.data.prefetch_to_device)
  writer = metrics_lib.Writer(workdir, 'train')
  eval_writer = metrics_lib.Writer(workdir, 'valid')
  preemption = Preemption(config.preemption_check_every_steps)
  total = config.num_train_steps
  time_limit = config.train_time_limit_minutes * 60
  started = time.time()
  pending, slots = [], 0
  interval_start = time.time()
  last_eval = {}
  step = last_saved = start_step
  out_of_time = False
  progress = tqdm.tqdm(total=total, initial=start_step, desc='train', unit='step',
                       dynamic_ncols=True, disable=jax.process_index() != 0)
  try:
    while step < total:
      batch, batch_slots = next(feeder)
      slots += batch_slots
      state, step_metrics = step_fn(state, rest, batch)
      pending.append(step_metrics)
      step += 1
      out_of_time = bool(time_limit) and time.time() - started > time_limit
      if is_time(step, config.log_every_steps, total) or out_of_time:
        fetched = jax.device_get(pending)
        _check_finite(fetched, step - len(fetched) + 1)
        elapsed = time.time() - interval_start
        real_tokens = sum(m['tokens'] + m['source_tokens'] for m in fetched)
        summary = metrics_lib.summarize(fetched)
        summary.update(learning_rate=float(schedule(step - 1)),
                       real_tokens_per_sec=real_tokens / elapsed,
                       real_token_fraction=real_tokens / slots,
                       steps_per_sec=len(fetched) / elapsed)
        writer.scalars(step, summary)
        progress.set_postfix(loss=f'{summary["loss"]:.3f}',
                             tok_s=f'{summary["real_tokens_per_sec"]:.0f}')
        progress.update(len(fetched))
        pending, slots, interval_start = [], 0, time.time()
      if is_time(step, config.eval_every_steps, total) or out_of_time:
        last_eval = evaluate_loss(eval_fn, state['params'], rest, valid_batches)
        if last_eval:
          eval_writer.scalars(step, last_eval)
          logging.info('step %d: validation loss %.4f, accuracy %.3f', step,
                       last_eval['loss'], last_eval['accuracy'])
        interval_start = time.time()
      if is_time(step, config.checkpoint_every_steps, total) or out_of_time:
        save(step)
        last_saved = step
      if preemption.agreed(step):
        if last_saved != step:
          save(step)
        checkpointer.wait()
        logging.warning('Preempted: saved step %d; exiting', step)
        break
      if out_of_time:
        logging.info('Time limit of %.1f minutes reached at step %d',
                     config.train_time_limit_minutes, step)
        break
    if step >= total or out_of_time:
      checkpointer.wait()
      _write_finished(workdir, step)
  except KeyboardInterrupt:
    logging.warning('Interrupted at step %d: saving a checkpoint before exiting', step)
    if last_saved != step:
      save(step)
  finally:
    preemption.close()
    progress.close()
    writer.close()
    eval_writer.close()
    checkpointer.wait()
    feeder.close()
    train_iterator.close()
  logging.info('Finished at step %d after %.1f minutes; model in %s', step,
               (time.time() - started) / 60, workdir)
  return {'step': step, **{f'valid_{k}': v for k, v in last_eval.items()}}


def _remove(path: str) -> None:
  if os.path.exists(path):
    os.remove(path)


def _write_finished(workdir: str, step: int) -> None:
  """Tells eval workers that `step` is the run's final checkpoint."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, FINISHED_FILE)
    with open(path + '.partial', 'w', encoding='utf-8') as handle:
      json.dump({'step': step, 'time': time.time()}, handle)
    os.replace(path + '.partial', path)


def lock_workdir(workdir: str):
  """Holds an exclusive lock on the workdir (process 0) for the life of the run; the OS
  drops it when the process dies, however it dies."""
  path = os.path.join(workdir, '.trainer.lock')
  handle = open(path, 'a+', encoding='utf-8')
  if jax.process_index() == 0:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      owner = handle.read().strip() or 'unknown'
      handle.close()
      raise TrainingError(f'{workdir} is in use by another trainer (pid {owner}); stop it '
                          f'or choose another --workdir') from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
  return handle


def check_resumable(checkpointer, config, workdir: str) -> None:
  """Refuses to resume a checkpoint written with an incompatible config or tokenizer;
  reports harmless config changes."""
  latest = checkpointer.latest_step()
  saved = checkpointer.read_metadata(latest) if latest is not None else None
  if not saved:
    return
  breaking, harmless = config_lib.resume_differences(saved['config'], config.to_dict())
  if breaking:
    raise TrainingError(f'the checkpoints in {checkpointer.directory} were written with '
                        f'another model/tokenizer config ({"; ".join(breaking)}); use a new '
                        f'--workdir or the original values')
  if harmless:
    logging.warning('Resuming with a changed config: %s', '; '.join(harmless))
  tokenizer_path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(tokenizer_path) and file_sha256(tokenizer_path) != saved.get(
      'tokenizer_sha256'):
    raise TrainingError(f'{tokenizer_path} is not the tokenizer the checkpoints were '
                        f'trained with (sha256 differs)')


def file_sha256(path: str) -> str:
  with open(path, 'rb') as handle:
    return hashlib.sha256(handle.read()).hexdigest()


class Preemption:
  """SIGTERM asks the run to stop; all processes agree on the step to stop at (checked
  every step on one process, every `every` steps across processes)."""

  def __init__(self, every: int):
    self.every = every
    self.requested = False
    self._previous = None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, nothing to agree on
      pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def agreed(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self.every:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class DeviceFeeder:
  """Iterates global device batches of a host batch iterator, `depth` batches ahead:
  a background thread pulls the next host batches and starts their transfer to the
  devices while the current step computes (depth 0: in the caller, just in time).
  Yields (batch, slots): slots = token positions in the global batch. `iterator_state`
  is the host iterator's state after the last batch *yielded*, so a checkpoint resumes
  at the right batch however far ahead the thread has read."""

  def __init__(self, iterator, batch_sharding, depth: int):
    self._iterator, self._sharding, self._depth = iterator, batch_sharding, depth
    self._state = iterator.get_state() if depth else None
    if depth:
      self._queue = queue.Queue(maxsize=depth)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._fill, name='device-feeder', daemon=True)
      self._thread.start()

  def _load(self):
    host = next(self._iterator)
    slots = sum(host[key].size for key in ('inputs', 'targets') if key in host)
    return sharding.to_global(host, self._sharding), slots * jax.process_count()

  def _fill(self) -> None:
    while not self._stop.is_set():
      try:
        item = (*self._load(), self._iterator.get_state())
      except BaseException as error:  # pylint: disable=broad-except  # re-raised in next()
        item = error
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if isinstance(item, BaseException):
        return

  def __iter__(self):
    return self

  def __next__(self):
    if not self._depth:
      return self._load()
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batch, slots, self._state = item
    return batch, slots

  def iterator_state(self):
    return self._state if self._depth else self._iterator.get_state()

  def close(self) -> None:
    if self._depth:
      self._stop.set()
      self._thread.join(timeout=10)


def _process_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """This process's slice of a batch that every process built whole."""
  per_process = rows // jax.process_count()
  begin = jax.process_index() * per_process
  return {key: value[begin:begin + per_process] for key, value in batch.items()}


def _check_finite(fetched: list[dict], first_step: int) -> None:
  for offset, step_metrics in enumerate(fetched):
    if not np.isfinite(step_metrics['loss']) or not np.isfinite(step_metrics['grad_norm']):
      raise TrainingError(
          f'non-finite loss or gradient at step {first_step + offset}: stopping. Lower '
          f'config.optim.learning_rate or raise config.optim.warmup_steps; the last '
          f'checkpoint is unaffected.')
