"""OPUS-MT / Marian transformer models as jaxnmt workdirs: `import_model(directory,
workdir, config)`.

The directory is the one Marian's authors publish: `decoder.yml` (naming the `.npz` and
the vocabulary `.yml` files), the `.npz` (parameters, and the training options as
`special:model.yml`), `source.spm` and `target.spm`. The result is a workdir with the
config, a `spm_vocab` tokenizer (data/tokenizer.VocabTokenizer) and checkpoint 0, which translate,
the eval worker, serve, average, export and training take like any run.

How Marian's transformer maps onto jaxnmt's model (BUILD_NOTES.md, "Marian models"):
- `transformer-preprocess ''`, `postprocess dan` (dropout, add, norm) is post-LN; `n` /
  `da` / `postprocess-top n` is pre-LN. Layer norms with epsilon 1e-6, as jaxnmt's.
- `transformer-ffn-activation` relu, swish (x sigmoid(x)) and gelu (Marian's x
  sigmoid(1.702 x): jaxnmt's 'gelu_sigmoid').
- Biases on every attention projection and on the logits (`attention_bias`,
  `output_bias`); the decoder starts from a zero vector (`decoder_start='zeros'`); the
  source ends in EOS; embeddings are scaled by sqrt(d_model); sinusoidal positions
  are laid out as jaxnmt's (sines of timescales 10000^(i / (D/2 - 1)), then cosines).
- One vocabulary for both sides, tied to the output (`tied-embeddings-all`), or
  separate embedding matrices of that vocabulary. Its ids are reordered to jaxnmt's
  (PAD 0, UNK 1, BOS 2, EOS 3): the rows jaxnmt adds (PAD and BOS where Marian has none,
  and padding up to a multiple of VOCAB_MULTIPLE, so that any tensor axis divides it)
  get zero embeddings and an output bias of ADDED_ROW_BIAS, so they are never produced.
"""

import logging
import os

import numpy as np
import yaml

from jaxnmt import config_lib
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.errors import ConfigError, UserError
from jaxnmt.interop import weights as weights_lib
from jaxnmt.runtime import files

VOCAB_MULTIPLE = 64
ADDED_ROW_BIAS = -100.0  # exp(-100) ~ 4e-44: never chosen, and label smoothing barely sees it
SPECIALS = ('<pad>', '<unk>', '<s>', '</s>')
_ACTIVATIONS = {'relu': 'relu', 'swish': 'swish', 'gelu': 'gelu_sigmoid'}
# Options that change the computation, and the value jaxnmt can run.
_REQUIRED = {
    'type': 'transformer',
    'transformer-decoder-autoreg': 'self-attention',
    'transformer-no-projection': False,
    'right-left': False,
}


class ImportError_(UserError):  # pylint: disable=invalid-name
  """The Marian model cannot be imported (a missing file, an unsupported option)."""


# ----------------------------------------------------------------------------- reading


def read_vocabulary(path: str) -> list[str]:
  """The tokens of a Marian vocabulary .yml, by id. Each entry is `token: id`, the token
  plain or quoted as YAML quotes it; read line by line (a YAML loader would turn tokens
  such as `yes` or `null` into other values)."""
  tokens = {}
  pending = None
  with open(path, encoding='utf-8') as handle:
    for number, line in enumerate(handle, 1):
      line = line.rstrip('\r\n')
      if not line.strip():
        continue
      if line.startswith('? '):  # a complex key: `? token` then `: id`
        pending = line[2:]
        continue
      if pending is not None and line.startswith(': '):
        token, index = pending, line[2:]
        pending = None
      else:
        token, colon, index = line.rpartition(':')
        if not colon:
          raise ImportError_(f'{path}:{number}: not a `token: id` line: {line[:80]!r}')
      token = token.strip() if not token.startswith(' ') else token
      if len(token) >= 2 and token[0] == token[-1] and token[0] in '"\'':
        token = yaml.safe_load(token)  # the quoted scalar alone: YAML's own unescaping
      try:
        tokens[int(index.strip())] = str(token)
      except ValueError:
        raise ImportError_(f'{path}:{number}: the id {index.strip()!r} is not a number') from None
  if sorted(tokens) != list(range(len(tokens))):
    raise ImportError_(f'{path}: the ids are not 0..{len(tokens) - 1}')
  return [tokens[i] for i in range(len(tokens))]


