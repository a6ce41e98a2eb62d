"""Sample translations while training: at each validation the trainer greedily
translates a few fixed validation sentences and writes them, with their references,
to TensorBoard's text tab (WORKDIR/valid, tag `samples`). The eval worker writes its
beam translations of the same sentences under WORKDIR/eval.

The decoder runs on the trainer's mesh with the parameters as they are sharded there
(the sentences are replicated: a handful of rows), so it works on any mesh and any
number of processes; process 0 writes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.decoding import search
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.runtime import files


class TextSamples:
  """The first `count` validation pairs of `workdir` and a jitted greedy decoder."""

  def __init__(self, workdir: str, config, tokenizer, graphdef, rest, mesh, count: int):
    self.pairs = []
    if files.exists(files.split_file(workdir, 'valid.ref')):  # else no split
      sources = files.read_lines(files.split_file(workdir, 'valid.src'))[:count]
      references = files.read_lines(files.split_file(workdir, 'valid.ref'))
      self.pairs = list(zip(sources, references[:count]))
    self._tokenizer = tokenizer
    self._rest = rest
    max_source = config.data.max_source_length
    inputs = np.zeros((max(len(self.pairs), 1), max_source), np.int32)
    for row, (source, _) in enumerate(self.pairs):
      ids = tokenizer.encode(source)[:max_source - 1] + [tokenizer_lib.EOS_ID]
      inputs[row, :len(ids)] = ids
    self._inputs = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec()))
    self._decode = jax.jit(functools.partial(_greedy, graphdef,
                                             max_length=config.data.max_target_length))

  def table(self, params) -> str:
    """A markdown table: source | reference | greedy translation by `params`."""
    if not self.pairs:
      return ''
    tokens = np.asarray(jax.device_get(self._decode(params, self._rest, self._inputs)))
    rows = [f'| {source} | {reference} | {self._tokenizer.decode(tokens[row])} |\n'
            for row, (source, reference) in enumerate(self.pairs)]
    return '| source | reference | greedy translation |\n|---|---|---|\n' + ''.join(rows)


def _greedy(graphdef, params, rest, inputs, *, max_length: int):
  model = nnx.merge(graphdef, params, rest)
  segment_ids = (inputs != 0).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
  encoded = model.encode(inputs, segment_ids, positions, deterministic=True)
  cache = model.init_cache(encoded, segment_ids, max_length)
  return search.greedy(model.decode_step, cache, inputs.shape[0], max_length,
                       tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID)
