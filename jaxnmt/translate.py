"""`--mode=translate`: a checkpoint translates lines of text.

Lines are sorted by length and decoded in batches of a few padded shapes (beam search
by default, or greedy, or sampling), split over this process's devices, then written
back in input order: one output line per input line, empty for empty.
"""

import dataclasses
import functools
import logging
import math
import sys
from typing import Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt import decode
from jaxnmt import inference
from jaxnmt import tokenizer as tokenizer_lib
from jaxnmt.errors import UserError

LENGTH_BUCKET = 16  # sources are padded to a multiple of this: few compiled shapes


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """beam_size > 1: beam search; temperature > 0: sampling; else greedy."""
  beam_size: int = 4
  length_penalty: float = 0.6
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  use_cache: bool = True

  @property
  def strategy(self) -> str:
    if self.temperature > 0:
      return 'sample'
    return 'beam' if self.beam_size > 1 else 'greedy'


class Translator:
  """A loaded model (`inference.load`) and a jitted batched decoder on its devices
  (parameters replicated, sentences split over the devices)."""

  def __init__(self, loaded: inference.LoadedModel, options: DecodeOptions = DecodeOptions()):
    if loaded.config.get('task') == 'lm':
      raise UserError('this workdir holds a language model: use --mode=generate')
    self.loaded, self.options = loaded, options
    self.config, self.tokenizer = loaded.config, loaded.tokenizer
    self.mesh = loaded.mesh
    self._decode = jax.jit(functools.partial(_decode_batch, loaded.graphdef, loaded.rest,
                                             options),
                           static_argnames=('max_length',))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   options: DecodeOptions = DecodeOptions(), devices=None) -> 'Translator':
    return cls(inference.load(workdir, step, devices), options)

  @property
  def step(self) -> int | None:
    return self.loaded.step

  def translate(self, lines: Sequence[str], batch_size: int = 64,
                progress: bool = False) -> list[str]:
    """Translations of `lines`, in order ('' for blank lines)."""
    data = self.config.data
    max_source = data.max_source_length
    devices = self.mesh.devices.size
    batch_size = devices * math.ceil(batch_size / devices)
    encoded, truncated = {}, 0
    for index, line in enumerate(lines):
      if line.strip():
        ids = self.tokenizer.encode(line.strip())
        if len(ids) > max_source - 1:
          truncated += 1
          ids = ids[:max_source - 1]
        encoded[index] = ids + [tokenizer_lib.EOS_ID]
    if truncated:
      logging.warning('%d input lines are longer than %d tokens and were truncated',
                      truncated, max_source - 1)
    outputs = [''] * len(lines)
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    starts = range(0, len(order), batch_size)
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm.tqdm(starts, desc='translate', unit='batch')
    rows_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    for batch_number, start in enumerate(starts):
      rows = order[start:start + batch_size]
      length = min(max_source, LENGTH_BUCKET * math.ceil(
          max(len(encoded[i]) for i in rows) / LENGTH_BUCKET))
      inputs = np.zeros((batch_size, length), np.int32)
      max_lengths = np.ones((batch_size,), np.int32)
      for row, index in enumerate(rows):
        inputs[row, :len(encoded[index])] = encoded[index]
        max_lengths[row] = min(data.max_target_length, int(
            self.config.decode.max_length_ratio * len(encoded[index])
            + self.config.decode.max_length_offset))
      key = jax.random.fold_in(jax.random.key(self.options.seed), batch_number)
      tokens = self._decode(self.loaded.params, jax.device_put(inputs, rows_sharding),
                            jax.device_put(max_lengths, rows_sharding), key,
                            max_length=data.max_target_length)
      tokens = np.asarray(tokens)
      for row, index in enumerate(rows):
        outputs[index] = self.tokenizer.decode(tokens[row])
    return outputs


def _decode_batch(graphdef, rest, options: DecodeOptions, params, inputs, max_lengths, key,
                  *, max_length: int):
  """inputs: int32 [B, S] (0 = pad) -> best output tokens int32 [B, max_length]."""
  model = nnx.merge(graphdef, params, rest)
  segment_ids = (inputs != 0).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
  encoded = model.encode(inputs, segment_ids, positions, deterministic=True)
  if options.use_cache:
    cache, step_fn = model.init_cache(encoded, segment_ids, max_length), model.decode_step
  else:
    cache = model.init_uncached(encoded, segment_ids, max_length)
    step_fn = model.decode_step_uncached
  batch = inputs.shape[0]
  bos, eos = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
  if options.strategy == 'sample':
    return decode.sample(step_fn, cache, batch, max_length, bos, eos, key,
                         options.temperature, options.top_k, options.top_p, max_lengths)
  if options.strategy == 'beam':
    tokens, _ = decode.beam_search(step_fn, cache, batch, options.beam_size, max_length,
                                   bos, eos, options.length_penalty, max_lengths)
    return tokens[:, 0]
  return decode.greedy(step_fn, cache, batch, max_length, bos, eos, max_lengths)


def run(workdir: str, input_path: str | None, output: TextIO = sys.stdout,
        batch_size: int = 64, options: DecodeOptions = DecodeOptions()) -> None:
  """Reads lines from `input_path` (or stdin), writes translations to `output`."""
  if input_path:
    try:
      with open(input_path, encoding='utf-8', errors='replace') as handle:
        lines = handle.read().splitlines()
    except OSError as error:
      raise UserError(f'--input={input_path}: {error.strerror}') from None
  translator = Translator.from_workdir(workdir, options=options)
  if not input_path:
    lines = sys.stdin.read().splitlines()
  for line in translator.translate(lines, batch_size=batch_size, progress=bool(input_path)):
    output.write(line + '\n')
  output.flush()
