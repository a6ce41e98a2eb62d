"""jaxnmt models as CTranslate2 models: `export(workdir, output, ...)`.

The model is described with the `ctranslate2` package's own specification API, as its
converters do (a `Converter` whose `_load` returns the spec), and saved with its
quantization: a translation model as a `TransformerSpec` (load it with
`ctranslate2.Translator`), a language model as a `TransformerDecoderModelSpec`
(`ctranslate2.Generator`). Every jaxnmt model option maps onto the spec:

| jaxnmt (`config.model`) | CTranslate2 |
|---|---|
| pre_layer_norm | pre_norm (post-LN: a norm after each residual, no final norm) |
| norm 'layernorm' / 'rmsnorm' | LayerNormSpec / rms_norm, epsilon 1e-6 |
| activation relu, gelu, gelu_sigmoid, swish, swiglu | RELU, GELUTanh, GELUSigmoid, SWISH, SWISH with ffn_glu |
| position_embedding sinusoidal | jaxnmt's table for SINUSOIDAL_POSITIONS positions |
| position_embedding learned | position_encodings.encodings = the table |
| position_embedding rope | rotary_dim=0 (whole head), rotary_interleave=False |
| share_embeddings | one array for the embeddings and projection, or three |
| attention_bias, output_bias | the linear layers' biases |
| decoder_start 'zeros' | start_from_zero_embedding |

Embeddings are scaled by sqrt(d_model) on both sides, and the source gets its EOS
appended by CTranslate2 (`add_source_eos`), as jaxnmt's translate does. Beside the model
go the tokenizer files (`source.spm`/`target.spm`, or `sentencepiece.model`, or the
character list) and a README.md on loading it.
"""

import json
import os
import shutil

import ctranslate2
import ml_dtypes
import numpy as np
from ctranslate2.converters.converter import Converter
from ctranslate2.specs import common_spec, model_spec, transformer_spec

from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.errors import ConfigError, UserError
from jaxnmt.interop import weights as weights_lib
from jaxnmt.model import layers
from jaxnmt.model import transformer

QUANTIZATIONS = ('float32', 'int8', 'int8_float32', 'int8_float16', 'int16', 'float16',
                 'bfloat16', 'int8_bfloat16')
# CTranslate2's converter casts to bfloat16 through torch, which jaxnmt does not
# install; given arrays that are bfloat16 already (ml_dtypes, JAX's numpy bfloat16) it
# writes them as they are.
BFLOAT16 = ('bfloat16', 'int8_bfloat16')
ACTIVATIONS = {'relu': common_spec.Activation.RELU,
               'gelu': common_spec.Activation.GELUTanh,
               'gelu_sigmoid': common_spec.Activation.GELUSigmoid,
               'swish': common_spec.Activation.SWISH,
               'swiglu': common_spec.Activation.SWISH}
SPECIALS = ('<pad>', '<unk>', '<s>', '</s>')  # ids 0-3, as data/tokenizer.py
LAYER_NORM_EPSILON = 1e-6  # as model/layers.py
# Positions a sinusoidal model's table covers (CTranslate2 reads the table; its own
# differs from jaxnmt's in the last digits).
SINUSOIDAL_POSITIONS = 1024


class ExportError(UserError):
  """The model cannot be written as asked (an option the format cannot express, an
  output directory in the way)."""


def problem(model_cfg: transformer.ModelConfig) -> str | None:
  """Why CTranslate2 cannot run `model_cfg` as jaxnmt does (None: it can)."""
  if model_cfg.activation not in ACTIVATIONS:
    return f'model.activation={model_cfg.activation!r} has no CTranslate2 counterpart'
  if model_cfg.kind == 'decoder_lm' and model_cfg.decoder_start == 'zeros':
    # The Generator zeroes the first *generated* step's input, not position 0's: its
    # scores match jaxnmt, its generations do not (tests/interop).
    return ("model.decoder_start='zeros' in a language model: ctranslate2.Generator "
            'applies the zero start at the first generated token, not at position 0')
  return None


# ----------------------------------------------------------------------------- the spec


