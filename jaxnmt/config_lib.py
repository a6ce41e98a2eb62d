"""Every check of a run config, done before JAX compiles anything, so a bad value is a
one-line error naming the field: `validate` (the values alone) and `check_mesh` (the
values against this job's devices and processes). Also the config's translation into
the model's own `ModelConfig`.
"""

import ml_collections

from jaxnmt.model import transformer
from jaxnmt.runtime import sharding
from jaxnmt.errors import ConfigError, MeshError

# A data-dependent character vocabulary is padded to a multiple of this, so any tensor
# axis divides it.
CHAR_VOCAB_MULTIPLE = 64


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f'config.{field}: {message}')


def _positive_int(config, field: str, allow_zero: bool = False) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  low = 0 if allow_zero else 1
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
           field, f'must be an integer >= {low}, got {value!r}')


def _fraction(config, field: str, low: float, high: float) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  _require(isinstance(value, (int, float)) and low <= value < high, field,
           f'must be a number in [{low}, {high}), got {value!r}')


def _choice(config, field: str, choices) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  _require(value in choices, field, f'must be one of {sorted(choices)}, got {value!r}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of `config`."""
  for field in ('num_train_steps', 'log_every_steps', 'eval_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints', 'preemption_check_every_steps',
                'data.max_source_length', 'data.max_target_length', 'data.batch_size',
                'data.eval_batch_size', 'data.pairs_per_shard',
                'tokenizer.vocab_size', 'model.num_encoder_layers',
                'model.num_decoder_layers', 'model.d_model', 'model.num_heads',
                'model.d_ff'):
    _positive_int(config, field)
  _positive_int(config, 'optim.grad_accum_steps')
  _positive_int(config, 'optim.loss_chunks', allow_zero=True)
  _require(config.optim.loss_chunks <= config.data.max_target_length, 'optim.loss_chunks',
           f'{config.optim.loss_chunks} slices of data.max_target_length='
           f'{config.data.max_target_length} tokens leave some empty')
  _positive_int(config, 'data.prefetch_to_device', allow_zero=True)
  _fraction(config, 'data.device_memory_gb', 0.0, float('inf'))
  _require(config.data.batch_size % config.optim.grad_accum_steps == 0,
           'optim.grad_accum_steps', f'data.batch_size={config.data.batch_size} must divide '
           f'by grad_accum_steps={config.optim.grad_accum_steps}')
  _positive_int(config, 'seed', allow_zero=True)
  _positive_int(config, 'data.split_seed', allow_zero=True)
  _positive_int(config, 'optim.warmup_steps', allow_zero=True)
  _positive_int(config, 'tokenizer.max_training_sentences', allow_zero=True)
  _fraction(config, 'train_time_limit_minutes', 0.0, float('inf'))
  _fraction(config, 'data.valid_fraction', 0.0, 0.5)
  _fraction(config, 'data.test_fraction', 0.0, 0.5)
  _fraction(config, 'model.dropout_rate', 0.0, 1.0)
  _fraction(config, 'model.attention_dropout_rate', 0.0, 1.0)
  _fraction(config, 'optim.label_smoothing', 0.0, 1.0)
  _fraction(config, 'ema_decay', 0.0, 1.0)
  _positive_int(config, 'early_stopping_patience', allow_zero=True)
  _positive_int(config, 'num_text_samples', allow_zero=True)
  _fraction(config, 'optim.b1', 0.0, 1.0)
  _fraction(config, 'optim.b2', 0.0, 1.0)
  _fraction(config, 'optim.weight_decay', 0.0, float('inf'))
  _fraction(config, 'optim.grad_clip_norm', 0.0, float('inf'))
  _fraction(config, 'decode.max_length_ratio', 0.0, float('inf'))
  _positive_int(config, 'decode.max_length_offset', allow_zero=True)
  _require(isinstance(config.optim.learning_rate, (int, float))
           and config.optim.learning_rate > 0, 'optim.learning_rate',
           f'must be a number > 0, got {config.optim.learning_rate!r}')
  _require(isinstance(config.optim.eps, (int, float)) and config.optim.eps > 0,
           'optim.eps', f'must be a number > 0, got {config.optim.eps!r}')
  _choice(config, 'task', {'translation', 'lm'})
  _choice(config, 'dropout_rng', {'auto', 'threefry2x32', 'philox4x32', 'rbg', 'unsafe_rbg'})
  _choice(config, 'model.activation', {'relu', 'gelu', 'swiglu'})
  _choice(config, 'model.norm', {'layernorm', 'rmsnorm'})
  _choice(config, 'model.dtype', {'float32', 'bfloat16'})
  _choice(config, 'model.attention', {'einsum', 'dot_product'})
  _choice(config, 'model.attention_implementation', {'', 'xla', 'cudnn'})
  _choice(config, 'model.remat', {'none', 'full', 'dots'})
  dot_product = config.model.attention == 'dot_product'
  _require(not dot_product or config.model.attention_dropout_rate == 0,
           'model.attention_dropout_rate', "must be 0 with model.attention='dot_product' "
           f'(it has no attention dropout), got {config.model.attention_dropout_rate!r}')
  _require(dot_product or not config.model.attention_implementation,
           'model.attention_implementation', "applies to model.attention='dot_product' "
           f'only, got {config.model.attention_implementation!r} with '
           f'{config.model.attention!r}')
  _require(config.model.attention_implementation != 'cudnn'
           or config.model.dtype == 'bfloat16', 'model.attention_implementation',
           f"'cudnn' needs model.dtype='bfloat16' (no float32 kernel), got "
           f'{config.model.dtype!r}')
  _choice(config, 'model.position_embedding', {'sinusoidal', 'learned', 'rope'})
  _choice(config, 'optim.schedule', {'rsqrt', 'cosine'})
  _choice(config, 'tokenizer.model_type', {'unigram', 'bpe', 'char'})
  _require(config.model.d_model % config.model.num_heads == 0, 'model.num_heads',
           f'd_model={config.model.d_model} must divide by num_heads='
           f'{config.model.num_heads}')
  head_dim = config.model.d_model // config.model.num_heads
  _require(config.model.position_embedding != 'rope' or head_dim % 2 == 0,
           'model.position_embedding', f"'rope' rotates pairs of dimensions: the head "
           f'width d_model / num_heads = {head_dim} must be even')
  _require(config.data.valid_fraction + config.data.test_fraction < 0.9,
           'data.test_fraction', 'valid_fraction + test_fraction must leave training data')
  # SentencePiece needs room for the 4 special ids and 256 byte-fallback pieces.
  _require(config.tokenizer.model_type == 'char' or config.tokenizer.vocab_size >= 300,
           'tokenizer.vocab_size',
           f'must be >= 300 (specials + byte fallback), got {config.tokenizer.vocab_size}')
  _check_data_lists(config)


def _check_data_lists(config) -> None:
  """The corpus list, mixture weights, test sets and filters of config.data."""
  data = config.data
  for field in ('path', 'weights', 'test_sets', 'source_lang', 'target_lang',
                'prepared_dir'):
    _require(isinstance(data[field], str), f'data.{field}',
             f'must be a string, got {data[field]!r}')
  _require(isinstance(config.tokenizer.path, str), 'tokenizer.path',
           f'must be a string, got {config.tokenizer.path!r}')
  _require(data.source_lang != data.target_lang and data.source_lang and
           data.target_lang, 'data.target_lang', 'source and target languages must be '
           f'two different names, got {data.source_lang!r} and {data.target_lang!r}')
  _positive_int(config, 'data.max_heldout_pairs')
  for field in ('filter_max_tokens', 'prepare_workers', 'pipeline_workers'):
    _positive_int(config, f'data.{field}', allow_zero=True)
  _fraction(config, 'data.filter_max_length_ratio', 0.0, float('inf'))
  _require(data.filter_max_length_ratio == 0 or data.filter_max_length_ratio >= 1,
           'data.filter_max_length_ratio', f'must be 0 (off) or >= 1, got '
           f'{data.filter_max_length_ratio!r}')
  corpora = [item for item in data.path.split(',') if item.strip()]
  _require(config.task == 'translation' or len(corpora) <= 1, 'data.path',
           f"task 'lm' reads one text file, got {len(corpora)}")
  if data.weights.strip():
    try:
      weights = [float(item) for item in data.weights.split(',')]
    except ValueError:
      weights = []
    _require(len(weights) == max(len(corpora), 1) and all(w >= 0 for w in weights)
             and sum(weights) > 0, 'data.weights',
             f'needs one number >= 0 per corpus of data.path ({max(len(corpora), 1)}), '
             f'not all 0; got {data.weights!r}')
  names = []
  for item in (item for item in data.test_sets.split(',') if item.strip()):
    name, equals, spec = item.partition('=')
    _require(bool(equals and name.strip() and spec.strip()) and
             name.strip().replace('_', '').replace('-', '').isalnum(), 'data.test_sets',
             f"expected comma-separated name=corpus (names of letters, digits, '-', '_'), "
             f'got {item!r}')
    names.append(name.strip())
  _require(len(names) == len(set(names)), 'data.test_sets',
           f'test set names must differ, got {names}')


def check_mesh(config: ml_collections.ConfigDict, num_devices: int,
               num_processes: int) -> None:
  """Raises MeshError if the mesh does not fit `num_devices`, a dimension does not
  divide by the mesh axes that split it, or a batch does not divide by the processes."""
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
    if config.data[field] % num_processes:
      raise MeshError(f'config.data.{field}={config.data[field]} must divide by the '
                      f'{num_processes} processes')
  if micro_batch % num_processes:
    raise MeshError(f'config.data.batch_size / config.optim.grad_accum_steps = '
                    f'{micro_batch} rows must divide by the {num_processes} processes')
  dropout_rng(config.dropout_rng, num_devices)


def dropout_rng(name: str, num_devices: int) -> str:
  """The jax.random implementation of dropout masks for config.dropout_rng."""
  if name == 'auto':
    return 'philox4x32' if num_devices == 1 else 'threefry2x32'
  if name == 'philox4x32' and num_devices > 1:
    raise MeshError('config.dropout_rng=philox4x32 works on one device only (jax cannot '
                    'shard it); use threefry2x32 or auto on this mesh')
  return name


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> transformer.ModelConfig:
  """The run config's model section as the model's own frozen dataclass, for a
  tokenizer of `vocab_size` pieces."""
  if config.tokenizer.model_type == 'char':
    vocab_size = CHAR_VOCAB_MULTIPLE * -(-vocab_size // CHAR_VOCAB_MULTIPLE)
  lm = config.task == 'lm'
  return transformer.ModelConfig(
      vocab_size=vocab_size, **config.model.to_dict(),
      kind='decoder_lm' if lm else 'transformer',
      max_length=(config.data.max_target_length if lm else
                  max(config.data.max_source_length, config.data.max_target_length)))


# Fields whose change makes a checkpoint unusable (parameter shapes, token ids) ...
_BREAKING_PREFIXES = ('task', 'model.', 'tokenizer.', 'data.max_source_length',
                      'data.max_target_length')
# ... except these, which change how the same parameters are computed with.
_HARMLESS_FIELDS = frozenset({'model.dtype', 'model.attention',
                              'model.attention_implementation', 'model.remat'})


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
  """(breaking, harmless) differences between the config a checkpoint was written with
  and the current one, each as 'field: old -> new'."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  breaking, harmless = [], []
  for field in sorted(set(saved_flat) | set(current_flat)):
    old, new = saved_flat.get(field), current_flat.get(field)
    if old == new:
      continue
    line = f'{field}: {old!r} -> {new!r}'
    # Clipping on/off changes the optimizer state; the parameter average is part of the
    # saved state: neither can appear or vanish on resume.
    toggled = field in ('optim.grad_clip_norm', 'ema_decay') and bool(old) != bool(new)
    breaks_shapes = field.startswith(_BREAKING_PREFIXES) and field not in _HARMLESS_FIELDS
    if breaks_shapes or toggled:
      breaking.append(line)
    else:
      harmless.append(line)
  return breaking, harmless
