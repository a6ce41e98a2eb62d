"""CTranslate2 as the oracle for jaxnmt models: random models with perturbed weights,
decoded and scored by jaxnmt's own search and scoring and by CTranslate2 on the same
token ids, compared under the rules the export and import tests share."""

import dataclasses
import itertools

import ctranslate2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.decoding import scoring
from jaxnmt.decoding import search
from jaxnmt.interop import ctranslate2 as ct2_export
from jaxnmt.interop import weights as weights_lib
from jaxnmt.model import transformer

PAD, UNK, BOS, EOS = (tokenizer_lib.PAD_ID, tokenizer_lib.UNK_ID, tokenizer_lib.BOS_ID,
                      tokenizer_lib.EOS_ID)
VOCAB = 64
VOCABULARY = list(ct2_export.SPECIALS) + [f'w{i}' for i in range(4, VOCAB)]
# Decoded tokens at most, EOS not counted (CTranslate2's max_decoding_length). Long
# enough that with length_penalty 0 a beam search ends on EOS (each step costs), not at
# the cap: there the libraries differ by design (jaxnmt forces an EOS and scores it,
# CTranslate2 stops without it).
MAX_TOKENS = 40
# Random weights favour the special tokens; both sides ban them at every step
# (CTranslate2 by `suppress_sequences`, jaxnmt in its step function) except EOS.
SUPPRESSED = (PAD, UNK, BOS)
SUPPRESS = [[VOCABULARY[i]] for i in SUPPRESSED]


def suppressing(step_fn):
  def step(cache, tokens, index):
    logits, cache = step_fn(cache, tokens, index)
    return logits.at[:, jnp.array(SUPPRESSED)].set(search.NEG_INF), cache
  return step


def pairwise(factors: dict[str, list]) -> list[dict]:
  """A small set of settings holding every value of every factor, and every pair of
  values of any two factors, at least once (greedy, deterministic)."""
  names = list(factors)
  missing = {(a, x, b, y) for a, b in itertools.combinations(names, 2)
             for x in factors[a] for y in factors[b]}
  rows = []
  while missing:
    # Start from a missing pair of the two largest factors, which need the most rows.
    a, x, b, y = min(missing, key=lambda p: (-len(factors[p[0]]) * len(factors[p[2]]),
                                             repr(p)))
    row = {a: x, b: y}
    for name in names:
      if name in row:
        continue
      gain = lambda value: sum(
          (other, row[other], name, value) in missing or (name, value, other, row[other])
          in missing for other in row)
      row[name] = max(factors[name], key=gain)
    rows.append(row)
    missing -= {(p, row[p], q, row[q]) for p, q in itertools.combinations(names, 2)}
  return rows


def random_model(seed: int = 0, **options) -> nnx.Module:
  """A small model with every parameter perturbed away from its initialisation (norm
  scales and biases start at 1 and 0, which would hide a misplaced one)."""
  settings = dict(vocab_size=VOCAB, num_encoder_layers=2, num_decoder_layers=2, d_model=32,
                  num_heads=4, d_ff=48, dropout_rate=0.0, attention_dropout_rate=0.0,
                  max_length=128)
  config = transformer.ModelConfig(**{**settings, **options})
  model = transformer.build(config, rngs=nnx.Rngs(params=seed, dropout=seed))
  rng = np.random.default_rng(seed)
  for _, value in nnx.iter_graph(model):
    if isinstance(value, nnx.Param):
      spread = float(np.std(value[...])) * 0.5 or 0.3  # norm scales and biases: 0.3
      value[...] = value[...] + spread * rng.standard_normal(value.shape).astype(np.float32)
  return _calibrate(model)


