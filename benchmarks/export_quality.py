"""A workdir's model against its CTranslate2 exports on the test split: BLEU and target
tokens per second of jaxnmt's beam search and of CTranslate2 (float32 and int8), same
machine, same run, the same search (beam 4, length_penalty 0, jaxnmt's output cap per
sentence).

  python benchmarks/export_quality.py --workdir=runs/tiny [--sentences=0] [--threads=2]
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

import ctranslate2
import sacrebleu
import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxnmt.decoding import inference  # pylint: disable=wrong-import-position
from jaxnmt.decoding import translation  # pylint: disable=wrong-import-position
from jaxnmt.runtime import files  # pylint: disable=wrong-import-position
from jaxnmt.runtime import host  # pylint: disable=wrong-import-position


def ct2_translate(translator, processor, config, lines, beam: int) -> list[str]:
  """CTranslate2's translations, each sentence capped as jaxnmt caps it (EOS not
  counted), grouped by cap."""
  pieces = [processor.encode(line, out_type=str) for line in lines]
  groups = collections.defaultdict(list)
  for index, tokens in enumerate(pieces):
    groups[translation.output_cap(len(tokens) + 1, config.decode, None)].append(index)
  out = [''] * len(lines)
  for cap, indices in groups.items():
    results = translator.translate_batch([pieces[i] for i in indices], beam_size=beam,
                                         length_penalty=0.0, max_decoding_length=cap - 1,
                                         min_decoding_length=0, max_batch_size=64)
    for i, result in zip(indices, results):
      out[i] = processor.decode(result.hypotheses[0])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--sentences', type=int, default=0, help='0: the whole test split')
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--beam', type=int, default=4)
  args = parser.parse_args()
  host.prepare('auto', 'auto', multi_process=False, decoding=True)
  config = files.load_config(args.workdir)
  lines = files.read_lines(files.split_file(args.workdir, 'test.src'))
  references = files.read_lines(files.split_file(args.workdir, 'test.ref'))
  if args.sentences:
    lines, references = lines[:args.sentences], references[:args.sentences]
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    # CTranslate2 first, exported by `--mode=export` in a process of its own: once this
    # process has started JAX's CPU runtime, its threads slow CTranslate2's down.
    for quantization in ('float32', 'int8'):
      output = os.path.join(scratch, quantization)
      subprocess.run([sys.executable, '-m', 'jaxnmt.main', '--mode=export',
                      f'--workdir={args.workdir}', f'--output={output}',
                      f'--quantization={quantization}'], check=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      processor = spm.SentencePieceProcessor(model_file=os.path.join(
          output, 'sentencepiece.model'))
      ct2 = ctranslate2.Translator(output, compute_type=quantization,
                                   intra_threads=args.threads)
      ct2_translate(ct2, processor, config, lines[:64], args.beam)  # warm up
      started = time.perf_counter()
      theirs = ct2_translate(ct2, processor, config, lines, args.beam)
      rows.append((f'ctranslate2 {quantization}', theirs, time.perf_counter() - started))
  loaded = inference.load(args.workdir)
  translator = translation.Translator(loaded, translation.DecodeOptions(
      beam_size=args.beam, length_penalty=0.0))
  translator.translate(lines[:64])  # compile the common shapes
  started = time.perf_counter()
  ours = translator.translate(lines)
  rows.insert(0, ('jaxnmt', ours, time.perf_counter() - started))
  print(f'{len(lines)} test sentences of {args.workdir}, beam {args.beam}, length_penalty 0, '
        f'ctranslate2 {ctranslate2.__version__} ({args.threads} threads), {host.describe()}')
  print('| decoder | BLEU | identical to jaxnmt | target tokens/s |')
  print('|---|---|---|---|')
  for name, hypotheses, seconds in rows:
    tokens = sum(len(loaded.tokenizer.encode_target(h)) + 1 for h in hypotheses)
    same = sum(a == b for a, b in zip(hypotheses, ours))
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    print(f'| {name} | {bleu:.2f} | {same}/{len(lines)} | {tokens / seconds:,.0f} |')


if __name__ == '__main__':
  main()
