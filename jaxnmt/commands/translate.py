"""`--mode=translate`: a checkpoint translates lines of text, from stdin or a file.

Stdin is streamed like fairseq-interactive or Marian: a reader thread queues lines, and
the decode loop blocks for the first, takes only what is already queued (up to a token
budget), decodes it and writes and flushes its translations at once, so it works
interactively and in pipes.

`--input=CORPUS` (text, .gz or .zst; local or gs://) is translated in chunks of
`--commit_lines` lines (`decoding/corpus_job.py`): to stdout as each chunk is done, or
with `--output=OUT` on any number of processes, each decoding its share of the chunks,
resumably (a killed job rerun with the same flags goes on where it stopped), into one
OUT that is byte for byte the same whatever the process count. `--input` may also be a
prepared corpus (a `--mode=prepare` folder tokenized with the model's tokenizer): its
source side is translated in the prepared order and each row is
`source<TAB>translation`, a corpus for another run (distillation).

Each line gives one translation line, or with `--nbest=N` N TSV rows
`line_index<TAB>rank<TAB>score<TAB>translation` (`format_nbest`). Batching, decoding and
long lines are `translation.Translator`'s.
"""

import dataclasses
import logging
import queue
import sys
import threading
from typing import Sequence, TextIO

import jax

from jaxnmt.data import tags as tags_lib
from jaxnmt.decoding import corpus_job
from jaxnmt.decoding import translation
from jaxnmt.errors import UserError
from jaxnmt.runtime import files


def format_nbest(line_index: int, hypotheses: Sequence[translation.Hypothesis]) -> str:
  """TSV rows `line_index<TAB>rank<TAB>score<TAB>translation` (0-based index and rank)."""
  return ''.join(f'{line_index}\t{rank}\t{h.score:.4f}\t{_one_line(h.text).replace(chr(9), " ")}\n'
                 for rank, h in enumerate(hypotheses))


# Every character str.splitlines breaks at: a translation stays one line for any reader.
_LINE_BREAKS = str.maketrans(dict.fromkeys('\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029', ' '))


def _one_line(text: str) -> str:
  """`text` on one line (a model may emit a line break through byte fallback)."""
  return text.translate(_LINE_BREAKS)


def run(workdir: str, input_path: str | None, output: TextIO = sys.stdout,
        batch_size: int = 64, options: translation.DecodeOptions = translation.DecodeOptions(),
        nbest: int = 0, step: int | None = None, batch_tokens: int = translation.BATCH_TOKENS,
        weights: str = 'auto', source: TextIO | None = None, devices=None,
        output_path: str | None = None, commit_lines: int = corpus_job.CHUNK_LINES,
        report_every_s: float = 30.0, target_lang: str | None = None) -> dict:
  """Translates the lines of `input_path` (else streams `source`, default stdin) to
  `output_path` (a corpus job: any process count, resumable) or else to `output`: one
  translation per line, or with nbest >= 1 that many TSV rows (`format_nbest`).
  Decodes on all local devices unless `devices` says otherwise. Returns the counts of
  an --input run (lines, empty, replaced, tokens)."""
  if batch_tokens < 1:
    raise UserError(f'--batch_tokens must be >= 1, got {batch_tokens}')
  if not 0 <= nbest <= options.max_nbest:
    raise UserError(f'--nbest must be in [0, {options.max_nbest}] for {options.strategy} '
                    f'decoding (beam search gives at most --beam_size), got {nbest}')
  if output_path and not input_path:
    raise UserError('--output needs --input (stdin is translated to stdout)')
  if input_path:
    files.check_supported(input_path)
    if not files.exists(input_path):
      raise UserError(f'--input={input_path}: no such file')
  translator = translation.Translator.from_workdir(
      workdir, step, options, devices or jax.local_devices(), weights, batch_tokens,
      target_lang)
  summary = {}
  if input_path:
    settings = {'mode': 'translate', 'input': files.absolute(input_path),
                'options': dataclasses.asdict(options), 'nbest': nbest,
                'batch_size': batch_size, 'batch_tokens': batch_tokens,
                'step': translator.step, 'weights': translator.loaded.weights,
                'local_devices': translator.devices, 'target_lang': target_lang}
    prepared = corpus_job.is_prepared(input_path)
    if prepared:
      items = lambda: corpus_job.open_prepared(input_path, translator.tokenizer,
                                               translator.loaded.tokenizer_sha256)
      settings['input'] += ' (prepared)'
    else:
      items = lambda: corpus_job.open_lines(input_path)
    summary = corpus_job.run(
        items, output_path,
        lambda first, lines: _translate_chunk(translator, first, lines, nbest, batch_size,
                                              with_source=prepared and not nbest),
        settings, commit_lines, 'translate', output, report_every_s)
    if summary:
      logging.info('translate: %d lines (%d empty, %d with invalid UTF-8 replaced), %d '
                   'output tokens', summary.get('lines', 0), summary.get('empty', 0),
                   summary.get('replaced', 0), summary.get('tokens', 0))
  else:
    stream(translator, sys.stdin if source is None else source, output, nbest, batch_size)
  if translator.long_lines:
    logging.info('%d line(s) were longer than the training length', translator.long_lines)
  return summary


