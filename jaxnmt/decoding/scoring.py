"""The model's log-probability of given source/target pairs (teacher forcing): what
`--mode=score` writes for corpus filtering, and what a CTranslate2 `score_batch`
comparison checks.

`score(loaded, sources, targets)` takes token ids (by default without EOS: one is
appended to each side, as training and `Translator.encode` do) and returns, per pair,
the sum of log p(target token | source, earlier target tokens) over the target's
tokens *with its EOS*, and that token count. No length penalty, no label smoothing.

Pairs are batched like translation: sorted by length, grouped in length buckets
(`translation.length_bucket` of the longer side; both sides padded to it), as many rows
as fit `batch_tokens` and `batch_size`, rows a power of two times the device count,
split over the loaded model's devices. `plan` is a pure function of the lengths, so
the same pairs always meet the same shapes (results do not depend on how a corpus is
split between processes, only on which pairs are planned together).
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.decoding import inference
from jaxnmt.decoding import translation
from jaxnmt.errors import UserError


@dataclasses.dataclass(frozen=True)
class Score:
  total: float  # sum of the target tokens' log-probabilities (EOS included), nats
  tokens: int  # target tokens scored (EOS included)
  token_log_probs: tuple[float, ...] | None = None  # per token, when asked for

  @property
  def mean(self) -> float:
    """Per-token mean log-probability (0 for no tokens)."""
    return self.total / self.tokens if self.tokens else 0.0


def token_log_probs(graphdef, params, rest, inputs, targets):
  """inputs: int32 [B, S], targets: int32 [B, T] (0 = padding; each row's real tokens
  end with EOS) -> float32 [B, T]: log p(targets[b, t] | inputs[b], targets[b, :t]),
  0 at padding. Not jitted (see `log_prob_function`)."""
  model = nnx.merge(graphdef, params, rest)
  source_segments = (inputs != 0).astype(jnp.int32)
  source_positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
  encoded = model.encode(inputs, source_segments, source_positions, deterministic=True)
  decoder_inputs = jnp.concatenate(  # [B, T]: BOS, then the target shifted right
      [jnp.full_like(targets[:, :1], tokenizer_lib.BOS_ID), targets[:, :-1]], axis=1)
  target_positions = jnp.broadcast_to(jnp.arange(targets.shape[1]), targets.shape)
  # One target segment per row: the causal mask keeps padding (at the end) from
  # reaching any real position, and padded positions are zeroed below.
  logits = model.decode(encoded, source_segments, decoder_inputs, jnp.ones_like(targets),
                        target_positions, deterministic=True)  # [B, T, V]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
  return jnp.where(targets != 0, picked, 0.0)


@functools.lru_cache(maxsize=8)
def log_prob_function(graphdef):
  """`token_log_probs` jitted for `graphdef`: (params, rest, inputs, targets) -> [B, T]."""
  return jax.jit(functools.partial(token_log_probs, graphdef))


def plan(source_lengths: Sequence[int], target_lengths: Sequence[int], devices: int,
         batch_size: int = 64, batch_tokens: int = translation.BATCH_TOKENS,
         fixed_rows: bool = False) -> list[tuple[int, int, list[int]]]:
  """Batches of pairs whose sides have these lengths (EOS included): [(padded length,
  rows, pair indices)], shortest first; a pair with an empty side is left out.
  fixed_rows: a bucket's last batch has its full rows too (fewer shapes)."""
  longer = [max(s, t) if s and t else 0 for s, t in zip(source_lengths, target_lengths)]
  order = sorted((i for i, length in enumerate(longer) if length), key=lambda i: longer[i])
  buckets = {}
  for index in order:
    buckets.setdefault(translation.length_bucket(longer[index]), []).append(index)
  batches = []
  for length, indices in buckets.items():
    full = translation.full_batch_rows(length, batch_size, batch_tokens, devices)
    for start in range(0, len(indices), full):
      chunk = indices[start:start + full]
      rows = devices
      while rows < len(chunk):
        rows *= 2
      batches.append((length, full if fixed_rows else min(rows, full), chunk))
  return batches


def score(loaded: inference.LoadedModel, sources: Sequence[Sequence[int]],
          targets: Sequence[Sequence[int]], batch_size: int = 64,
          batch_tokens: int = translation.BATCH_TOKENS, add_eos: bool = True,
          per_token: bool = False, fixed_rows: bool = False) -> list[Score]:
  """Score of each (source, target) pair of token ids, in order. add_eos: append EOS to
  both sides (False: the ids already end as the model expects). A pair with an empty
  side scores Score(0.0, 0). per_token: keep each token's log-probability too."""
  if len(sources) != len(targets):
    raise UserError(f'{len(sources)} sources but {len(targets)} targets to score')
  eos = [tokenizer_lib.EOS_ID] if add_eos else []
  sources = [list(s) + eos if len(s) else [] for s in sources]
  targets = [list(t) + eos if len(t) else [] for t in targets]
  limit = (loaded.model_config.max_length
           if loaded.model_config.position_embedding == 'learned' else None)
  results = [Score(0.0, 0, () if per_token else None)] * len(sources)
  mesh = loaded.mesh
  rows_sharding = NamedSharding(mesh, PartitionSpec('data'))
  function = log_prob_function(loaded.graphdef)
  for length, rows, indices in plan([len(s) for s in sources], [len(t) for t in targets],
                                    mesh.devices.size, batch_size, batch_tokens,
                                    fixed_rows):
    if limit is not None and length > limit:
      length = limit
      for index in indices:
        if max(len(sources[index]), len(targets[index])) > limit:
          raise UserError(f'pair {index + 1} has a side of more than the {limit} positions '
                          f'of the learned position table (model.max_length)')
    inputs = np.zeros((rows, length), np.int32)
    outputs = np.zeros((rows, length), np.int32)
    for row, index in enumerate(indices):
      inputs[row, :len(sources[index])] = sources[index]
      outputs[row, :len(targets[index])] = targets[index]
    log_probs = np.asarray(function(loaded.params, loaded.rest,
                                    jax.device_put(inputs, rows_sharding),
                                    jax.device_put(outputs, rows_sharding)))  # [rows, L]
    for row, index in enumerate(indices):
      count = len(targets[index])
      values = log_probs[row, :count]
      results[index] = Score(float(values.sum(dtype=np.float64)), count,
                             tuple(map(float, values)) if per_token else None)
  return results


def score_text(loaded: inference.LoadedModel, sources: Sequence[str],
               targets: Sequence[str], **options) -> list[Score]:
  """`score` of text pairs, each side encoded as training encodes it (the target with
  the target side's model where the tokenizer has one per side; blank side: 0, 0)."""
  tokenizer = loaded.tokenizer
  encode = lambda texts, side: [side(t.strip()) if t.strip() else [] for t in texts]
  return score(loaded, encode(sources, tokenizer.encode),
               encode(targets, tokenizer.encode_target), **options)
