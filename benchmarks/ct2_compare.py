"""jaxnmt decoding against CTranslate2 on the same weights, on this machine's CPU.

Builds a jaxnmt Transformer with random (seeded) weights at the dimensions of
configs/tiny.py or configs/base.py, converts the SAME weights into a CTranslate2 model
(`ctranslate2.specs`), checks that both compute the same function (first greedy
outputs and teacher-forced log-probs on a few sentences), then times greedy and beam
search on both with identical work: every sentence has `--source_length` source tokens
and exactly `--target_length` decoder steps (EOS banned before, the length forced:
`min_lengths` and `max_lengths` on jaxnmt, min/max decoding length on CTranslate2).
float32 on both sides; CTranslate2 runs with intra_threads=--threads, XLA uses every
core.

  python benchmarks/ct2_compare.py --dims=tiny,base --beams=1,4 --batch_size=32,64,128

Each configuration runs once to compile/warm up, then `--repeats` times, alternating
the two libraries so that load from other processes hits both alike; the best time of
each is reported, and the median ratio over the back-to-back pairs. Run it against
another checkout of jaxnmt with PYTHONPATH=CHECKOUT.
"""

import argparse
import functools
import os
import tempfile
import time

import ctranslate2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxnmt
from jaxnmt.decoding import search
from jaxnmt.interop import ctranslate2 as ct2_export
from jaxnmt.interop import weights as weights_lib
from jaxnmt.runtime import host
from jaxnmt.model import transformer

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ['<blank>', '<unk>', '<s>', '</s>']
DIMS = {  # configs/tiny.py and configs/base.py (its 16k joint vocabulary)
    'tiny': dict(vocab_size=6_000, num_encoder_layers=3, num_decoder_layers=3, d_model=256,
                 num_heads=4, d_ff=1024),
    'base': dict(vocab_size=16_000, num_encoder_layers=6, num_decoder_layers=6, d_model=512,
                 num_heads=8, d_ff=2048),
}


# ----------------------------------------------------------------------------- the models


def build_jaxnmt(dims: str, seed: int) -> transformer.Transformer:
  """A pre-LN, sinusoidal, tied-embedding Transformer (the configs' architecture) with
  random weights; norms and biases are perturbed too so that the check below tests
  their conversion."""
  config = transformer.ModelConfig(**DIMS[dims], dropout_rate=0.0, attention_dropout_rate=0.0)
  model = transformer.Transformer(config, rngs=nnx.Rngs(params=seed, dropout=seed))
  rng = np.random.default_rng(seed)
  for path, param in nnx.iter_graph(model):
    if isinstance(param, nnx.Param) and path[-1] in ('scale', 'bias', 'bi', 'bo'):
      param[...] = param[...] + 0.1 * rng.standard_normal(param.shape).astype(np.float32)
  return model


def to_ctranslate2(model: transformer.Transformer, directory: str, threads: int):
  """Writes `model`'s weights as a CTranslate2 model (jaxnmt's own exporter,
  interop/ctranslate2.py, the code behind --mode=export) -> a Translator."""
  vocabulary = SPECIALS + [f'w{i}' for i in range(len(SPECIALS), model.config.vocab_size)]
  spec = ct2_export.build_spec(model.config, weights_lib.flat(nnx.state(model, nnx.Param)),
                               vocabulary)
  spec.config.add_source_eos = False  # the sources here end in EOS already
  ct2_export.save(spec, directory, 'float32', force=True)
  return ctranslate2.Translator(directory, device='cpu', compute_type='float32',
                                inter_threads=1, intra_threads=threads)


# ----------------------------------------------------------------------------- decoding


def as_tokens(ids) -> list[str]:
  return [SPECIALS[i] if i < len(SPECIALS) else f'w{i}' for i in ids]


@functools.cache
def jitted_decoder(graphdef, beam: int, max_length: int, suppress: tuple[int, ...] = ()):
  """`jaxnmt_decode` jitted for one model structure and setting, which it closes over as
  `translate.Translator` does: a call then hashes no static arguments (about 2 ms a
  call for the model's graphdef)."""
  return jax.jit(functools.partial(jaxnmt_decode, graphdef, beam=beam,
                                   max_length=max_length, suppress=suppress))