def _calibrate(model, spread: float = 2.0, eos_log_prob: float = -4.0):
  """Scales the output weights until the logits' spread over the vocabulary is about
  `spread`, then turns the EOS row of the output layer towards the mean final state
  until EOS has about `eos_log_prob`. Random weights otherwise make a search run to
  its length cap, and there the two libraries differ by design (jaxnmt forces an EOS
  and scores it, CTranslate2 stops without it): the comparison would test the cap
  rules, not the models."""
  ids = jnp.asarray(np.random.default_rng(7).integers(4, VOCAB, (4, 10)), jnp.int32)
  batch = {'inputs': ids, 'inputs_segment_ids': jnp.ones_like(ids),
           'inputs_positions': jnp.broadcast_to(jnp.arange(10), ids.shape),
           'decoder_inputs': ids, 'targets_segment_ids': jnp.ones_like(ids),
           'targets_positions': jnp.broadcast_to(jnp.arange(10), ids.shape)}
  embed = model.target_embed if model.config.kind == 'transformer' else model.embed

  def scale_rows(factor, row=None, add=None):
    if model.output_kernel is not None:
      kernel = model.output_kernel[...]
      model.output_kernel[...] = kernel * factor if add is None else kernel.at[:, row].add(add)
    else:
      table = embed.embedding[...]
      embed.embedding[...] = table * factor if add is None else table.at[row].add(add)

  for _ in range(4):
    scale_rows(spread / float(jnp.std(model(batch), axis=-1).mean()))
  for _ in range(6):
    mean_state = model.features(batch).mean(axis=(0, 1))
    log_prob = float(jax.nn.log_softmax(model(batch))[..., EOS].mean())
    scale_rows(1.0, EOS, (eos_log_prob - log_prob) * mean_state / jnp.sum(mean_state ** 2))
  return model


def export(model, directory: str, quantization: str = 'float32'):
  arrays = weights_lib.flat(nnx.state(model, nnx.Param))
  spec = ct2_export.build_spec(model.config, arrays, VOCABULARY)
  ct2_export.save(spec, directory, quantization)
  kind = ctranslate2.Generator if model.config.kind == 'decoder_lm' else ctranslate2.Translator
  return kind(directory, device='cpu', compute_type='float32', intra_threads=2)


def tokens(ids) -> list[str]:
  return [VOCABULARY[i] for i in ids]


def random_sources(count: int, seed: int = 1) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [list(rng.integers(4, VOCAB, rng.integers(2, 11))) for _ in range(count)]


def _padded(rows: list[list[int]], extra: list[int] = ()) -> np.ndarray:
  width = max(len(row) for row in rows) + len(extra)
  return np.array([row + list(extra) + [PAD] * (width - len(row) - len(extra))
                   for row in rows], np.int32)


def _until_eos(row) -> list[int]:
  row = [int(t) for t in row]
  return row[:row.index(EOS)] if EOS in row else row


@dataclasses.dataclass
class Comparison:
  greedy_same: int
  beam_same: int
  beam_ties: int  # differing best hypotheses whose scores tie within 1e-5
  sentences: int
  score_difference: float  # largest |log p| difference over scored tokens


def _translate_jaxnmt(model, sources, beam: int):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(params, inputs):
    model = nnx.merge(graphdef, params, rest)
    segments = (inputs != PAD).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    encoded = model.encode(inputs, segments, positions)
    cache = model.init_cache(encoded, segments, MAX_TOKENS + 1)
    if beam == 1:
      return search.greedy(suppressing(model.decode_step), cache, inputs.shape[0],
                           MAX_TOKENS + 1, BOS, EOS)[:, None], None
    return search.beam_search(suppressing(model.decode_step), cache, inputs.shape[0], beam,
                              MAX_TOKENS + 1, BOS, EOS, 0.0)

  out, scores = run(params, jnp.asarray(_padded(sources, [EOS])))
  return [_until_eos(row[0]) for row in np.asarray(out)], (
      None if scores is None else np.asarray(scores)[:, 0])