class _Weights:
  """The flat parameters of one model, read as CTranslate2 lays them out."""

  def __init__(self, model_cfg: transformer.ModelConfig, arrays: dict[str, np.ndarray]):
    self.config = model_cfg
    self.arrays = arrays

  def get(self, name: str) -> np.ndarray | None:
    return self.arrays.get(name)

  def norm(self, spec, name: str) -> None:
    spec.gamma = self.arrays[f'{name}.scale']
    if self.config.norm == 'layernorm':
      spec.beta = self.arrays[f'{name}.bias']

  def _projection(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[D, N, H] kernel (and [N, H] bias) -> CTranslate2's [N*H, D] weight, [N*H] bias."""
    kernel = self.arrays[f'{name}']
    bias = self.get(f'{name}_bias')
    return (np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T),
            None if bias is None else bias.reshape(-1))

  def attention(self, spec, prefix: str, norm: str, fused: bool) -> None:
    """Self-attention (`fused`: one [3*N*H, D] projection) or cross-attention (query,
    then keys and values fused)."""
    self.norm(spec.layer_norm, norm)
    parts = [self._projection(f'{prefix}.{kind}') for kind in ('query', 'key', 'value')]
    groups = [parts] if fused else [parts[:1], parts[1:]]
    for linear, group in zip(spec.linear, groups):
      linear.weight = np.concatenate([weight for weight, _ in group])
      if group[0][1] is not None:
        linear.bias = np.concatenate([bias for _, bias in group])
    out = self.arrays[f'{prefix}.out']  # [N, H, D]
    spec.linear[-1].weight = np.ascontiguousarray(out.reshape(-1, out.shape[-1]).T)
    if self.get(f'{prefix}.out_bias') is not None:
      spec.linear[-1].bias = self.arrays[f'{prefix}.out_bias']

  def ffn(self, spec, prefix: str) -> None:
    self.norm(spec.layer_norm, f'{prefix}_norm')
    inner = spec.linear_0
    if self.config.activation == 'swiglu':  # act(x Wg) * (x Wi + bi): linear_0 is the gate
      spec.linear_0.weight = self.arrays[f'{prefix}.wg'].T.copy()
      inner = spec.linear_0_noact
    inner.weight, inner.bias = self.arrays[f'{prefix}.wi'].T.copy(), self.arrays[f'{prefix}.bi']
    spec.linear_1.weight = self.arrays[f'{prefix}.wo'].T.copy()
    spec.linear_1.bias = self.arrays[f'{prefix}.bo']

  def layers(self, specs, stack: str, cross: bool) -> None:
    for index, spec in enumerate(specs):
      prefix = f'{stack}.{index}'
      self.attention(spec.self_attention, f'{prefix}.self_attention',
                     f'{prefix}.self_attention_norm', fused=True)
      if cross:
        self.attention(spec.attention, f'{prefix}.cross_attention',
                       f'{prefix}.cross_attention_norm', fused=False)
      self.ffn(spec.ffn, f'{prefix}.mlp')

  def side(self, spec, embedding: str, positions: str, final_norm: str) -> None:
    """Embeddings, positions and the final norm of the encoder or a decoder."""
    embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    embeddings.weight = self.arrays[embedding]
    spec.scale_embeddings = True  # x sqrt(d_model), as layers.Embed
    if self.config.position_embedding == 'learned':
      spec.position_encodings.encodings = self.arrays[f'{positions}.table']
    elif self.config.position_embedding == 'sinusoidal':  # jaxnmt's table, exactly
      spec.position_encodings.encodings = np.asarray(layers.sinusoidal_positions(
          np.arange(SINUSOIDAL_POSITIONS)[None], self.config.d_model)[0])
    if self.config.pre_layer_norm:
      self.norm(spec.layer_norm, final_norm)

  def projection(self, spec, embedding: str) -> None:
    """The output layer: the embedding (tied) or the output kernel, and its bias."""
    kernel = self.get('output_kernel')
    spec.weight = self.arrays[embedding] if kernel is None else kernel.T.copy()
    if self.get('output_bias') is not None:
      spec.bias = self.arrays['output_bias']


