"""Translating lines of text with a loaded checkpoint (`Translator`): the library that
`--mode=translate` (`commands/translate.py`), `--mode=serve`, the eval worker and the
benchmarks decode with.

Batches are planned by tokens: sentences sorted by length, grouped into length buckets
(`length_bucket`), as many per batch as fit `batch_tokens` source tokens and
`batch_size` sentences, with the batch dimension padded to the device count times a
power of two (or, with `fixed_rows`, always to the bucket's full row count, so that a
sentence's result never depends on the sentences decoded with it: the server's mode).
Sentences are split over all the devices of the loaded model's 1-D 'data' mesh.

Nothing is truncated. A line longer than the training length (data.max_source_length)
that holds several sentences is split into them (`split_sentences`), each is translated,
and the translations are joined: a model trained on single sentences ends its output
after the first sentence of a long line. Whatever is still longer is encoded whole
(sinusoidal and RoPE positions extrapolate; a learned position table covers
`model.max_length` positions, and a longer line is refused with a `UserError` naming
it), and each output may run to `search.max_length_ratio` x source tokens +
`search.max_length_offset` tokens. Such sentences are counted and logged once, since
quality may suffer.
"""

import dataclasses
import functools
import logging
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.decoding import search
from jaxnmt.decoding import inference
from jaxnmt.model import initialize
from jaxnmt.data import tags as tags_lib
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.errors import UserError
from jaxnmt.runtime import distributed

BATCH_TOKENS = 4096  # default source tokens (padding included) per decode batch


# A sentence ends at . ! ? (or their full-width forms), possibly followed by closing
# quotes or brackets, before white space and an opening quote, bracket, inverted mark,
# capital letter or digit; not after an initial or a common title (Mr. Dr. ...).
_SENTENCE_END = re.compile(
    r'(?<=[.!?\u3002\uff01\uff1f])(?<!\b[A-Z]\.)(?<!\b(?:Mr|Ms|Dr|St)\.)'
    r'(?<!\bMrs\.)([\'")\]\u201d\u2019\u00bb]*)\s+'
    r'(?=[\'"(\[\u201c\u2018\u00ab\u00bf\u00a1]*[^\W\d_a-z]|\d)')


def split_sentences(text: str) -> list[str]:
  """`text` cut after each sentence end (see _SENTENCE_END); [text] if none."""
  pieces, start = [], 0
  for match in _SENTENCE_END.finditer(text):
    pieces.append(text[start:match.start() + len(match.group(1))].strip())
    start = match.end()
  pieces.append(text[start:].strip())
  return [piece for piece in pieces if piece]


def source_tokens(ids) -> int:
  """Tokens of an encoded line (`Translator.encode`): None, ids, or a tuple of the ids
  of its sentences."""
  if not ids:
    return 0
  return sum(map(len, ids)) if isinstance(ids, tuple) else len(ids)