def compare_translation(model, translator, sources: list[list[int]],
                        beam: bool = True) -> Comparison:
  """jaxnmt (greedy, beam 4 when `beam`, teacher-forced log-probs) against
  `translator` on `sources` (ids without EOS), length_penalty 0 and at most MAX_TOKENS
  tokens on both."""
  greedy, _ = _translate_jaxnmt(model, sources, 1)
  batch = [tokens(s) for s in sources]
  options = dict(max_decoding_length=MAX_TOKENS, min_decoding_length=0, length_penalty=0.0,
                 return_scores=True, suppress_sequences=SUPPRESS)
  theirs_greedy = translator.translate_batch(batch, beam_size=1, **options)
  greedy_same = sum(tokens(ours) == theirs.hypotheses[0]
                    for ours, theirs in zip(greedy, theirs_greedy))
  beam_same = ties = 0
  beam_results, beam_scores, theirs_beam = [], [], []
  if beam:
    beam_results, beam_scores = _translate_jaxnmt(model, sources, 4)
    theirs_beam = translator.translate_batch(batch, beam_size=4, **options)
  for ours, score, theirs in zip(beam_results, beam_scores, theirs_beam):
    if tokens(ours) == theirs.hypotheses[0]:
      beam_same += 1
    elif abs(float(score) - theirs.scores[0]) < 1e-5:
      ties += 1
  # Teacher-forced log-probs of jaxnmt's own greedy outputs (EOS included).
  targets = [row + [EOS] for row in greedy]
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ours = np.asarray(scoring.token_log_probs(graphdef, params, rest,
                                            jnp.asarray(_padded(sources, [EOS])),
                                            jnp.asarray(_padded(targets))))
  scored = translator.score_batch(batch, [tokens(t[:-1]) for t in targets])
  difference = max(float(np.abs(ours[i, :len(t)] - np.array(r.log_probs)).max())
                   for i, (t, r) in enumerate(zip(targets, scored)))
  return Comparison(greedy_same, beam_same, ties, len(sources), difference)


def compare_generation(model, generator, prompts: list[list[int]]) -> Comparison:
  """jaxnmt's language model against `generator`: greedy continuations of `prompts`
  (BOS + ids), and the log-probs of prompt + continuation."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  length = max(len(p) for p in prompts)
  assert all(len(p) == length for p in prompts)  # one start index for the batch

  @jax.jit
  def run(params, prompt):
    model = nnx.merge(graphdef, params, rest)
    cache = model.init_cache(prompt.shape[0], length + MAX_TOKENS + 1)
    bos = jnp.full((prompt.shape[0],), BOS, jnp.int32)
    _, cache = model.decode_step(cache, bos, 0)
    for index in range(length - 1):
      _, cache = model.decode_step(cache, prompt[:, index], index + 1)
    return search.sample(suppressing(model.decode_step), cache, prompt.shape[0],
                         length + MAX_TOKENS + 1, BOS, EOS, jax.random.key(0), top_k=1,
                         start_index=length, first_tokens=prompt[:, -1])

  out = np.asarray(run(params, jnp.asarray(np.array(prompts, np.int32))))
  ours = [_until_eos(row)[:MAX_TOKENS] for row in out]
  results = generator.generate_batch([['<s>'] + tokens(p) for p in prompts],
                                     max_length=MAX_TOKENS, sampling_topk=1,
                                     include_prompt_in_result=False,
                                     suppress_sequences=SUPPRESS)
  same = sum(tokens(o) == r.sequences[0] for o, r in zip(ours, results))
  # Log-probs of BOS + prompt + continuation, teacher forced.
  sequences = [[BOS] + p + o for p, o in zip(prompts, ours)]
  model_now = nnx.merge(graphdef, params, rest)
  difference = 0.0
  scored = generator.score_batch([tokens(s) for s in sequences])
  for sequence, result in zip(sequences, scored):
    ids = jnp.asarray([sequence], jnp.int32)
    batch = {'decoder_inputs': ids[:, :-1], 'targets': ids[:, 1:],
             'targets_segment_ids': jnp.ones_like(ids[:, 1:]),
             'targets_positions': jnp.arange(ids.shape[1] - 1)[None]}
    log_probs = jax.nn.log_softmax(model_now(batch))[0]
    picked = np.asarray(jnp.take_along_axis(log_probs, ids[0, 1:, None], -1)[:, 0])
    difference = max(difference, float(np.abs(picked - np.array(result.log_probs)).max()))
  return Comparison(same, same, 0, len(prompts), difference)