def _files(directory: str) -> tuple[str, list[str], str, str]:
  """(the .npz, the vocabulary .yml files, source.spm, target.spm) of a model directory."""
  if not os.path.isdir(directory):
    raise ImportError_(f'--input={directory}: no such directory')
  decoder = os.path.join(directory, 'decoder.yml')
  if not os.path.isfile(decoder):
    raise ImportError_(f'{decoder} not found: --input must be a Marian model directory as '
                       f'OPUS-MT publishes them (decoder.yml, the .npz, the vocabulary .yml, '
                       f'source.spm, target.spm)')
  with open(decoder, encoding='utf-8') as handle:
    listed = yaml.safe_load(handle) or {}
  models, vocabs = listed.get('models') or [], listed.get('vocabs') or []
  if len(models) != 1 or len(vocabs) != 2:
    raise ImportError_(f'{decoder}: expected one model and two vocabularies, got '
                       f'{len(models)} and {len(vocabs)} (ensembles are not imported)')
  resolved = [os.path.join(directory, name) for name in [models[0], *vocabs,
                                                         'source.spm', 'target.spm']]
  for path in resolved:
    if not os.path.isfile(path):
      raise ImportError_(f'{path} not found (named by {decoder} or needed beside it)')
  return resolved[0], resolved[1:3], resolved[3], resolved[4]


def _options(arrays) -> dict:
  if 'special:model.yml' not in arrays:
    raise ImportError_('the .npz holds no special:model.yml (the training options): not a '
                       'model Marian wrote')
  raw = bytes(arrays['special:model.yml']).rstrip(b'\0')
  return yaml.safe_load(raw.decode('utf-8')) or {}


# ----------------------------------------------------------------------------- options


def model_fields(options: dict, source: str) -> dict:
  """config.model fields for Marian `options` (its special:model.yml); an option that
  changes the computation and that jaxnmt lacks is an ImportError_ naming it."""
  def refuse(name, why):
    raise ImportError_(f'{source}: Marian option {name}={options.get(name)!r} {why}')

  for name, wanted in _REQUIRED.items():
    if name in options and options[name] != wanted:
      refuse(name, f'is not supported (jaxnmt runs {wanted!r})')
  activation = options.get('transformer-ffn-activation', 'swish')
  if activation not in _ACTIVATIONS:
    refuse('transformer-ffn-activation', f'is not supported (one of {sorted(_ACTIVATIONS)})')
  pre, post = options.get('transformer-preprocess', ''), options.get('transformer-postprocess', 'dan')
  top = options.get('transformer-postprocess-top', '')
  if (pre, post, top) == ('', 'dan', ''):
    pre_layer_norm = False
  elif (pre, post, top) == ('n', 'da', 'n'):
    pre_layer_norm = True
  else:
    refuse('transformer-preprocess', f"with postprocess={post!r}, postprocess-top={top!r} is "
           "not supported (post-LN '', 'dan', '' or pre-LN 'n', 'da', 'n')")
  if options.get('transformer-postprocess-emb', 'd') not in ('d', ''):
    refuse('transformer-postprocess-emb', "is not supported ('d' or '')")
  if options.get('transformer-ffn-depth', 2) != 2:
    refuse('transformer-ffn-depth', 'is not supported (2)')
  for name, base in (('transformer-decoder-ffn-depth', 'transformer-ffn-depth'),
                     ('transformer-decoder-dim-ffn', 'transformer-dim-ffn')):
    if options.get(name) not in (None, 0, options.get(base)):
      refuse(name, f'differs from {base}: jaxnmt has one feed-forward shape')
  if options.get('transformer-tied-layers'):
    refuse('transformer-tied-layers', 'is not supported')
  if options.get('lemma-dim-emb', 0) or options.get('factors-dim-emb', 0):
    refuse('factors-dim-emb', 'is not supported (factored vocabularies)')
  if options.get('guided-alignment', 'none') not in ('none', '', None):
    logging.warning('%s: the guided-alignment layer is ignored (jaxnmt does not output '
                    'alignments); translations are unchanged', source)
  dim = int(options['dim-emb'])
  heads = int(options.get('transformer-heads', 8))
  if dim % heads:
    refuse('transformer-heads', f'does not divide dim-emb={dim}')
  return {
      'num_encoder_layers': int(options.get('enc-depth', 6)),
      'num_decoder_layers': int(options.get('dec-depth', 6)),
      'd_model': dim, 'num_heads': heads,
      'd_ff': int(options.get('transformer-dim-ffn', 2048)),
      'activation': _ACTIVATIONS[activation],
      'pre_layer_norm': pre_layer_norm,
      'norm': 'layernorm',
      'position_embedding': ('learned' if options.get('transformer-train-position-embeddings')
                             else 'sinusoidal'),
      'share_embeddings': bool(options.get('tied-embeddings-all', False)),
      'attention_bias': True, 'output_bias': True, 'decoder_start': 'zeros',
      'dropout_rate': float(options.get('transformer-dropout', 0.1) or 0.0),
      'attention_dropout_rate': float(options.get('transformer-dropout-attention', 0.0) or 0.0),
  }