def length_bucket(length: int) -> int:
  """The padded length of `length` tokens: a multiple of 16 up to 64, then 2^k or
  1.5 * 2^k (96, 128, 192, 256, 384, ...), so that few shapes are ever compiled."""
  if length <= 64:
    return 16 * max(1, math.ceil(length / 16))
  size = 64
  while True:
    for candidate in (size * 3 // 2, size * 2):
      if candidate >= length:
        return candidate
    size *= 2


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """beam_size > 1: beam search; temperature > 0: sampling; else greedy."""
  beam_size: int = 4
  length_penalty: float = 1.0  # GNMT alpha; BUILD_NOTES.md, "Output length"
  min_length: int = 0  # no output ends before this many tokens (EOS not counted)
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  use_cache: bool = True

  @classmethod
  def from_flags(cls, flags) -> 'DecodeOptions':
    """The options the command-line flags of main.py give."""
    return cls(beam_size=flags.beam_size, length_penalty=flags.length_penalty,
               min_length=flags.min_length, temperature=flags.temperature,
               top_k=flags.top_k, top_p=flags.top_p, seed=flags.decode_seed,
               use_cache=flags.decode_cache)

  @property
  def strategy(self) -> str:
    if self.temperature > 0:
      return 'sample'
    return 'beam' if self.beam_size > 1 else 'greedy'

  @property
  def max_nbest(self) -> int:
    """How many hypotheses per sentence this strategy gives."""
    return self.beam_size if self.strategy == 'beam' else 1


@dataclasses.dataclass(frozen=True)
class Hypothesis:
  text: str
  score: float  # log p(text + EOS | source) / GNMT length penalty; NaN: not computed


class Translator:
  """A loaded model (`inference.load`) and jitted batched decoders on its devices
  (parameters replicated, sentences split over the devices). Not thread-safe: one
  thread decodes (the server has one decode worker)."""

  def __init__(self, loaded: inference.LoadedModel, options: DecodeOptions = DecodeOptions(),
               batch_tokens: int = BATCH_TOKENS, target_lang: str | None = None):
    if loaded.config.get('task') == 'lm':
      raise UserError('this workdir holds a language model: use --mode=generate')
    self.loaded, self.options, self.batch_tokens = loaded, options, batch_tokens
    self.config, self.tokenizer = loaded.config, loaded.tokenizer
    # Tags (data/tags.py): the target-language tag added, unknown ones refused.
    self.tagger = tags_lib.Tagger(loaded.config, loaded.tokenizer, target_lang)
    self.mesh = loaded.mesh
    self.long_lines = 0  # lines seen longer than the training length
    self.output_tokens = 0  # tokens decoded (best hypotheses, EOS included)
    self._decoders = {}

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   options: DecodeOptions = DecodeOptions(), devices=None,
                   weights: str = 'auto', batch_tokens: int = BATCH_TOKENS,
                   target_lang: str | None = None) -> 'Translator':
    """Checkpoint `step` (default: the latest) of `workdir`, on `devices` (default:
    this process's first device); `weights` as in `inference.load`."""
    return cls(inference.load(workdir, step, devices, weights=weights), options, batch_tokens,
               target_lang)

  @property
  def step(self) -> int | None:
    return self.loaded.step

  @property
  def devices(self) -> int:
    return self.mesh.devices.size

  @property
  def max_source_tokens(self) -> int | None:
    """The longest source (EOS included) the model can read: a learned position table
    has model.max_length rows; sinusoidal and RoPE positions have no limit (None)."""
    model = self.loaded.model_config
    return model.max_length if model.position_embedding == 'learned' else None

  def output_cap(self, source_tokens: int) -> int:
    """The longest output (EOS included) of a source of `source_tokens` tokens."""
    return output_cap(source_tokens, self.config.decode, self.max_source_tokens)

  def translate(self, lines: Sequence[str], batch_size: int = 64,
                progress: bool = False, all_processes: bool = False) -> list[str]:
    """Translations of `lines`, in order ('' for blank lines). all_processes: a
    collective of every process of the job, each decoding its share of the batches
    (`decode_encoded`); every process returns all the translations."""
    return [hypotheses[0].text for hypotheses in self.decode_encoded(
        self.encode(lines), 1, batch_size, progress=progress, scores=False,
        all_processes=all_processes)]

  def translate_nbest(self, lines: Sequence[str], nbest: int = 1, batch_size: int = 64,
                      progress: bool = False, options: DecodeOptions | None = None,
                      scores: bool = True) -> list[list[Hypothesis]]:
    """Up to `nbest` hypotheses per line, best first, with their scores (blank lines:
    `nbest` empty ones scored 0). nbest <= beam_size for beam search, else 1."""
    return self.decode_encoded(self.encode(lines), nbest, batch_size, options,
                               progress=progress, scores=scores)

  def encode(self, lines: Sequence[str], first_line: int = 0,
             target_lang: str | None = None) -> list:
    """Token ids of each line with its EOS (None for a blank line); a line longer than
    the training length that holds several sentences gives a tuple of the ids of
    each. A sentence longer than a learned position table is a UserError naming its
    line (numbers from `first_line` + 1); sentences longer than the training length
    are counted and logged the first time. Tags: `self.tagger`'s, or with
    `target_lang` that language's (the server's per-request choice)."""
    tagger = self.tagger if target_lang is None else tags_lib.Tagger(
        self.config, self.tokenizer, target_lang)
    encoded, long_lines = [], 0
    trained = self.config.data.max_source_length
    for number, line in enumerate(lines, first_line + 1):
      line = line.strip()
      if line:
        line = tagger(line, number)
      ids = self._ids(line)
      if ids and len(ids) > trained:
        tags, text = tags_lib.split_tags(line, tagger.known)
        sentences = split_sentences(text)
        if len(sentences) > 1:  # each keeps the line's tags
          ids = tuple(self._ids(tags + sentence) for sentence in sentences)
      for sentence in (ids if isinstance(ids, tuple) else [ids]):
        if sentence and self.max_source_tokens and len(sentence) > self.max_source_tokens:
          raise UserError(
              f'input line {number} has a sentence of {len(sentence)} tokens, more than '
              f'the {self.max_source_tokens} positions of the learned position table '
              f'(model.max_length): split it into sentences')
        long_lines += bool(sentence and len(sentence) > trained)
      encoded.append(ids)
    if long_lines and not self.long_lines:
      logging.warning(
          '%d input line(s) are longer than the %d tokens the model was trained on: they '
          'are translated whole (not truncated), but quality may suffer', long_lines,
          trained)
    self.long_lines += long_lines
    return encoded

  def _ids(self, text: str) -> list[int] | None:
    text = text.strip()
    return self.tokenizer.encode(text) + [tokenizer_lib.EOS_ID] if text else None

  def decode_encoded(self, encoded: Sequence, nbest: int = 1,
                     batch_size: int = 64, options: DecodeOptions | None = None,
                     fixed_rows: bool = False, progress: bool = False,
                     scores: bool = True, first_index: int = 0,
                     all_processes: bool = False) -> list[list[Hypothesis]]:
    """`translate_nbest` of already encoded lines (`encode`). fixed_rows: every batch
    of a length bucket has the same shape (results independent of the batch mates).
    A line split into sentences gets, at rank r, the rank-r translations of its
    sentences joined (a sentence with fewer gives its last), scored by their sum.
    `first_index`: the input line number (from 0) of encoded[0]; sampling keys come
    from line numbers, so a batch samples the same wherever it is decoded.
    all_processes: every process of the job calls this with the same lines; batch b
    of the one-process plan is decoded by process b mod N, and the results are
    gathered to every process: the same results as one process (with as many local
    devices) gives, in about 1/N of the time."""
    flat, owners = [], []
    for index, ids in enumerate(encoded):
      for part, sentence in enumerate(ids if isinstance(ids, tuple) else [ids]):
        flat.append(sentence)
        owners.append((first_index + index, part))
    share = (jax.process_index(), jax.process_count()) if (
        all_processes and jax.process_count() > 1) else (0, 1)
    results = self._decode_sentences(flat, nbest, batch_size, options, fixed_rows,
                                     progress, scores, owners, share)
    if share[1] > 1:
      results = _gather(results)
    if len(flat) == len(encoded):
      return results
    merged = [[] for _ in encoded]
    for (line, _), hypotheses in zip(owners, results):
      merged[line - first_index].append(hypotheses)
    return [parts[0] if len(parts) == 1 else [
        Hypothesis(' '.join(part[min(rank, len(part) - 1)].text for part in parts),
                   sum(part[min(rank, len(part) - 1)].score for part in parts))
        for rank in range(max(map(len, parts)))] for parts in merged]

  def _decode_sentences(self, encoded: Sequence[list[int] | None], nbest: int,
                        batch_size: int, options: DecodeOptions | None,
                        fixed_rows: bool, progress: bool, scores: bool,
                        owners: Sequence[tuple[int, int]], share: tuple[int, int] = (0, 1)
                        ) -> list[list[Hypothesis] | None]:
    """`decode_encoded` of single sentences; owners[i]: (input line, sentence in it)
    of encoded[i], which key its sampling (`row_keys`). share (i, N): only
    batches b with b mod N == i are decoded; the others' sentences give None."""
    options = options or self.options
    if not 1 <= nbest <= options.max_nbest:
      raise UserError(f'nbest must be in [1, {options.max_nbest}] for '
                      f'{options.strategy} decoding, got {nbest}')
    results = [[Hypothesis('', 0.0)] * nbest if ids is None else None for ids in encoded]
    plan = self.plan([len(ids) if ids else 0 for ids in encoded], batch_size, fixed_rows)
    plan = plan[share[0]::share[1]]
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      plan = tqdm.tqdm(plan, desc='translate', unit='batch')
    rows_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    decoder = self._decoder(options, scores and options.strategy != 'beam')
    for source_length, rows, indices in plan:
      inputs = np.zeros((rows, source_length), np.int32)
      caps = np.ones((rows,), np.int32)  # padding rows end at once
      for row, index in enumerate(indices):
        inputs[row, :len(encoded[index])] = encoded[index]
        caps[row] = self.output_cap(len(encoded[index]))
      lines, parts = np.full((2, rows), -1, np.int32)  # padding rows: any key
      for row, index in enumerate(indices):
        lines[row], parts[row] = owners[index]
      keys = row_keys(options.seed, lines, parts)
      tokens, batch_scores = decoder(
          self.loaded.params, self.loaded.rest, jax.device_put(inputs, rows_sharding),
          jax.device_put(caps, rows_sharding), jax.device_put(keys, rows_sharding),
          max_length=self._output_length(source_length))
      tokens, batch_scores = np.asarray(tokens), np.asarray(batch_scores)
      self.output_tokens += int(np.count_nonzero(tokens[:len(indices), 0]))
      for row, index in enumerate(indices):
        kept = [k for k in range(nbest) if batch_scores[row, k] > search.NEG_INF / 2] or [0]
        results[index] = [Hypothesis(self.tokenizer.decode(tokens[row, k]),
                                     float(batch_scores[row, k])) for k in kept]
    return results

  def plan(self, lengths: Sequence[int], batch_size: int = 64,
           fixed_rows: bool = False) -> list[tuple[int, int, list[int]]]:
    """Decode batches for sentences of `lengths` tokens (0: blank, skipped):
    [(padded source length, rows, sentence indices)], shortest sentences first.
    A length bucket's full batch has as many rows as fit `batch_tokens` and
    `batch_size`, rounded down to the device count times a power of two; its last
    batch is padded to the smallest such row count that holds it (or, fixed_rows, to
    the full count)."""
    order = sorted((i for i, length in enumerate(lengths) if length),
                   key=lambda i: lengths[i])
    buckets = {}
    for index in order:
      buckets.setdefault(self._source_length(lengths[index]), []).append(index)
    batches = []
    for source_length, indices in buckets.items():
      full = self._rows(source_length, batch_size)
      for start in range(0, len(indices), full):
        chunk = indices[start:start + full]
        rows = self.devices
        while rows < len(chunk) and not fixed_rows:
          rows *= 2
        batches.append((source_length, full if fixed_rows else min(rows, full), chunk))
    return batches

  def _rows(self, source_length: int, batch_size: int) -> int:
    """Rows of a full batch of sources padded to `source_length`."""
    return full_batch_rows(source_length, batch_size, self.batch_tokens, self.devices)

  def _source_length(self, tokens: int) -> int:
    """The padded source length of a `tokens`-token line (within a learned table)."""
    limit = self.max_source_tokens
    return length_bucket(tokens) if limit is None else min(length_bucket(tokens), limit)

  def _output_length(self, source_length: int) -> int:
    """The decode loop's length for sources padded to `source_length`: the longest
    output cap of the bucket, rounded up to a bucket (per-sentence caps end earlier)."""
    return output_length(source_length, self.config.decode, self.max_source_tokens)

  def _decoder(self, options: DecodeOptions, scores: bool):
    """The jitted decoder for `options` (scores: compute them for greedy and sampled
    outputs too); one per options, compiled once per shape."""
    if (options, scores) not in self._decoders:
      self._decoders[options, scores] = decoder(self.loaded.graphdef, options, scores)
    return self._decoders[options, scores]