def jaxnmt_decode(graphdef, state, inputs, max_lengths, *, beam: int, max_length: int,
                  suppress: tuple[int, ...] = ()):
  """inputs int32 [B, S] -> the best hypothesis per row, int32 [B, max_length], of
  exactly `max_lengths` tokens: EOS is banned before (the searches' `min_lengths`, as
  CTranslate2's min_decoding_length) and forced there. The tokens `suppress` (not EOS)
  are banned before the last step too, by the step function."""
  model = nnx.merge(graphdef, state)
  segments = (inputs != PAD).astype(jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
  encoded = model.encode(inputs, segments, positions)
  cache = model.init_cache(encoded, segments, max_length)

  def step_fn(cache, tokens, index):
    logits, cache = model.decode_step(cache, tokens, index)
    if not suppress:
      return logits, cache
    banned = jnp.array(suppress, jnp.int32)
    suppressed = jnp.where(index + 1 < max_lengths.max(), search.NEG_INF, logits[:, banned])
    return logits.at[:, banned].set(suppressed), cache

  batch = inputs.shape[0]
  if beam == 1:
    return search.greedy(step_fn, cache, batch, max_length, BOS, EOS, max_lengths,
                         min_lengths=max_lengths)
  tokens, _ = search.beam_search(step_fn, cache, batch, beam, max_length, BOS, EOS, 0.6,
                                 max_lengths, min_lengths=max_lengths)
  return tokens[:, 0]


def check_agreement(model, translator, sources: np.ndarray) -> str:
  """Greedy outputs (12 steps, special tokens suppressed: random weights otherwise
  repeat BOS) and teacher-forced log-probs of a random target, on both libraries."""
  graphdef, state = nnx.split(model)
  decoder = jitted_decoder(graphdef, 1, 13, (PAD, UNK, BOS))
  ours = np.asarray(decoder(state, jnp.asarray(sources),
                            jnp.full((len(sources),), 13, jnp.int32)))
  theirs = translator.translate_batch(
      [as_tokens(s) for s in sources], beam_size=1, min_decoding_length=12,
      max_decoding_length=12, suppress_sequences=[[t] for t in SPECIALS[:3]])
  mismatches = sum(as_tokens(a[:12]) != r.hypotheses[0] for a, r in zip(ours, theirs))
  # Teacher-forced log-probs of a random target, including its EOS.
  rng = np.random.default_rng(1)
  targets = rng.integers(len(SPECIALS), model.config.vocab_size, (len(sources), 9))
  scored = translator.score_batch([as_tokens(s) for s in sources],
                                  [as_tokens(t) for t in targets])
  segments = np.ones_like(sources)
  encoded = model.encode(jnp.asarray(sources), segments,
                         jnp.broadcast_to(jnp.arange(sources.shape[1]), sources.shape))
  decoder_inputs = np.concatenate([np.full((len(targets), 1), BOS), targets], 1)
  labels = np.concatenate([targets, np.full((len(targets), 1), EOS)], 1)
  logits = model.decode(encoded, segments, jnp.asarray(decoder_inputs),
                        np.ones_like(decoder_inputs),
                        jnp.broadcast_to(jnp.arange(10), decoder_inputs.shape))
  log_probs = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                 labels[..., None], -1)[..., 0]
  difference = np.abs(log_probs - np.array([r.log_probs for r in scored])).max()
  if mismatches or difference > 1e-3:
    raise SystemExit(f'jaxnmt and CTranslate2 disagree: {mismatches} greedy outputs differ, '
                     f'log-probs differ by up to {difference:.2g}')
  return (f'agree: {len(sources)} greedy outputs identical, teacher-forced log-probs '
          f'within {difference:.1e}')


def time_jaxnmt(model, sources, batch_size, beam, args) -> float:
  graphdef, state = nnx.split(model)
  lengths = jnp.full((batch_size,), args.target_length, jnp.int32)
  batches = [jnp.asarray(sources[i:i + batch_size])
             for i in range(0, len(sources), batch_size)]
  decoder = jitted_decoder(graphdef, beam, args.max_length)
  run = lambda inputs: decoder(state, inputs, lengths)
  if not hasattr(time_jaxnmt, 'checked'):
    out = np.asarray(run(batches[0]))
    assert (np.argmax(out == EOS, 1) == args.target_length - 1).all(), out[:2]
    time_jaxnmt.checked = True
  started = time.perf_counter()
  jax.block_until_ready([run(inputs) for inputs in batches])
  return time.perf_counter() - started


def time_ct2(translator, sources, batch_size, beam, args) -> float:
  tokens = [as_tokens(s) for s in sources]
  started = time.perf_counter()
  results = translator.translate_batch(
      tokens, max_batch_size=batch_size, beam_size=beam, length_penalty=0.6,
      min_decoding_length=args.target_length, max_decoding_length=args.target_length)
  seconds = time.perf_counter() - started
  assert all(len(r.hypotheses[0]) == args.target_length for r in results)
  return seconds