def _stack_options(model_cfg: transformer.ModelConfig) -> dict:
  options = dict(pre_norm=model_cfg.pre_layer_norm, activation=ACTIVATIONS[model_cfg.activation],
                 ffn_glu=model_cfg.activation == 'swiglu', rms_norm=model_cfg.norm == 'rmsnorm')
  if model_cfg.position_embedding == 'rope':  # pairs (i, i + H/2): not interleaved
    options.update(rotary_dim=0, rotary_interleave=False, rotary_base=10_000)
  return options


def build_spec(model_cfg: transformer.ModelConfig, arrays: dict[str, np.ndarray],
               vocabulary: list[str], source_vocabulary: list[str] | None = None):
  """The CTranslate2 spec of a jaxnmt model of `model_cfg` with parameters `arrays`
  (weights.flat); `vocabulary`: the target (or only) vocabulary, one token per id."""
  why = problem(model_cfg)
  if why:
    raise ExportError(f'cannot export to CTranslate2: {why}')
  weights = _Weights(model_cfg, arrays)
  options = _stack_options(model_cfg)
  if model_cfg.kind == 'decoder_lm':
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        model_cfg.num_decoder_layers, model_cfg.num_heads, **options)
    weights.side(spec.decoder, 'embed.embedding', 'positions', 'final_norm')
    weights.layers(spec.decoder.layer, 'decoder_layers', cross=False)
    weights.projection(spec.decoder.projection, 'embed.embedding')
    spec.decoder.start_from_zero_embedding = model_cfg.decoder_start == 'zeros'
    spec.register_vocabulary(vocabulary)
  else:
    encoder = transformer_spec.TransformerEncoderSpec(
        model_cfg.num_encoder_layers, model_cfg.num_heads, **options)
    decoder = transformer_spec.TransformerDecoderSpec(
        model_cfg.num_decoder_layers, model_cfg.num_heads, **options)
    spec = transformer_spec.TransformerSpec(encoder, decoder)
    weights.side(spec.encoder, 'source_embed.embedding', 'source_positions', 'encoder_norm')
    weights.layers(spec.encoder.layer, 'encoder_layers', cross=False)
    target_embedding = ('source_embed.embedding' if model_cfg.share_embeddings
                        else 'target_embed.embedding')
    weights.side(spec.decoder, target_embedding, 'target_positions', 'decoder_norm')
    weights.layers(spec.decoder.layer, 'decoder_layers', cross=True)
    weights.projection(spec.decoder.projection, target_embedding)
    spec.decoder.start_from_zero_embedding = model_cfg.decoder_start == 'zeros'
    spec.register_source_vocabulary(source_vocabulary or vocabulary)
    spec.register_target_vocabulary(vocabulary)
    spec.config.add_source_eos = True  # as translate appends EOS to every source
  spec.config.layer_norm_epsilon = LAYER_NORM_EPSILON
  spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = SPECIALS[1:]
  return spec


class _SpecConverter(Converter):
  """A ready spec through CTranslate2's own conversion path (validate, quantize, save)."""

  def __init__(self, spec):
    self._spec = spec

  def _load(self):
    return self._spec


def _to_bfloat16(spec, seen: set | None = None) -> None:
  """Every float32 array of `spec` (and its sub-specs) cast to bfloat16 in place."""
  seen = set() if seen is None else seen
  if id(spec) in seen:
    return
  seen.add(id(spec))
  for name, value in list(vars(spec).items()):
    if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim:
      setattr(spec, name, value.astype(ml_dtypes.bfloat16))
    for child in value if isinstance(value, list) else [value]:
      if isinstance(child, model_spec.LayerSpec):
        _to_bfloat16(child, seen)


def save(spec, output: str, quantization: str = 'float32', force: bool = False) -> str:
  if quantization not in QUANTIZATIONS:
    raise ConfigError(f'--quantization={quantization}: one of {", ".join(QUANTIZATIONS)}')
  if os.path.exists(output) and not force:
    raise ExportError(f'--output={output} exists: give a new directory (nothing there was '
                      f'changed)')
  if quantization in BFLOAT16:
    _to_bfloat16(spec)
  return _SpecConverter(spec).convert(output, quantization=quantization, force=force)


