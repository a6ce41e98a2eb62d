"""Every check of a run config, done before JAX compiles anything, so a bad value is a
one-line error naming the field: `validate` (the values alone: each field's own rule in
FIELD_RULES, then the rules between fields) and `check_mesh` (the values against this
job's devices and processes). Also the config's translation into the model's own
`ModelConfig`.
"""

from typing import Callable, NamedTuple

import ml_collections

from jaxnmt.model import layers
from jaxnmt.model import transformer
from jaxnmt.runtime import sharding
from jaxnmt.errors import ConfigError, MeshError

# A data-dependent character vocabulary is padded to a multiple of this, so any tensor
# axis divides it.
CHAR_VOCAB_MULTIPLE = 64


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f'config.{field}: {message}')


class _Rule(NamedTuple):
  """What one field's value must be: `holds(value)`, in words `wanted`."""
  holds: Callable[[object], bool]
  wanted: str


def _integer(low: int) -> _Rule:
  return _Rule(lambda value: isinstance(value, int) and not isinstance(value, bool)
               and value >= low, f'an integer >= {low}')


def _number(low: float, high: float = float('inf')) -> _Rule:
  return _Rule(lambda value: isinstance(value, (int, float)) and low <= value < high,
               f'a number in [{low}, {high})')


def _one_of(*choices: str) -> _Rule:
  return _Rule(lambda value: value in choices, f'one of {sorted(choices)}')


_BOOLEAN = _Rule(lambda value: isinstance(value, bool), 'True or False')
_POSITIVE = _Rule(lambda value: isinstance(value, (int, float)) and value > 0, 'a number > 0')
_STRING = _Rule(lambda value: isinstance(value, str), 'a string')
_OFF_OR_AT_LEAST_1 = _Rule(lambda value: isinstance(value, (int, float))
                           and (value == 0 or value >= 1), '0 (off) or a number >= 1')

