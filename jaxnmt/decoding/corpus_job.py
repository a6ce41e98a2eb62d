"""A corpus translated (or scored) on every process of a job, resumably: what
`--mode=translate --input=... --output=...` and `--mode=score` run.

    corpus --> global line index --> chunks of `chunk_lines` lines --> chunk c to
    process c mod N --> decoded on that process's own devices --> OUTPUT.parts/<c>
    (committed whole) --> process 0 joins the parts in order into OUTPUT

* **Same bytes on any number of processes.** A chunk is planned alone (its lines sorted
  by length into decode batches, `Translator.plan`), so every chunk is decoded in
  exactly the batches a one-process run makes of it, whichever process takes it;
  sampling keys come from line numbers (`Translator.decode_encoded`). Processes must
  have the same number of local devices as the run they are compared with (a batch's
  rows are a multiple of it); the job records it.
* **Resumable.** A chunk's output is written whole (`files.write_bytes`: a local
  `.partial` renamed, or one gs:// upload) and then its counts file, which marks it
  done; a killed or preempted job run again with the same flags skips the done chunks
  and redoes the others: no line lost, none written twice. `OUTPUT.parts/job.json`
  holds the settings that shape the output; a rerun with others is refused with one
  line. Once every chunk is done, process 0 streams the parts into OUTPUT (a `.partial`
  renamed, or one upload) and removes OUTPUT.parts.
* **Streaming.** Input is read a line at a time (text, `.gz`, `.zst`; local or gs://;
  or the source side of a prepared corpus, `open_prepared`), at most one chunk is
  held, and memory does not grow with the corpus.
* **Bad lines keep their place**: an empty line gives an empty output line, invalid
  UTF-8 is replaced (U+FFFD); both are counted and reported at the end.
* **Progress**: every `report_every_s`, each process logs its lines done, sentences/s,
  output tokens/s and ETA for its share.
"""

import gzip
import io
import json
import logging
import math
import os
import time
from typing import Callable, Iterable, Iterator

import jax
import numpy as np

from jaxnmt.data import prepare as prepare_lib
from jaxnmt.data import records as records_lib
from jaxnmt.errors import UserError
from jaxnmt.runtime import distributed
from jaxnmt.runtime import files

CHUNK_LINES = 10_000  # default lines per committed chunk (--commit_lines)
JOB_FILE = 'job.json'


def open_lines(path: str) -> Iterator[tuple[str, bool]]:
  """(line without its line end, whether invalid UTF-8 was replaced) for each line of
  `path` (local or gs://; .gz and .zst by suffix), streamed."""
  try:
    stream = files.open_binary(path, 'rb')
  except OSError as error:
    raise UserError(f'--input={path}: {error.strerror or error}') from None
  with stream:
    if path.endswith('.gz'):
      stream = gzip.GzipFile(fileobj=stream)
    elif path.endswith('.zst'):
      import zstandard  # pylint: disable=g-import-not-at-top
      stream = zstandard.ZstdDecompressor().stream_reader(stream)
    count = 0
    try:
      for raw in io.BufferedReader(stream) if path.endswith('.zst') else stream:
        count += 1
        raw = raw.rstrip(b'\n').rstrip(b'\r')
        try:
          yield raw.decode('utf-8'), False
        except UnicodeDecodeError:
          yield raw.decode('utf-8', errors='replace'), True
    except (OSError, EOFError, ValueError) as error:  # cut short, corrupt
      raise UserError(f'{path}: unreadable after {count} lines ({error}): the file is cut '
                      f'short or corrupt') from None


def is_prepared(path: str) -> bool:
  """Whether `path` is a prepared corpus (`--mode=prepare`: a folder with a manifest)."""
  return os.path.isfile(os.path.join(path, prepare_lib.MANIFEST))