# ----------------------------------------------------------------------------- vocabulary


def vocabulary(tokenizer, size: int) -> list[str]:
  """One token string per model id: the tokenizer's pieces (ids 0-3 named as
  CTranslate2 expects them), then placeholders up to the model's (padded) size."""
  tokens = list(tokenizer.pieces)
  tokens[:len(SPECIALS)] = SPECIALS
  taken = set(tokens)
  if len(taken) != len(tokens):
    raise ExportError('the tokenizer has repeated pieces: CTranslate2 maps tokens by string')
  padding = [f'<unused_{i}>' for i in range(len(tokens), size)]
  if taken & set(padding):
    raise ExportError('the tokenizer has pieces named <unused_N>, which export uses for '
                      'padding rows')
  return (tokens + padding)[:size]


def write_tokenizer_files(tokenizer, output: str) -> list[str]:
  """The files a user of the export tokenizes with, beside the model."""
  if hasattr(tokenizer, 'write_sentencepiece'):
    return tokenizer.write_sentencepiece(output)
  if isinstance(tokenizer, tokenizer_lib.CharTokenizer):
    path = os.path.join(output, 'characters.json')
    with open(path, 'w', encoding='utf-8') as handle:
      json.dump({'characters': tokenizer.characters}, handle, ensure_ascii=False)
    return ['characters.json']
  shutil.copyfile(tokenizer.model_path, os.path.join(output, 'sentencepiece.model'))
  return ['sentencepiece.model']


def _readme(model_cfg, tokenizer_files: list[str], quantization: str, source: str) -> str:
  spm = [name for name in tokenizer_files if name.endswith(('.spm', '.model'))]
  source_spm, target_spm = (spm * 2)[:2] if len(spm) < 2 else spm
  if model_cfg.kind == 'decoder_lm':
    usage = (f'sp = sentencepiece.SentencePieceProcessor(model_file="{target_spm}")\n'
             'generator = ctranslate2.Generator(".")\n'
             'tokens = ["<s>"] + sp.encode("Once upon a time", out_type=str)\n'
             'result = generator.generate_batch([tokens], max_length=64, sampling_topk=10)\n'
             'print(sp.decode(result[0].sequences[0]))\n')
  else:
    usage = (f'source = sentencepiece.SentencePieceProcessor(model_file="{source_spm}")\n'
             f'target = sentencepiece.SentencePieceProcessor(model_file="{target_spm}")\n'
             'translator = ctranslate2.Translator(".")  # compute_type="int8" etc.\n'
             'tokens = source.encode("Where is the train station?", out_type=str)\n'
             'result = translator.translate_batch([tokens], beam_size=4)\n'
             'print(target.decode(result[0].hypotheses[0]))\n')
  if not spm:
    usage = '(a character model: one token per character, see characters.json)\n'
  return ('# A jaxnmt model for CTranslate2\n\n'
          f'Exported from {source} ({quantization} weights). Run it from this directory:\n\n'
          f'```python\nimport ctranslate2, sentencepiece\n{usage}```\n')


def export(loaded, output: str, quantization: str = 'float32', force: bool = False) -> dict:
  """Writes the model of `loaded` (decoding/inference.load) as a CTranslate2 model
  directory at `output`; returns what was written."""
  model_cfg = loaded.model_config
  arrays = weights_lib.flat(loaded.params)
  target_vocabulary = vocabulary(loaded.tokenizer, model_cfg.vocab_size)
  spec = build_spec(model_cfg, arrays, target_vocabulary)
  save(spec, output, quantization, force)
  names = write_tokenizer_files(loaded.tokenizer, output)
  source = f'step {loaded.step}, {loaded.weights} weights' if loaded.step is not None else (
      f'{loaded.weights} weights')
  with open(os.path.join(output, 'README.md'), 'w', encoding='utf-8') as handle:
    handle.write(_readme(model_cfg, names, quantization, source))
  return {'output': output, 'kind': model_cfg.kind, 'quantization': quantization,
          'files': sorted(os.listdir(output)), 'ctranslate2': ctranslate2.__version__}
