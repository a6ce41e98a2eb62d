"""`--mode=translate`: a checkpoint translates lines of text, from stdin or a file.

Stdin is streamed like fairseq-interactive or Marian: a reader thread queues lines, and
the decode loop blocks for the first, takes only what is already queued (up to a token
budget), decodes it and writes and flushes its translations at once, so it works
interactively and in pipes. `--input=FILE` reads the whole file first.

Each line gives one translation line, or with `--nbest=N` N TSV rows
`line_index<TAB>rank<TAB>score<TAB>translation` (`format_nbest`). Batching, decoding and
long lines are `translation.Translator`'s.
"""

import logging
import queue
import sys
import threading
from typing import Sequence, TextIO

import jax

from jaxnmt.decoding import translation
from jaxnmt.errors import UserError


def format_nbest(line_index: int, hypotheses: Sequence[translation.Hypothesis]) -> str:
  """TSV rows `line_index<TAB>rank<TAB>score<TAB>translation` (0-based index and rank)."""
  return ''.join(f'{line_index}\t{rank}\t{h.score:.4f}\t{h.text.replace(chr(9), " ")}\n'
                 for rank, h in enumerate(hypotheses))


def run(workdir: str, input_path: str | None, output: TextIO = sys.stdout,
        batch_size: int = 64, options: translation.DecodeOptions = translation.DecodeOptions(),
        nbest: int = 0, step: int | None = None, batch_tokens: int = translation.BATCH_TOKENS,
        weights: str = 'auto', source: TextIO | None = None, devices=None) -> None:
  """Translates the lines of `input_path` (else streams `source`, default stdin) to
  `output`: one translation per line, or with nbest >= 1 that many TSV rows
  (`format_nbest`). Decodes on all local devices unless `devices` says otherwise."""
  if batch_tokens < 1:
    raise UserError(f'--batch_tokens must be >= 1, got {batch_tokens}')
  if not 0 <= nbest <= options.max_nbest:
    raise UserError(f'--nbest must be in [0, {options.max_nbest}] for {options.strategy} '
                    f'decoding (beam search gives at most --beam_size), got {nbest}')
  lines = None
  if input_path:
    try:
      with open(input_path, encoding='utf-8', errors='replace') as handle:
        lines = handle.read().splitlines()
    except OSError as error:
      raise UserError(f'--input={input_path}: {error.strerror}') from None
  translator = translation.Translator.from_workdir(
      workdir, step, options, devices or jax.local_devices(), weights, batch_tokens)
  if lines is not None:
    results = translator.decode_encoded(translator.encode(lines), max(nbest, 1), batch_size,
                                        progress=True, scores=nbest > 0)
    _write(output, results, 0, nbest)
  else:
    stream(translator, sys.stdin if source is None else source, output, nbest, batch_size)
  if translator.long_lines:
    logging.info('%d line(s) were longer than the training length', translator.long_lines)


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
                                        scores=nbest > 0)
    _write(output, results, count, nbest)
    count += len(encoded)


def _write(output: TextIO, results: list[list[translation.Hypothesis]], first_index: int,
           nbest: int) -> None:
  """Writes `results` (lines numbered from `first_index`) and flushes `output`."""
  for index, hypotheses in enumerate(results, first_index):
    output.write(format_nbest(index, hypotheses) if nbest else hypotheses[0].text + '\n')
  output.flush()


def main(workdir: str, flags) -> None:
  run(workdir, flags.input, batch_size=flags.batch_size,
      options=translation.DecodeOptions.from_flags(flags), nbest=flags.nbest,
      step=flags.checkpoint_step, batch_tokens=flags.batch_tokens, weights=flags.weights)