# ----------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dims', default='tiny,base')
  parser.add_argument('--beams', default='1,4')
  parser.add_argument('--batch_size', default='32,64,128',
                      help='comma-separated sizes to sweep; each side reports its best')
  parser.add_argument('--sentences', type=int, default=512)
  parser.add_argument('--source_length', type=int, default=12, help='incl. the EOS')
  parser.add_argument('--target_length', type=int, default=12,
                      help='decoder steps per sentence (jaxnmt: incl. the forced EOS)')
  parser.add_argument('--max_length', type=int, default=64,
                      help="jaxnmt's static max_length (decoding/translation.py: max_target_length)")
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  # The allocator and XLA:CPU settings `python -m jaxnmt.main` runs with (translate and
  # serve included); the restart it may make runs this script again from the start.
  host.prepare('auto', 'auto', multi_process=False, decoding=True)  # as translate does
  print(f'host: {host.describe()}')
  print(f'jaxnmt from {os.path.dirname(jaxnmt.__file__)}, ctranslate2 '
        f'{ctranslate2.__version__}, jax {jax.__version__}, {os.cpu_count()} CPUs', flush=True)
  table, pair_ratios = [], {}
  for dims in args.dims.split(','):
    model = build_jaxnmt(dims, args.seed)
    rng = np.random.default_rng(args.seed)
    sources = rng.integers(len(SPECIALS), model.config.vocab_size,
                           (args.sentences, args.source_length)).astype(np.int32)
    sources[:, -1] = EOS
    with tempfile.TemporaryDirectory() as directory:
      translator = to_ctranslate2(model, directory, args.threads)
      print(dims, check_agreement(model, translator, sources[:8]), flush=True)
      for beam in map(int, args.beams.split(',')):
        best = {}
        for batch_size in map(int, args.batch_size.split(',')):
          times = {'jaxnmt': [], 'ct2': []}
          time_jaxnmt(model, sources[:batch_size], batch_size, beam, args)  # compile
          time_ct2(translator, sources[:batch_size], batch_size, beam, args)
          for _ in range(args.repeats):
            times['jaxnmt'].append(time_jaxnmt(model, sources, batch_size, beam, args))
            times['ct2'].append(time_ct2(translator, sources, batch_size, beam, args))
          # Each repeat times the two back to back: their ratio within a pair is less
          # exposed to load from other processes than the ratio of two best times.
          pair_ratios[(beam, batch_size)] = [c / j for j, c in zip(times['jaxnmt'],
                                                                    times['ct2'])]
          for side, seconds in times.items():
            seconds = min(seconds)
            print(f'  {dims} beam {beam} batch {batch_size:4d} {side:6s} {seconds:7.3f} s '
                  f'{args.sentences * args.target_length / seconds:9.0f} tok/s', flush=True)
            if side not in best or seconds < best[side][0]:
              best[side] = (seconds, batch_size)
        # The median pair ratio at the batch size each side does best with.
        ratios = pair_ratios[(beam, best['jaxnmt'][1])] + (
            pair_ratios[(beam, best['ct2'][1])] if best['ct2'][1] != best['jaxnmt'][1] else [])
        table.append((dims, beam, best, float(np.median(ratios))))
  tokens = args.sentences * args.target_length
  print(f'\n{args.sentences} sentences x {args.source_length} source tokens -> '
        f'{args.target_length} target tokens, float32, best batch size per side')
  print(f"{'dims':5s} {'beam':>4s} | {'jaxnmt tok/s':>12s} {'sent/s':>7s} {'batch':>5s} | "
        f"{'CT2 tok/s':>10s} {'sent/s':>7s} {'batch':>5s} | {'ratio':>5s} {'pairs':>5s}")
  for dims, beam, best, pairs in table:
    (ours, our_batch), (theirs, their_batch) = best['jaxnmt'], best['ct2']
    print(f'{dims:5s} {beam:4d} | {tokens / ours:12.0f} {args.sentences / ours:7.1f} '
          f'{our_batch:5d} | {tokens / theirs:10.0f} {args.sentences / theirs:7.1f} '
          f'{their_batch:5d} | {theirs / ours:5.2f} {pairs:5.2f}')
  print('ratio: jaxnmt / CT2 throughput, best times; pairs: the median over back-to-back '
        'pairs at those batch sizes')


if __name__ == '__main__':
  main()