# Every field checked on its own, in the order checked: {dotted field: rule}.
FIELD_RULES = {
    **dict.fromkeys((
        'num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
        'keep_checkpoints', 'preemption_check_every_steps', 'data.max_source_length',
        'data.max_target_length', 'data.batch_size', 'data.eval_batch_size',
        'data.pairs_per_shard', 'data.max_heldout_pairs', 'tokenizer.vocab_size',
        'model.num_encoder_layers', 'model.num_decoder_layers', 'model.d_model',
        'model.num_heads', 'model.d_ff', 'optim.grad_accum_steps'), _integer(1)),
    **dict.fromkeys((
        'seed', 'data.split_seed', 'data.prefetch_to_device', 'data.filter_max_tokens',
        'data.prepare_workers', 'data.pipeline_workers', 'optim.warmup_steps',
        'optim.loss_chunks', 'tokenizer.max_training_sentences', 'early_stopping_patience',
        'num_text_samples', 'decode.max_length_offset'), _integer(0)),
    **dict.fromkeys((
        'train_time_limit_minutes', 'data.device_memory_gb', 'optim.weight_decay',
        'optim.grad_clip_norm', 'decode.max_length_ratio'), _number(0.0)),
    **dict.fromkeys(('data.valid_fraction', 'data.test_fraction'), _number(0.0, 0.5)),
    **dict.fromkeys((
        'model.dropout_rate', 'model.attention_dropout_rate', 'optim.label_smoothing',
        'ema_decay', 'optim.b1', 'optim.b2'), _number(0.0, 1.0)),
    'data.filter_max_length_ratio': _OFF_OR_AT_LEAST_1,
    'optim.learning_rate': _POSITIVE,
    'optim.eps': _POSITIVE,
    **dict.fromkeys((
        'data.path', 'data.filename', 'data.url', 'data.weights', 'data.test_sets',
        'data.source_lang', 'data.target_lang', 'data.prepared_dir', 'tokenizer.path',
        'data.tags', 'data.target_langs', 'data.target_tag_format', 'tokenizer.reserved_tags',
        'init_from', 'init_from_weights'), _STRING),
    'init_from_optimizer': _BOOLEAN,
    'task': _one_of('translation', 'lm'),
    'dropout_rng': _one_of('auto', 'threefry2x32', 'philox4x32', 'rbg', 'unsafe_rbg'),
    'model.activation': _one_of(*layers.ACTIVATIONS),
    'model.decoder_start': _one_of('bos', 'zeros'),
    **dict.fromkeys(('model.attention_bias', 'model.output_bias'), _BOOLEAN),
    'model.norm': _one_of('layernorm', 'rmsnorm'),
    'model.dtype': _one_of('float32', 'bfloat16'),
    'model.attention': _one_of(*layers.ATTENTION_KINDS),
    'model.attention_implementation': _one_of('', 'xla', 'cudnn'),
    'model.remat': _one_of('none', 'full', 'dots'),
    'model.position_embedding': _one_of('sinusoidal', 'learned', 'rope'),
    'optim.schedule': _one_of('rsqrt', 'cosine'),
    # 'spm_vocab': SentencePiece per side onto a fixed vocabulary (imported models).
    'tokenizer.model_type': _one_of('unigram', 'bpe', 'char', 'spm_vocab'),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of `config`: each field of
  FIELD_RULES alone, then the rules between fields."""
  for field, rule in FIELD_RULES.items():
    value = config
    for part in field.split('.'):
      value = value[part]
    _require(rule.holds(value), field, f'must be {rule.wanted}, got {value!r}')
  _check_combinations(config)
  _check_data_lists(config)


def _check_combinations(config) -> None:
  """The rules between fields (each field's own value is valid by now)."""
  data, model, optim = config.data, config.model, config.optim
  _require(optim.loss_chunks <= data.max_target_length, 'optim.loss_chunks',
           f'{optim.loss_chunks} slices of data.max_target_length={data.max_target_length} '
           f'tokens leave some empty')
  _require(data.batch_size % optim.grad_accum_steps == 0, 'optim.grad_accum_steps',
           f'data.batch_size={data.batch_size} must divide by '
           f'grad_accum_steps={optim.grad_accum_steps}')
  dot_product = model.attention == 'dot_product'
  problem = layers.attention_problem(model.attention, model.attention_dropout_rate)
  _require(problem is None, 'model.attention_dropout_rate', str(problem))
  _require(dot_product or not model.attention_implementation,
           'model.attention_implementation', "applies to model.attention='dot_product' "
           f'only, got {model.attention_implementation!r} with {model.attention!r}')
  _require(model.attention_implementation != 'cudnn' or model.dtype == 'bfloat16',
           'model.attention_implementation', "'cudnn' needs model.dtype='bfloat16' (no "
           f'float32 kernel), got {model.dtype!r}')
  _require(model.d_model % model.num_heads == 0, 'model.num_heads',
           f'd_model={model.d_model} must divide by num_heads={model.num_heads}')
  head_dim = model.d_model // model.num_heads
  _require(model.position_embedding != 'rope' or head_dim % 2 == 0,
           'model.position_embedding', "'rope' rotates pairs of dimensions: the head "
           f'width d_model / num_heads = {head_dim} must be even')
  _require(data.valid_fraction + data.test_fraction < 0.9, 'data.test_fraction',
           'valid_fraction + test_fraction must leave training data')
  # SentencePiece needs room for the 4 special ids and 256 byte-fallback pieces.
  _require(config.tokenizer.model_type in ('char', 'spm_vocab')
           or config.tokenizer.vocab_size >= 300,
           'tokenizer.vocab_size',
           f'must be >= 300 (specials + byte fallback), got {config.tokenizer.vocab_size}')
  _require(bool(config.init_from) or not config.init_from_optimizer,
           'init_from_optimizer', 'keeps the optimizer state of config.init_from, which '
           'is empty')
  _require(bool(config.init_from) or config.init_from_weights == 'auto',
           'init_from_weights', f'{config.init_from_weights!r} picks weights of '
           'config.init_from, which is empty')
  _require(data.source_lang != data.target_lang and data.source_lang and
           data.target_lang, 'data.target_lang', 'source and target languages must be '
           f'two different names, got {data.source_lang!r} and {data.target_lang!r}')


def _check_data_lists(config) -> None:
  """The comma-separated lists of config.data: corpora, mixture weights, test sets."""
  data = config.data
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
  for field in ('tags', 'target_langs'):
    items = [item.strip() for item in data[field].split(',')] if data[field].strip() else []
    _require(not items or len(items) == max(len(corpora), 1), f'data.{field}',
             f'needs one entry per corpus of data.path ({max(len(corpora), 1)}, \'\' for '
             f'none), got {data[field]!r}')
    _require(all(item.replace('_', '').replace('-', '').isalnum() for item in items if item),
             f'data.{field}', f'entries are names of letters, digits, _ and -, got '
             f'{data[field]!r}')
  _require(data.target_tag_format.count('{}') == 1 and ' ' not in data.target_tag_format,
           'data.target_tag_format', "needs one '{}' (the language) and no space, got "
           f'{data.target_tag_format!r}')
  uses_tags = any(item.strip() for item in (data.tags + ',' + data.target_langs + ',' +
                                            config.tokenizer.reserved_tags).split(','))
  _require(not uses_tags or config.tokenizer.model_type in ('unigram', 'bpe'), 'data.tags',
           'tags are SentencePiece symbols: they need tokenizer.model_type unigram or bpe')
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


# Model fields added after some workdirs were written: absent from such a workdir's
# config, they mean the value they had then (the default), not a change.
_ADDED_FIELDS = {'model.attention_bias': False, 'model.output_bias': False,
                 'model.decoder_start': 'bos'}


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
  saved_flat = {**_ADDED_FIELDS, **_flatten(saved)}
  current_flat = {**_ADDED_FIELDS, **_flatten(current)}
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


# Fields a fine-tuning run may change from the run it starts from (config.init_from):
# besides the compute switches, regularisation only.
_FINE_TUNING_FREE = _HARMLESS_FIELDS | {'model.dropout_rate', 'model.attention_dropout_rate'}


def init_from_differences(saved: dict, current: dict) -> list[str]:
  """The differences, as 'field: old -> new' in field order, between the config of a
  run and that of a run starting from its parameters (config.init_from) that make
  those parameters unusable: the task, the model (but for the compute switches and
  dropout), the tokenizer's kind and size, and with learned positions the row
  lengths (the table's size)."""
  saved_flat = {**_ADDED_FIELDS, **_flatten(saved)}
  current_flat = {**_ADDED_FIELDS, **_flatten(current)}
  fields = ['task', 'tokenizer.model_type', 'tokenizer.vocab_size']
  fields += [field for field in set(saved_flat) | set(current_flat)
             if field.startswith('model.') and field not in _FINE_TUNING_FREE]
  if 'learned' in (saved_flat.get('model.position_embedding'),
                   current_flat.get('model.position_embedding')):
    fields += ['data.max_source_length', 'data.max_target_length']
  return [f'{field}: {saved_flat.get(field)!r} -> {current_flat.get(field)!r}'
          for field in sorted(fields) if saved_flat.get(field) != current_flat.get(field)]