_GATHER_SENTENCES = 1000  # sentences per round of `_gather` (small key-value messages)


def _gather(results: list[list[Hypothesis] | None]) -> list[list[Hypothesis]]:
  """Every process's decoded sentences (None where another process decoded it), merged
  on every process (collective; same length everywhere)."""
  merged = list(results)
  for start in range(0, len(results), _GATHER_SENTENCES):
    mine = {index: [[h.text, h.score] for h in hypotheses]
            for index, hypotheses in enumerate(results[start:start + _GATHER_SENTENCES],
                                               start) if hypotheses is not None}
    for theirs in distributed.gather_json(mine, 'gathering translations'):
      for index, hypotheses in theirs.items():
        merged[int(index)] = [Hypothesis(text, score) for text, score in hypotheses]
  return merged


@functools.partial(jax.jit, static_argnums=0)
def row_keys(seed: int, lines, parts) -> jax.Array:
  """The sampling key of each row [B]: from the seed, the row's input line (from 0)
  and the sentence's place in that line, so that a sentence samples the same in any
  batch, on any process."""
  base = jax.random.key(seed)
  return jax.vmap(lambda line, part: jax.random.fold_in(jax.random.fold_in(base, line),
                                                        part))(lines, parts)


def decoder(graphdef, options: DecodeOptions, scores: bool = False):
  """`_decode_batch` jitted: (params, rest, inputs, max_lengths, keys, *, max_length)
  -> (tokens, scores); keys: a sampling key per row (`row_keys`)."""
  return jax.jit(functools.partial(_decode_batch, graphdef, options, scores),
                 static_argnames=('max_length',))


