"""Decoding throughput of a trained workdir: greedy and beam search (and with
--uncached, without the KV cache too) on the first N sentences of its test split.
Each configuration decodes the sentences once to compile, then is timed on the best
of --repeats passes.

  python benchmarks/decode_speed.py --workdir=runs/tiny --sentences=1024
"""

import json
import os
import time

from absl import app
from absl import flags

import _load

flags.DEFINE_string('workdir', None, 'A trained translation workdir.', required=True)
flags.DEFINE_integer('sentences', 256, 'Test sentences to decode.')
flags.DEFINE_integer('batch_size', 64, 'Sentences per batch.')
flags.DEFINE_list('beams', ['1', '4'], 'Beam sizes (1 = greedy).')
flags.DEFINE_float('length_penalty', 1.0, 'GNMT alpha of beam search.')
flags.DEFINE_string('weights', 'auto', 'auto, raw, ema or an averaged name.')
flags.DEFINE_bool('uncached', False, 'Also time decoding without the KV cache.')
flags.DEFINE_integer('repeats', 2, 'Timed passes (the best counts).')
FLAGS = flags.FLAGS


def main(_):
  from jaxnmt.runtime import host  # pylint: disable=g-import-not-at-top
  from jaxnmt.decoding import translation  # pylint: disable=g-import-not-at-top
  host.prepare('auto', 'auto', multi_process=False, decoding=True)  # as translate does
  loaded = _load.trained_model(FLAGS.workdir, FLAGS.weights)
  with open(os.path.join(FLAGS.workdir, 'splits', 'test.src'), encoding='utf-8') as handle:
    sources = handle.read().splitlines()[:FLAGS.sentences]
  rows = []
  for beam in map(int, FLAGS.beams):
    for use_cache in (True, False) if FLAGS.uncached else (True,):
      options = translation.DecodeOptions(beam_size=beam, use_cache=use_cache,
                                        length_penalty=FLAGS.length_penalty)
      translator = translation.Translator(loaded, options)
      translator.translate(sources, FLAGS.batch_size)  # compile every bucket shape
      seconds = float('inf')
      for _ in range(FLAGS.repeats):
        started = time.perf_counter()
        outputs = translator.translate(sources, FLAGS.batch_size)
        seconds = min(seconds, time.perf_counter() - started)
      tokens = sum(len(translator.tokenizer.encode(line)) + 1 for line in outputs)
      rows.append({'beam': beam, 'kv_cache': use_cache, 'seconds': seconds,
                   'sentences_per_sec': len(sources) / seconds,
                   'output_tokens_per_sec': tokens / seconds})
      print(json.dumps(rows[-1]), flush=True)
  for beam in map(int, FLAGS.beams) if FLAGS.uncached else ():
    cached, uncached = [r['seconds'] for r in rows if r['beam'] == beam]
    print(f'beam {beam}: KV cache is {uncached / cached:.2f}x faster than recomputation')


if __name__ == '__main__':
  app.run(main)