# A chunk of at least this many lines pads each length bucket's last batch to the full
# row count: every new decode shape costs XLA:CPU 30-60 MiB that stays resident, and
# varying last-batch rows kept adding shapes chunk after chunk (BUILD_NOTES, "Corpus
# jobs"); smaller inputs keep the smallest row count that holds them.
FIXED_ROWS_LINES = 1000


def _translate_chunk(translator: translation.Translator, first: int, lines: list,
                     nbest: int, batch_size: int, with_source: bool = False
                     ) -> tuple[str, dict]:
  """One chunk of a corpus job: (its output text, its counts). with_source: rows
  `source<TAB>translation`, the source without its tags (a corpus for another run)."""
  texts = [text for text, _ in lines]
  before = translator.output_tokens
  results = translator.decode_encoded(translator.encode(texts, first), max(nbest, 1),
                                      batch_size, scores=nbest > 0, first_index=first,
                                      fixed_rows=len(lines) >= FIXED_ROWS_LINES)
  text = ''.join(format_nbest(index, hypotheses) if nbest else
                 _source_column(translator, source) * with_source
                 + _one_line(hypotheses[0].text) + '\n'
                 for (index, hypotheses), source in zip(enumerate(results, first), texts))
  return text, {'tokens': translator.output_tokens - before,
                'empty': sum(not text.strip() for text in texts),
                'replaced': sum(replaced for _, replaced in lines)}


def _source_column(translator: translation.Translator, source: str) -> str:
  untagged = tags_lib.split_tags(source, translator.tokenizer.tags)[1]
  return _one_line(untagged).replace('\t', ' ') + '\t'


def stream(translator: translation.Translator, source: TextIO, output: TextIO, nbest: int = 0,
           batch_size: int = 64) -> None:
  """Translates `source` line by line as it arrives: each round blocks for one line,
  adds the lines already queued (up to 4 x batch_tokens tokens, never waiting for
  more), decodes them together and writes and flushes their translations."""
  lines = queue.Queue()

  def read():
    try:
      for line in iter(source.readline, ''):
        lines.put(line.rstrip('\r\n'))
    finally:
      lines.put(None)  # end of input (or a read error, which ends it too)

  threading.Thread(target=read, name='translate-stdin', daemon=True).start()
  done, count = False, 0
  while not done:
    line = lines.get()
    if line is None:
      break
    encoded = translator.encode([line], count)
    tokens = translation.source_tokens(encoded[0])
    while tokens < 4 * translator.batch_tokens:
      try:
        line = lines.get_nowait()
      except queue.Empty:
        break
      if line is None:
        done = True
        break
      encoded += translator.encode([line], count + len(encoded))
      tokens += translation.source_tokens(encoded[-1])
    results = translator.decode_encoded(encoded, max(nbest, 1), batch_size,
                                        scores=nbest > 0, first_index=count)
    _write(output, results, count, nbest)
    count += len(encoded)


def _write(output: TextIO, results: list[list[translation.Hypothesis]], first_index: int,
           nbest: int) -> None:
  """Writes `results` (lines numbered from `first_index`) and flushes `output`."""
  for index, hypotheses in enumerate(results, first_index):
    output.write(format_nbest(index, hypotheses) if nbest else
                 _one_line(hypotheses[0].text) + '\n')
  output.flush()


def main(workdir: str, flags) -> None:
  run(workdir, flags.input, batch_size=flags.batch_size,
      options=translation.DecodeOptions.from_flags(flags), nbest=flags.nbest,
      step=flags.checkpoint_step, batch_tokens=flags.batch_tokens, weights=flags.weights,
      output_path=flags.output, commit_lines=flags.commit_lines,
      target_lang=flags.target_lang)