def compile_decoder(model_cfg, config, devices, options: DecodeOptions,
                    batch_size: int = 64, batch_tokens: int = BATCH_TOKENS):
  """The decoder of a translate or eval-worker batch of the longest training sources,
  compiled ahead of time from shapes alone for `devices` (parameters replicated,
  sentences split over them, as `Translator` runs it): (compiled, rows, source length,
  output length)."""
  mesh = inference.data_mesh(devices)
  limit = model_cfg.max_length if model_cfg.position_embedding == 'learned' else None
  source_length = length_bucket(config.data.max_source_length)
  source_length = source_length if limit is None else min(source_length, limit)
  decode_length = output_length(source_length, config.decode, limit)
  rows = full_batch_rows(source_length, batch_size, batch_tokens, mesh.size)
  graphdef, params, rest = initialize.abstract_model(model_cfg)
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec('data'))
  keys = jax.eval_shape(lambda: row_keys(options.seed, np.zeros(rows, np.int32),
                                         np.zeros(rows, np.int32)))
  compiled = decoder(graphdef, options).lower(
      initialize.with_shardings(params, replicated), initialize.with_shardings(rest, replicated),
      jax.ShapeDtypeStruct((rows, source_length), jnp.int32, sharding=split),
      jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split),
      jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=split),
      max_length=decode_length).compile()
  return compiled, rows, source_length, decode_length


