"""Why translations run short: BLEU, brevity penalty and length ratio of one trained
workdir's weights, decoded greedily and with beam search at several GNMT length
penalties (alpha), on a split of its own (validation by default, to choose alpha;
then the test split with the chosen one).

  python benchmarks/length_sweep.py --workdir=runs/tiny --alphas=0,0.6,1.0,1.5
  python benchmarks/length_sweep.py --workdir=runs/tiny --split=test --alphas=1.0 \
      --weights=last5

Each row also counts hypotheses that hit the output cap (decode.max_length_ratio x
source tokens + decode.max_length_offset) and the share of sentences whose
translation is shorter than 80% of the reference, so the causes can be told apart: a
cap that binds, a search that prefers short hypotheses, or a model that ends early.
"""

import json
import os

from absl import app
from absl import flags

import _load

flags.DEFINE_string('workdir', None, 'A trained translation workdir.', required=True)
flags.DEFINE_string('split', 'valid', 'valid, test or any <split> with '
                    'WORKDIR/splits/<split>.src and .ref.')
flags.DEFINE_string('weights', 'auto', 'auto, raw, ema or an averaged name.')
flags.DEFINE_list('alphas', ['0', '0.6', '1.0', '1.5'], 'Length penalties for beam search.')
flags.DEFINE_integer('beam_size', 4, 'Beam size.')
flags.DEFINE_bool('greedy', True, 'Also decode greedily.')
flags.DEFINE_integer('sentences', 0, 'Use the first N sentences (0 = all).')
flags.DEFINE_integer('batch_size', 64, 'Sentences per batch.')
FLAGS = flags.FLAGS


def main(_):
  # pylint: disable=g-import-not-at-top
  import sacrebleu
  from jaxnmt.decoding import translation
  from jaxnmt.runtime import host
  host.prepare('auto', 'auto', multi_process=False, decoding=True)  # as translate does
  loaded = _load.trained_model(FLAGS.workdir, FLAGS.weights)
  splits = os.path.join(FLAGS.workdir, 'splits')
  with open(os.path.join(splits, f'{FLAGS.split}.src'), encoding='utf-8') as handle:
    sources = handle.read().splitlines()[:FLAGS.sentences or None]
  with open(os.path.join(splits, f'{FLAGS.split}.ref'), encoding='utf-8') as handle:
    references = handle.read().splitlines()[:len(sources)]
  decode_cfg = loaded.config.decode
  caps = [int(decode_cfg.max_length_ratio * (len(loaded.tokenizer.encode(s)) + 1)
              + decode_cfg.max_length_offset) for s in sources]
  settings = ([('greedy', translation.DecodeOptions(beam_size=1))] if FLAGS.greedy else [])
  settings += [(f'beam{FLAGS.beam_size} alpha={alpha}',
                translation.DecodeOptions(beam_size=FLAGS.beam_size, length_penalty=float(alpha)))
               for alpha in FLAGS.alphas]
  print(f'{FLAGS.workdir} step {loaded.step} ({getattr(loaded, "weights", "raw")} weights), {FLAGS.split} '
        f'split, {len(sources)} sentences')
  for name, options in settings:
    hypotheses = translation.Translator(loaded, options).translate(sources, FLAGS.batch_size)
    score = sacrebleu.corpus_bleu(hypotheses, [references])
    lengths = [len(loaded.tokenizer.encode(h)) + 1 for h in hypotheses]
    capped = sum(length >= cap for length, cap in zip(lengths, caps))
    short = sum(len(h.split()) < 0.8 * len(r.split()) for h, r in zip(hypotheses, references))
    row = {'setting': name, 'bleu': round(score.score, 2), 'bp': round(score.bp, 4),
           'ratio': round(score.sys_len / score.ref_len, 4), 'hit_cap': capped,
           'short_80pct': round(short / len(sources), 4)}
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