def open_prepared(directory: str, tokenizer, tokenizer_sha256: str
                  ) -> Iterator[tuple[str, bool]]:
  """(source text, False) of every pair of a prepared corpus, in its order (corpora
  as the manifest lists them, then shards, then records), streamed. The corpus must be
  tokenized by `tokenizer` (whose file's sha256 is `tokenizer_sha256`): the ids are
  the model's own, and their text (tags included) is what the model is given."""
  manifest = prepare_lib.load_manifest(directory)
  if manifest['tokenizer_sha256'] != tokenizer_sha256:
    raise UserError(f'--input={directory} was prepared with another tokenizer than the '
                    f"model's (sha256 {manifest['tokenizer_sha256'][:12]}, the model's "
                    f'{tokenizer_sha256[:12]}): translate its text files instead')
  dtype = np.dtype(manifest['record_dtype'])
  for corpus in prepare_lib.open_corpora(manifest, directory):
    for start in range(0, len(corpus), _PREPARED_BLOCK):
      records = corpus.__getitems__(range(start, min(start + _PREPARED_BLOCK, len(corpus))))
      for record in records:
        yield tokenizer.decode(records_lib.decode_record(record, dtype)[0]), False


_PREPARED_BLOCK = 1024  # records read at once from a prepared corpus


def count_lines(items: Iterable) -> int:
  return sum(1 for _ in items)


class Progress:
  """Logs lines done, sentences/s, tokens/s and an ETA every `every_s` seconds."""

  def __init__(self, what: str, total: int, every_s: float = 30.0):
    self.what, self.total, self.every_s = what, total, every_s
    self.lines = self.tokens = 0
    self.started = self._reported = time.monotonic()

  def add(self, lines: int, tokens: int) -> None:
    self.lines += lines
    self.tokens += tokens
    if time.monotonic() - self._reported >= self.every_s or self.lines >= self.total:
      self.report()

  def report(self) -> None:
    self._reported = now = time.monotonic()
    seconds = max(now - self.started, 1e-9)
    rate = self.lines / seconds
    eta = (self.total - self.lines) / rate if rate else math.inf
    logging.info('%s: %d of %d lines (%.1f%%), %.1f sentences/s, %.0f tokens/s, ETA %s',
                 self.what, self.lines, self.total, 100 * self.lines / max(self.total, 1),
                 rate, self.tokens / seconds, _duration(eta))


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return (f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else
          f'{seconds // 60}m{seconds % 60:02d}s')


# A chunk's work: (first line number, [items]) -> (output text, counts); counts hold at
# least 'tokens' (for the progress rate) and whatever else is summed in the summary.
ChunkFunction = Callable[[int, list], tuple[str, dict]]


def run(items: Callable[[], Iterable], output: str | None, process_chunk: ChunkFunction,
        settings: dict, chunk_lines: int = CHUNK_LINES, what: str = 'translate',
        stream=None, report_every_s: float = 30.0) -> dict:
  """Runs `process_chunk` over `items()` (an iterable made anew for each pass) in chunks
  of `chunk_lines`, on every process; the outputs, in order, go to `output` (a path:
  resumable, any process count) or to `stream` (one process; written as each chunk is
  done). Returns the summed counts of every chunk (on process 0; the others: theirs)."""
  if chunk_lines < 1:
    raise UserError(f'--commit_lines must be >= 1, got {chunk_lines}')
  processes, index = jax.process_count(), jax.process_index()
  if output is None:
    if processes > 1:
      raise UserError(f'{what} on {processes} processes needs --output (each process '
                      f'writes its part of it)')
    return _to_stream(items, stream, process_chunk, chunk_lines, what, report_every_s)
  files.check_supported(output)
  parts = output.rstrip('/') + '.parts'
  job = _start(items, parts, settings, chunk_lines, what)
  total = job['lines']
  chunks = math.ceil(total / chunk_lines)
  mine = [c for c in range(chunks) if c % processes == index and not _done(parts, c)]
  share = sum(min(chunk_lines, total - c * chunk_lines) for c in mine)
  done_before = chunks - len([c for c in range(chunks) if not _done(parts, c)])
  logging.info('%s: %d lines in %d chunks of %d; %d chunks done before; process %d of %d '
               'takes %d chunks (%d lines)', what, total, chunks, chunk_lines, done_before,
               index, processes, len(mine), share)
  progress = Progress(f'{what} (process {index})', share, report_every_s)
  wanted = set(mine)
  for chunk, first, batch in _chunks(items(), chunk_lines, wanted):
    text, counts = process_chunk(first, batch)
    files.write_text(_part(parts, chunk), text)
    files.write_text(_counts(parts, chunk), json.dumps(dict(counts, lines=len(batch))))
    progress.add(len(batch), counts.get('tokens', 0))
  # Every process waits for the slowest (bounded by the peer watch, not a timeout).
  distributed.barrier(f'the end of {what}', timeout_s=distributed.LONG_WAIT_S)
  summary = {}
  if index == 0:
    summary = _merge(parts, output, chunks)
  distributed.barrier(f'{what}: joining the parts', timeout_s=distributed.LONG_WAIT_S)
  return summary