def output_cap(source_tokens: int, decode_config, limit: int | None) -> int:
  """The longest output (EOS included) of a source of `source_tokens` tokens, within
  `limit` positions (a learned table; None: none)."""
  cap = max(1, int(decode_config.max_length_ratio * source_tokens
                   + decode_config.max_length_offset))
  return cap if limit is None else min(cap, limit)


def output_length(source_length: int, decode_config, limit: int | None) -> int:
  """The decode loop's length for sources padded to `source_length`: the longest output
  cap of the bucket, rounded up to a bucket (per-sentence caps end earlier)."""
  bucket = length_bucket(output_cap(source_length, decode_config, limit))
  return bucket if limit is None else min(bucket, limit)


def full_batch_rows(source_length: int, batch_size: int, batch_tokens: int,
                    devices: int) -> int:
  """Rows of a full decode batch of sources padded to `source_length`: as many as fit
  `batch_tokens` and `batch_size`, rounded down to `devices` times a power of two (at
  least one per device)."""
  fit = max(1, min(batch_size, batch_tokens // source_length) // devices)
  return devices * 2 ** int(math.log2(fit))


def _decode_batch(graphdef, options: DecodeOptions, scores: bool, params, rest, inputs,
                  max_lengths, keys, *, max_length: int):
  """inputs: int32 [B, S] (0 = pad); max_lengths: int32 [B] -> (tokens int32 [B, K, L],
  scores float32 [B, K]) best first; K = beam size for beam search, else 1 (scores NaN
  unless `scores`)."""
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
  # The searches count EOS in a length; the output cap still wins over the floor.
  min_lengths = (jnp.full((batch,), options.min_length + 1, jnp.int32)
                 if options.min_length else None)
  if options.strategy == 'beam':
    return search.beam_search(step_fn, cache, batch, options.beam_size, max_length, bos,
                              eos, options.length_penalty, max_lengths,
                              min_lengths=min_lengths)
  if options.strategy == 'sample':
    tokens = search.sample(step_fn, cache, batch, max_length, bos, eos, keys,
                           options.temperature, options.top_k, options.top_p, max_lengths,
                           min_lengths=min_lengths)
  else:
    tokens = search.greedy(step_fn, cache, batch, max_length, bos, eos, max_lengths,
                           min_lengths=min_lengths)
  if scores:
    score = _teacher_forced_scores(model, encoded, segment_ids, tokens,
                                   options.length_penalty)
  else:
    score = jnp.full((batch,), jnp.nan)
  return tokens[:, None], score[:, None]


def _teacher_forced_scores(model, encoded, segment_ids, tokens, alpha: float):
  """tokens: int32 [B, L], each row ending in EOS then 0s -> its log-probability over
  the length penalty (beam search's score) [B]."""
  eos = tokenizer_lib.EOS_ID
  is_eos = (tokens == eos).astype(jnp.int32)
  valid = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # up to and including the EOS
  decoder_inputs = jnp.concatenate(
      [jnp.full_like(tokens[:, :1], tokenizer_lib.BOS_ID), tokens[:, :-1]], axis=1)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits = model.decode(encoded, segment_ids, decoder_inputs, jnp.ones_like(tokens),
                        positions, deterministic=True)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  total = jnp.where(valid, picked, 0.0).sum(axis=1)
  return total / search.length_penalty(valid.sum(axis=1), alpha)
