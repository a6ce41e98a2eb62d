"""Reading parallel corpora as streams of sentence pairs, never whole.

A corpus spec is one of:
  * a TSV file of `source<TAB>target` lines, plain, `.gz` or `.zst` (extra columns,
    e.g. Tatoeba's attribution, are ignored);
  * a `.zip` holding such a TSV (the published Tatoeba `spa-eng.zip`);
  * a Moses-style prefix: `PREFIX.<source_lang>` and `PREFIX.<target_lang>` are two
    line-aligned files (each may be `.gz` or `.zst`).

Malformed lines (not UTF-8, a NUL byte, no tab, an empty side) are skipped and counted
by reason; a file that is missing, empty, cut short or holds no valid pair at all is a
`DataError` naming the file.
"""

import collections
import dataclasses
import gzip
import hashlib
import io
import logging
import os
import secrets
import shutil
import time
import urllib.request
import zipfile
import zlib
from typing import Iterator

from jaxnmt.errors import DataError

DATA_DIR_ENV = 'JAXNMT_DATA_DIR'
DEFAULT_FILENAME = 'spa-eng.zip'
# Published corpora: file name -> sha256 (spa-eng.zip: the 2018-05-13 Tatoeba export).
KNOWN_SHA256 = {
    DEFAULT_FILENAME: 'f80e581ae291aa34dd3aba7bd98b5e9505234da4318e2f3295df70a1520c7f61',
    'tinyshakespeare.txt': '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed',
}
_COMPRESSED = ('.gz', '.zst')

Pair = tuple[str, str]


def resolve_path(path: str, url: str, filename: str = DEFAULT_FILENAME,
                 wait_s: float = 0.0) -> str:
  """The default corpus file: `path` if given, else $JAXNMT_DATA_DIR/<filename>, else a
  cached download of `url` (checked against the published sha256 of known corpora).
  `wait_s`: how long to wait for another process's download to show in the cache
  before downloading here (see inputs.corpus_path: process 0 downloads)."""
  if path:
    return path
  data_dir = os.environ.get(DATA_DIR_ENV)
  if data_dir:
    candidate = os.path.join(data_dir, filename)
    if not os.path.exists(candidate):
      raise DataError(f'${DATA_DIR_ENV}={data_dir} holds no {filename}')
    return candidate
  cache_dir = os.path.join(os.path.expanduser('~'), '.cache', 'jaxnmt')
  cached = os.path.join(cache_dir, filename)
  deadline = time.monotonic() + wait_s
  while not os.path.exists(cached) and time.monotonic() < deadline:
    time.sleep(min(0.5, wait_s))
  if not os.path.exists(cached):
    if wait_s:
      logging.warning('%s did not appear within %.0f s (the cache is not shared with '
                      'process 0): downloading it here too', cached, wait_s)
    _download(url, cached, filename)
  return cached


def _download(url: str, cached: str, filename: str) -> None:
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  logging.info('Downloading %s to %s', url, cached)
  # A name of its own: processes downloading into one cache never write one file.
  partial = f'{cached}.{secrets.token_hex(4)}.partial'
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, 'wb') as out:
      shutil.copyfileobj(response, out)
  except OSError as error:
    if os.path.exists(partial):
      os.remove(partial)
    raise DataError(f'could not download {url} ({error}); set config.data.path or '
                    f'${DATA_DIR_ENV} to a local copy') from error
  digest = file_sha256(partial)
  expected = KNOWN_SHA256.get(filename)
  if expected and digest != expected:
    os.remove(partial)
    raise DataError(f'checksum mismatch for {url}: got {digest}, expected {expected}')
  os.replace(partial, cached)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as handle:
    for block in iter(lambda: handle.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def split_list(value: str) -> list[str]:
  """'a, b,,c' -> ['a', 'b', 'c'] (config fields that hold lists are comma-separated)."""
  return [item.strip() for item in value.split(',') if item.strip()]


def corpus_files(spec: str, source_lang: str, target_lang: str) -> list[str]:
  """The file(s) of one corpus spec: [tsv_or_zip] or [source_file, target_file]."""
  if os.path.isfile(spec):
    return [spec]
  pair = []
  for lang in (source_lang, target_lang):
    found = [spec + f'.{lang}{suffix}' for suffix in ('', *_COMPRESSED)
             if os.path.isfile(spec + f'.{lang}{suffix}')]
    if found:
      pair.append(found[0])
  if len(pair) == 2:
    return pair
  raise DataError(f'{spec}: no such file (nor a file pair {spec}.{source_lang} + '
                  f'{spec}.{target_lang})')


def corpus_name(spec: str) -> str:
  """A short name for a corpus spec: its file name without extensions."""
  name = os.path.basename(spec.rstrip('/'))
  for suffix in (*_COMPRESSED, '.zip', '.tsv', '.txt'):
    name = name.removesuffix(suffix)
  return name or 'corpus'


# ----------------------------------------------------------------------------- lines


def _open_binary(path: str) -> io.BufferedIOBase:
  """A byte stream of `path`, decompressed by its suffix; a zip gives its TSV member."""
  if path.endswith('.gz'):
    return gzip.open(path, 'rb')
  if path.endswith('.zst'):
    import zstandard  # pylint: disable=g-import-not-at-top
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, 'rb')))
  if zipfile.is_zipfile(path):
    archive = zipfile.ZipFile(path)
    members = [n for n in archive.namelist()
               if n.endswith(('.txt', '.tsv')) and not os.path.basename(n).startswith('_')]
    if not members:
      archive.close()
      raise DataError(f'{path}: zip archive holds no .txt or .tsv file of sentence pairs')
    # Prefer the published name; otherwise the largest text file.
    named = [n for n in members if os.path.basename(n) == 'spa.txt']
    member = named[0] if named else max(members, key=lambda n: archive.getinfo(n).file_size)
    return archive.open(member)
  return open(path, 'rb')


