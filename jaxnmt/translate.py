"""`--mode=translate`: the workdir's latest checkpoint translates lines of text.

Lines are sorted by length and decoded in batches of a few padded shapes, then written
back in input order: one output line per input line, empty for empty.
"""

import functools
import logging
import math
import sys
from typing import Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnmt import checkpoint as checkpoint_lib
from jaxnmt import decode
from jaxnmt import optim
from jaxnmt import tokenizer as tokenizer_lib
from jaxnmt import train

LENGTH_BUCKET = 16  # sources are padded to a multiple of this: few compiled shapes


class Translator:
  """A trained model, its tokenizer and a jitted greedy decoder."""

  def __init__(self, workdir: str, step: int | None = None):
    self.config = train.load_config(workdir)
    self.tokenizer = train.load_tokenizer(self.config, workdir)
    model_cfg = train.model_config(self.config, self.tokenizer.vocab_size)
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise checkpoint_lib.CheckpointError(f'no checkpoint in {checkpointer.directory}')
    tx, _ = optim.make_optimizer(self.config.optim, self.config.num_train_steps)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                              sharding=device),
                            train.abstract_train_state(model_cfg, tx))
    state, _ = checkpointer.restore(step, abstract)
    checkpointer.close()
    self.step = step
    self.params = state['params']
    self.graphdef, _, self.rest = train.create_model(model_cfg, 0)
    logging.info('Loaded checkpoint %d from %s', step, workdir)
    self._decode = jax.jit(functools.partial(_greedy_decode, self.graphdef, self.rest),
                           static_argnames=('max_length',))

  def translate(self, lines: Sequence[str], batch_size: int = 64,
                progress: bool = False) -> list[str]:
    """Translations of `lines`, in order ('' for blank lines)."""
    data = self.config.data
    max_source = data.max_source_length
    encoded = {}
    truncated = 0
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
    batches = range(0, len(order), batch_size)
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      batches = tqdm.tqdm(batches, desc='translate', unit='batch')
    for start in batches:
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
      tokens = np.asarray(self._decode(self.params, inputs, max_lengths,
                                       max_length=data.max_target_length))
      for row, index in enumerate(rows):
        outputs[index] = self.tokenizer.decode(tokens[row])
    return outputs


def _greedy_decode(graphdef, rest, params, inputs, max_lengths, *, max_length: int):
  """inputs: int32 [B, S] (0 = pad) -> tokens int32 [B, max_length]."""
  model = nnx.merge(graphdef, params, rest)
  segment_ids = (inputs != 0).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
  encoded = model.encode(inputs, segment_ids, positions, deterministic=True)
  cache = model.init_cache(encoded, segment_ids, max_length)
  return decode.greedy(model.decode_step, cache, inputs.shape[0], max_length,
                       tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, max_lengths)


def run(workdir: str, input_path: str | None, output: TextIO = sys.stdout,
        batch_size: int = 64) -> None:
  """Reads lines from `input_path` (or stdin), writes translations to `output`."""
  translator = Translator(workdir)
  if input_path:
    with open(input_path, encoding='utf-8', errors='replace') as handle:
      lines = handle.read().splitlines()
  else:
    lines = sys.stdin.read().splitlines()
  for line in translator.translate(lines, batch_size=batch_size, progress=bool(input_path)):
    output.write(line + '\n')
  output.flush()
