"""`--mode=score`: the model's log-probability of given source/target pairs, for
filtering a noisy or synthetic corpus.

    python -m jaxnmt.main --mode=score --workdir=W --input=pairs.tsv --output=scores.tsv
    python -m jaxnmt.main --mode=score --workdir=W --input=src.txt --target_input=tgt.txt

`--input` holds `source<TAB>target` lines, or source lines matched line by line with
`--target_input`. Each pair gives one TSV row
`line_index<TAB>total log-probability<TAB>tokens<TAB>per-token mean`: the sum of
log p(target token | source, earlier target tokens) over the target's tokens with its
EOS, in nats, by teacher forcing (`decoding/scoring.py`); a pair with an empty side or a
line without a tab gives `nan` scores and 0 tokens, keeps its row and is counted.
A corpus job like translate's (`decoding/corpus_job.py`): any number of processes,
resumable with `--output`, the same bytes whatever the process count.
"""

import dataclasses
import logging
import sys
from typing import TextIO

import jax

from jaxnmt.data import tags as tags_lib
from jaxnmt.decoding import corpus_job
from jaxnmt.decoding import inference
from jaxnmt.decoding import scoring
from jaxnmt.decoding import translation
from jaxnmt.errors import UserError
from jaxnmt.runtime import files


FIXED_ROWS_LINES = 1000  # as translate's: full rows for big chunks (bounded shapes)


@dataclasses.dataclass(frozen=True)
class _Pair:
  source: str | None  # None: the line was malformed (no tab)
  target: str | None
  replaced: bool


def format_score(line_index: int, score: scoring.Score | None) -> str:
  """One TSV row; None or no tokens: nan scores."""
  if score is None or not score.tokens:
    return f'{line_index}\tnan\t0\tnan\n'
  return f'{line_index}\t{score.total:.4f}\t{score.tokens}\t{score.mean:.4f}\n'


def pairs(input_path: str, target_path: str | None):
  """The pairs of `input_path` (TSV) or of it and `target_path`, line by line."""
  if target_path is None:
    for text, replaced in corpus_job.open_lines(input_path):
      source, tab, target = text.partition('\t')
      yield _Pair(source, target, replaced) if tab else _Pair(None, None, replaced)
    return
  sources = corpus_job.open_lines(input_path)
  targets = corpus_job.open_lines(target_path)
  number = -1
  for number, (source, target) in enumerate(zip(sources, targets)):
    yield _Pair(source[0], target[0], source[1] or target[1])
  for name, rest in ((input_path, sources), (target_path, targets)):
    if next(rest, None) is not None:
      raise UserError(f'--input and --target_input have different line counts: {name} '
                      f'has more than {number + 1} lines')


def run(workdir: str, input_path: str, target_path: str | None = None,
        output: TextIO = sys.stdout, output_path: str | None = None,
        batch_size: int = 64, batch_tokens: int = translation.BATCH_TOKENS,
        step: int | None = None, weights: str = 'auto', devices=None,
        commit_lines: int = corpus_job.CHUNK_LINES, report_every_s: float = 30.0,
        target_lang: str | None = None) -> dict:
  """Scores the pairs of `input_path` (and `target_path`) into `output_path` (a corpus
  job) or else `output`; returns the counts (lines, unscored, replaced, tokens)."""
  if not input_path:
    raise UserError('--mode=score needs --input (TSV source<TAB>target, or source lines '
                    'with --target_input)')
  if batch_tokens < 1:
    raise UserError(f'--batch_tokens must be >= 1, got {batch_tokens}')
  for path in filter(None, (input_path, target_path)):
    files.check_supported(path)
    if not files.exists(path):
      raise UserError(f'{path}: no such file')
  loaded = inference.load(workdir, step, devices or jax.local_devices(), weights=weights)
  if loaded.config.get('task') == 'lm':
    raise UserError('this workdir holds a language model: --mode=score scores translation '
                    'pairs')
  settings = {'mode': 'score', 'input': files.absolute(input_path),
              'target_input': target_path and files.absolute(target_path),
              'batch_size': batch_size, 'batch_tokens': batch_tokens, 'step': loaded.step,
              'weights': loaded.weights, 'local_devices': loaded.mesh.devices.size,
              'target_lang': target_lang}
  tagger = tags_lib.Tagger(loaded.config, loaded.tokenizer, target_lang)

  def score_chunk(first: int, chunk: list) -> tuple[str, dict]:
    usable = [(number, pair) for number, pair in enumerate(chunk, first + 1)
              if pair.source is not None]
    sources = [tagger(pair.source.strip(), number) if pair.source.strip() else ''
               for number, pair in usable]
    results = iter(scoring.score_text(loaded, sources, [p.target for _, p in usable],
                                      batch_size=batch_size, batch_tokens=batch_tokens,
                                      fixed_rows=len(chunk) >= FIXED_ROWS_LINES))
    scores = [None if pair.source is None else next(results) for pair in chunk]
    text = ''.join(format_score(index, score) for index, score in enumerate(scores, first))
    return text, {'tokens': sum(s.tokens for s in scores if s is not None),
                  'unscored': sum(s is None or not s.tokens for s in scores),
                  'replaced': sum(pair.replaced for pair in chunk)}

  summary = corpus_job.run(lambda: pairs(input_path, target_path), output_path,
                           score_chunk, settings, commit_lines, 'score', output,
                           report_every_s)
  if summary:
    logging.info('score: %d pairs (%d not scored: an empty side or no tab; %d with invalid '
                 'UTF-8 replaced), %d target tokens', summary.get('lines', 0),
                 summary.get('unscored', 0), summary.get('replaced', 0),
                 summary.get('tokens', 0))
  return summary


def main(workdir: str, flags) -> None:
  run(workdir, flags.input, flags.target_input, output_path=flags.output,
      batch_size=flags.batch_size, batch_tokens=flags.batch_tokens,
      step=flags.checkpoint_step, weights=flags.weights, commit_lines=flags.commit_lines,
      target_lang=flags.target_lang)