# ----------------------------------------------------------------------------- weights


def _vocabulary_order(marian: list[str]) -> tuple[list[str], np.ndarray]:
  """(jaxnmt's pieces, padded; for each of them the Marian id or -1 for an added row)."""
  index = {token: i for i, token in enumerate(marian)}
  pieces = list(SPECIALS) + [token for token in marian if token not in SPECIALS]
  size = -(-len(pieces) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  pieces += [f'<unused_{i}>' for i in range(len(pieces), size)]
  return pieces, np.array([index.get(token, -1) for token in pieces])


def _rows(table: np.ndarray, order: np.ndarray, fill: float = 0.0) -> np.ndarray:
  """Rows (axis 0) of a Marian [V, ...] array in jaxnmt's order; added rows `fill`."""
  out = np.full((len(order), *table.shape[1:]), fill, np.float32)
  present = order >= 0
  out[present] = table[order[present]]
  return out


def convert(arrays, fields: dict, order: np.ndarray, source: str) -> dict[str, np.ndarray]:
  """Marian parameters -> jaxnmt's flat parameters (interop/weights.py names)."""
  get = lambda name: np.asarray(arrays[name], np.float32)
  suffix = '_pre' if fields['pre_layer_norm'] else ''
  d_model, heads = fields['d_model'], fields['num_heads']
  out = {}

  def need(name):
    if name not in arrays:
      raise ImportError_(f'{source}: no tensor {name} (not a Marian transformer of the '
                         f'options in its special:model.yml?)')
    return get(name)

  def attention(jax_prefix, marian_prefix):
    for kind, letter in (('query', 'q'), ('key', 'k'), ('value', 'v')):
      out[f'{jax_prefix}.{kind}'] = need(f'{marian_prefix}_W{letter}').reshape(
          d_model, heads, -1)
      out[f'{jax_prefix}.{kind}_bias'] = need(f'{marian_prefix}_b{letter}').reshape(heads, -1)
    out[f'{jax_prefix}.out'] = need(f'{marian_prefix}_Wo').reshape(heads, -1, d_model)
    out[f'{jax_prefix}.out_bias'] = need(f'{marian_prefix}_bo').reshape(-1)

  def norm(jax_name, marian_name):
    out[f'{jax_name}.scale'] = need(f'{marian_name}_ln_scale{suffix}').reshape(-1)
    out[f'{jax_name}.bias'] = need(f'{marian_name}_ln_bias{suffix}').reshape(-1)

  for stack, count in (('encoder', fields['num_encoder_layers']),
                       ('decoder', fields['num_decoder_layers'])):
    for layer in range(count):
      jax_layer, marian_layer = f'{stack}_layers.{layer}', f'{stack}_l{layer + 1}'
      attention(f'{jax_layer}.self_attention', f'{marian_layer}_self')
      norm(f'{jax_layer}.self_attention_norm', f'{marian_layer}_self_Wo')
      if stack == 'decoder':
        attention(f'{jax_layer}.cross_attention', f'{marian_layer}_context')
        norm(f'{jax_layer}.cross_attention_norm', f'{marian_layer}_context_Wo')
      out[f'{jax_layer}.mlp.wi'] = need(f'{marian_layer}_ffn_W1')
      out[f'{jax_layer}.mlp.bi'] = need(f'{marian_layer}_ffn_b1').reshape(-1)
      out[f'{jax_layer}.mlp.wo'] = need(f'{marian_layer}_ffn_W2')
      out[f'{jax_layer}.mlp.bo'] = need(f'{marian_layer}_ffn_b2').reshape(-1)
      norm(f'{jax_layer}.mlp_norm', f'{marian_layer}_ffn_ffn')
    if fields['pre_layer_norm']:
      out[f'{stack}_norm.scale'] = need(f'{stack}_top_ln_scale').reshape(-1)
      out[f'{stack}_norm.bias'] = need(f'{stack}_top_ln_bias').reshape(-1)

  if fields['share_embeddings']:
    out['source_embed.embedding'] = _rows(need('Wemb'), order)
  else:
    source_table = get('encoder_Wemb') if 'encoder_Wemb' in arrays else need('Wemb')
    target_table = get('decoder_Wemb') if 'decoder_Wemb' in arrays else need('Wemb')
    out['source_embed.embedding'] = _rows(source_table, order)
    out['target_embed.embedding'] = _rows(target_table, order)
    if 'decoder_ff_logit_out_W' in arrays:  # untied output layer [D, V]
      out['output_kernel'] = _rows(get('decoder_ff_logit_out_W').T, order).T.copy()
    else:  # tied-embeddings: the decoder's embedding is the output layer (copied)
      logging.warning('%s: the output layer is tied to the decoder embedding only '
                      '(tied-embeddings); jaxnmt keeps the two as separate copies, which '
                      'fine-tuning updates apart', source)
      out['output_kernel'] = out['target_embed.embedding'].T.copy()
  bias = (get('decoder_ff_logit_out_b').reshape(-1) if 'decoder_ff_logit_out_b' in arrays
          else np.zeros(int(order.max()) + 1, np.float32))  # output-omit-bias
  out['output_bias'] = _rows(bias[:, None], order, ADDED_ROW_BIAS)[:, 0]
  if fields['position_embedding'] == 'learned':
    for side, name in (('source_positions', 'encoder_Wpos'), ('target_positions', 'decoder_Wpos')):
      out[f'{side}.table'] = get(name) if name in arrays else need('Wpos')
  return out


# ----------------------------------------------------------------------------- import


MARIAN_TAG_FORMAT = '>>{}<<'


def import_model(directory: str, workdir: str, config) -> dict:
  """Writes `workdir` from the Marian model in `directory`: `config` (a run config,
  e.g. configs/base.py's) with its model and tokenizer fields set from the model."""
  if files.has_run(workdir):
    raise ImportError_(f'--workdir={workdir} already holds a run: import into a new one')
  npz, vocabularies, source_spm, target_spm = _files(directory)
  source = os.path.basename(npz)
  try:
    arrays = dict(np.load(npz))
  except Exception as error:  # pylint: disable=broad-except  # zip, pickle, truncation
    raise ImportError_(f'{npz} could not be read as .npz: {type(error).__name__}: '
                       f'{str(error)[:200]}') from None
  fields = model_fields(_options(arrays), source)
  marian_vocabulary = read_vocabulary(vocabularies[0])
  if read_vocabulary(vocabularies[1]) != marian_vocabulary:
    raise ImportError_(f'{vocabularies[0]} and {vocabularies[1]} differ: models with a '
                       f'vocabulary per side are not imported (jaxnmt shares one)')
  pieces, order = _vocabulary_order(marian_vocabulary)
  embedding = arrays.get('Wemb', arrays.get('encoder_Wemb'))
  if embedding is not None and embedding.shape[0] != len(marian_vocabulary):
    raise ImportError_(f'{source}: the embedding has {embedding.shape[0]} rows, the '
                       f'vocabulary {vocabularies[0]} {len(marian_vocabulary)} tokens')
  flat = convert(arrays, fields, order, source)
  config = config.copy_and_resolve_references()
  config.model.update(fields)
  config.tokenizer.model_type = 'spm_vocab'
  config.tokenizer.vocab_size = len(pieces)
  if any(map(tokenizer_lib.is_language_tag, marian_vocabulary)):
    # A multilingual OPUS-MT model: the source starts with `>>spa<<` (--target_lang=spa).
    config.data.target_tag_format = MARIAN_TAG_FORMAT
  if fields['position_embedding'] == 'learned':  # the table's rows are the longest input
    rows = flat['source_positions.table'].shape[0]
    config.data.max_source_length = config.data.max_target_length = rows
  try:
    config_lib.validate(config)
  except ConfigError as error:
    raise ImportError_(f'{source}: the imported config is not valid: {error}') from None
  model_cfg = config_lib.model_config(config, len(pieces))
  params = weights_lib.to_state(model_cfg, flat, source)
  files.makedirs(workdir)
  with open(source_spm, 'rb') as handle:
    source_model = handle.read()
  with open(target_spm, 'rb') as handle:
    target_model = handle.read()
  tokenizer_lib.write_vocab_tokenizer(files.tokenizer_path(workdir), pieces, source_model, target_model)
  weights_lib.write_workdir(workdir, config, params)
  return {'workdir': workdir, 'model': source, 'vocabulary': len(marian_vocabulary),
          'padded_vocabulary': len(pieces), 'fields': fields}