def _to_stream(items, stream, process_chunk, chunk_lines, what, report_every_s) -> dict:
  """One process, no --output: chunk after chunk, written and flushed in order."""
  summary = {}
  progress = Progress(what, 0, report_every_s)
  for _, first, batch in _chunks(items(), chunk_lines, None):
    text, counts = process_chunk(first, batch)
    stream.write(text)
    stream.flush()
    _add(summary, dict(counts, lines=len(batch)))
    progress.total += len(batch)
    progress.add(len(batch), counts.get('tokens', 0))
  return summary


def _chunks(items: Iterable, chunk_lines: int, wanted: set | None
            ) -> Iterator[tuple[int, int, list]]:
  """(chunk number, its first line number, its items) of the chunks in `wanted` (None:
  all); the others are read past, not kept."""
  batch, chunk = [], 0
  for number, item in enumerate(items):
    chunk = number // chunk_lines
    if wanted is None or chunk in wanted:
      batch.append(item)
    if (number + 1) % chunk_lines == 0:
      if batch:
        yield chunk, chunk * chunk_lines, batch
      batch = []
  if batch:
    yield chunk, chunk * chunk_lines, batch


def _part(parts: str, chunk: int) -> str:
  return files.join(parts, f'{chunk:08d}.txt')


def _counts(parts: str, chunk: int) -> str:
  return files.join(parts, f'{chunk:08d}.json')


def _done(parts: str, chunk: int) -> bool:
  return files.exists(_counts(parts, chunk))


def _start(items, parts: str, settings: dict, chunk_lines: int, what: str) -> dict:
  """The job of `parts` (process 0 starts it, or checks a rerun's settings against the
  one found), on every process."""
  settings = json.loads(json.dumps(dict(settings, chunk_lines=chunk_lines)))
  job, error = None, None
  if jax.process_index() == 0:
    target = files.join(parts, JOB_FILE)
    if files.exists(target):
      job = files.read_json(target)
      changed = sorted(key for key in set(job['settings']) | set(settings)
                       if job['settings'].get(key) != settings.get(key))
      if changed:
        error = (f'{parts} holds an unfinished {what} job with other settings ('
                 + ', '.join(f'{key}: {job["settings"].get(key)!r} then, '
                             f'{settings.get(key)!r} now' for key in changed)
                 + '): rerun with the same flags to resume it, or remove it to start over')
      else:
        logging.info('%s: resuming the job in %s', what, parts)
    else:
      started = time.monotonic()
      job = {'settings': settings, 'lines': count_lines(items())}
      logging.info('%s: %d input lines (counted in %.1f s)', what, job['lines'],
                   time.monotonic() - started)
      files.makedirs(parts)
      files.write_text(target, json.dumps(job, indent=1) + '\n')
  distributed.barrier(f'{what}: the job plan', timeout_s=distributed.LONG_WAIT_S)
  job, error = distributed.gather_json([job, error], f'{what}: the job plan')[0]
  if error:
    raise UserError(error)
  return job


def _merge(parts: str, output: str, chunks: int) -> dict:
  """Streams the parts, in order, into `output` (published whole), removes `parts` and
  returns the summed counts."""
  summary = {}
  missing = [c for c in range(chunks) if not _done(parts, c)]
  if missing:
    raise UserError(f'{parts}: chunks {missing[:10]} are not done although every process '
                    f'finished: rerun the same command to redo them')
  for chunk in range(chunks):
    _add(summary, files.read_json(_counts(parts, chunk)))
  target = output if files.is_remote(output) else output + '.partial'
  with files.open_binary(target, 'wb') as handle:
    for chunk in range(chunks):
      with files.open_binary(_part(parts, chunk), 'rb') as part:
        while block := part.read(1 << 20):
          handle.write(block)
  if target != output:
    files.move(target, output)
  files.rmtree(parts)
  return summary


def _add(summary: dict, counts: dict) -> None:
  for key, value in counts.items():
    summary[key] = summary.get(key, 0) + value