def raw_lines(path: str) -> Iterator[bytes]:
  """The lines of `path` (without line ends), streamed; a cut-short or corrupt
  compressed stream is a DataError naming the file and the line reached."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file')
  count = 0
  try:
    with _open_binary(path) as stream:
      for line in stream:
        count += 1
        yield line.rstrip(b'\r\n')
  except (EOFError, OSError, zlib.error, zipfile.BadZipFile) as error:
    raise DataError(f'{path}: unreadable after {count} lines: the file is cut short or '
                    f'corrupt ({type(error).__name__}: {error})') from None
  except Exception as error:  # zstandard.ZstdError has no common base to name
    if type(error).__name__ == 'ZstdError':
      raise DataError(f'{path}: unreadable after {count} lines: the file is cut short or '
                      f'corrupt (ZstdError: {error})') from None
    raise
  if count == 0:
    raise DataError(f'{path}: empty file')


def _decode(raw: bytes) -> tuple[str | None, str | None]:
  """(text, None) or (None, reason)."""
  if b'\0' in raw:
    return None, 'NUL byte (binary data)'
  try:
    return raw.decode('utf-8'), None
  except UnicodeDecodeError:
    return None, 'not UTF-8'


@dataclasses.dataclass
class ReadReport:
  """What reading a corpus found: valid pairs and skipped lines by reason."""
  path: str
  lines: int = 0
  valid: int = 0
  malformed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_malformed_line: int | None = None

  def skip(self, reason: str) -> None:
    self.malformed[reason] += 1
    if self.first_malformed_line is None:
      self.first_malformed_line = self.lines

  def check(self) -> None:
    """A DataError when nothing valid was found; a warning for skipped lines."""
    if not self.valid:
      reasons = ', '.join(f'{n} {reason}' for reason, n in self.malformed.most_common())
      raise DataError(f'{self.path}: no valid sentence pair in {self.lines} lines '
                      f'({reasons or "none read"}); expected `source<TAB>target` lines or '
                      f'a file pair')
    if self.malformed:
      details = ', '.join(f'{n} {reason}' for reason, n in self.malformed.items())
      logging.warning('%s: skipped %d malformed lines (%s); first at line %d', self.path,
                      sum(self.malformed.values()), details, self.first_malformed_line)


def iter_pairs(spec: str, source_lang: str = 'en', target_lang: str = 'es',
               reverse: bool = False,
               report: ReadReport | None = None) -> Iterator[Pair]:
  """Streams the valid (source, target) pairs of one corpus spec, counting malformed
  lines in `report` (call `report.check()` after the last pair). `reverse` swaps the
  sides: the files hold source_lang -> target_lang, the pairs come out the other way."""
  files = corpus_files(spec, source_lang, target_lang)
  report = report if report is not None else ReadReport(spec)
  if len(files) == 1:
    for raw in raw_lines(files[0]):
      report.lines += 1
      text, reason = _decode(raw)
      if text is not None:
        fields = text.split('\t')
        if not text.strip():
          reason = 'blank line'
        elif len(fields) < 2:
          reason = 'no tab'
        elif not fields[0].strip() or not fields[1].strip():
          reason = 'empty side'
      if reason:
        report.skip(reason)
        continue
      report.valid += 1
      pair = (fields[0].strip(), fields[1].strip())
      yield pair[::-1] if reverse else pair
    return
  source_lines, target_lines = raw_lines(files[0]), raw_lines(files[1])
  for raw_source in source_lines:
    raw_target = next(target_lines, None)
    if raw_target is None:
      raise DataError(f'{files[1]} has fewer lines than {files[0]} ({report.lines}): '
                      f'the files of a pair must be line-aligned')
    report.lines += 1
    (source, bad_source), (target, bad_target) = _decode(raw_source), _decode(raw_target)
    reason = bad_source or bad_target
    if not reason and '\t' in source + target:
      reason = 'tab inside a sentence'
    elif not reason and (not source.strip() or not target.strip()):
      reason = 'empty side' if source.strip() or target.strip() else 'blank line'
    if reason:
      report.skip(reason)
      continue
    report.valid += 1
    pair = (source.strip(), target.strip())
    yield pair[::-1] if reverse else pair
  if next(target_lines, None) is not None:
    raise DataError(f'{files[1]} has more lines than {files[0]} ({report.lines}): the '
                    f'files of a pair must be line-aligned')


def read_pairs(spec: str, source_lang: str = 'en', target_lang: str = 'es',
               reverse: bool = False) -> tuple[list[Pair], ReadReport]:
  """All valid pairs of a (small) corpus, e.g. a test set, and the read report."""
  report = ReadReport(spec)
  pairs = list(iter_pairs(spec, source_lang, target_lang, reverse, report))
  report.check()
  return pairs, report


# ----------------------------------------------------------------------------- splits


def heldout_fraction_point(source: str, seed: int) -> float:
  """A uniform number in [0, 1) fixed by the source sentence and the seed: the split
  is decided per *source sentence* (every translation of a source lands in the same
  split) and needs no pass over the whole corpus."""
  digest = hashlib.blake2b(source.encode('utf-8'), digest_size=8,
                           key=str(seed).encode()).digest()
  return int.from_bytes(digest, 'little') / 2.0**64


def assign_split(source: str, valid_fraction: float, test_fraction: float,
                 seed: int) -> str:
  """'test', 'valid' or 'train' for a pair with this source sentence."""
  point = heldout_fraction_point(source, seed)
  if point < test_fraction:
    return 'test'
  return 'valid' if point < test_fraction + valid_fraction else 'train'
