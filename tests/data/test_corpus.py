"""data/corpus: every corpus format read alike, malformed lines skipped and counted,
bad input one clear error naming the file, the data directory, and the held-out split
by source sentence."""

import gzip
import zipfile

import pytest

from jaxnmt import errors
from jaxnmt.data import corpus


def write_lines(path, lines: list[bytes]) -> str:
  path.write_bytes(b'\n'.join(lines) + b'\n')
  return str(path)



def test_malformed_lines_are_skipped_and_counted(tmp_path):
  path = write_lines(tmp_path / 'pairs.tsv', [
      b'Hello.\tHola.',
      b'no tab here',
      b'\tempty source',
      b'empty target\t   ',
      b'bad bytes \xff\xfe\tmal',
      b'',
      b'nul \x00 byte\tx',
      b'Go.\tVe.\tCC-BY 2.0 (France) Attribution: tatoeba.org',
  ])
  pairs, report = corpus.read_pairs(path)
  assert pairs == [('Hello.', 'Hola.'), ('Go.', 'Ve.')]
  assert report.malformed == {'no tab': 1, 'empty side': 2, 'not UTF-8': 1, 'blank line': 1,
                              'NUL byte (binary data)': 1}
  assert report.first_malformed_line == 2 and report.lines == 8


def test_every_format_gives_the_same_pairs(tmp_path):
  lines = ['Go.\tVe.', 'Hi.\tHola.', 'I ran.\tCorrí.']
  text = '\n'.join(lines) + '\n'
  expected = [tuple(line.split('\t')) for line in lines]
  (tmp_path / 'plain.tsv').write_text(text, encoding='utf-8')
  with gzip.open(tmp_path / 'pairs.tsv.gz', 'wt', encoding='utf-8') as handle:
    handle.write(text)
  import zstandard  # pylint: disable=g-import-not-at-top
  (tmp_path / 'pairs.tsv.zst').write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
  with zipfile.ZipFile(tmp_path / 'spa-eng.zip', 'w') as archive:
    archive.writestr('spa-eng/_about.txt', 'about the data')
    archive.writestr('spa-eng/spa.txt', text)
  (tmp_path / 'train.en').write_text(''.join(s + '\n' for s, _ in expected), encoding='utf-8')
  with gzip.open(tmp_path / 'train.es.gz', 'wt', encoding='utf-8') as handle:
    handle.write(''.join(t + '\n' for _, t in expected))
  for spec in ('plain.tsv', 'pairs.tsv.gz', 'pairs.tsv.zst', 'spa-eng.zip', 'train'):
    assert corpus.read_pairs(str(tmp_path / spec))[0] == expected, spec
  # The other direction from the same files is one flag.
  assert corpus.read_pairs(str(tmp_path / 'train'), reverse=True)[0] == [
      (t, s) for s, t in expected]


@pytest.mark.parametrize('make, message', [
    (lambda d: write_lines(d / 'bad.tsv', [b'just text', b'\t']),
     r'bad.tsv: no valid sentence pair in 2 lines \(1 no tab, 1 blank line\)'),
    (lambda d: (d / 'empty.tsv').write_bytes(b'') and None or str(d / 'empty.tsv'),
     r'empty.tsv: empty file'),
    (lambda d: (d / 'image.tsv').write_bytes(bytes(range(256)) * 40) and None or
     str(d / 'image.tsv'), r'image.tsv: no valid sentence pair .*NUL byte'),
    (lambda d: (d / 'cut.tsv.gz').write_bytes(gzip.compress(b''.join(
        b'sentence %d\tfrase %d\n' % (i, i) for i in range(5000)))[:5000]) and None or
     str(d / 'cut.tsv.gz'),
     r'cut.tsv.gz: unreadable after \d+ lines: the file is cut short or corrupt'),
    (lambda d: _zip_without_text(d / 'no-text.zip'),
     r'no-text.zip: zip archive holds no .txt or .tsv file'),
    (lambda d: str(d / 'missing.tsv'), r'missing.tsv: no such file \(nor a file pair'),
    (lambda d: _misaligned_pair(d), r'train.es has fewer lines than .*train.en \(2\)'),
])
def test_bad_input_is_one_clear_error_naming_the_file(tmp_path, make, message):
  with pytest.raises(errors.DataError, match=message):
    corpus.read_pairs(make(tmp_path))


def _zip_without_text(path) -> str:
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('image.png', b'\x89PNG')
  return str(path)


def _misaligned_pair(directory) -> str:
  (directory / 'train.en').write_text('a\nb\nc\n', encoding='utf-8')
  (directory / 'train.es').write_text('x\ny\n', encoding='utf-8')
  return str(directory / 'train')


def test_resolve_path(tmp_path, monkeypatch):
  monkeypatch.setenv(corpus.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(errors.DataError, match='holds no spa-eng.zip'):
    corpus.resolve_path('', 'http://unused')
  (tmp_path / 'spa-eng.zip').write_bytes(b'x')
  assert corpus.resolve_path('', 'http://unused') == str(tmp_path / 'spa-eng.zip')


def test_split_is_by_source_sentence_deterministic_and_near_the_fractions():
  sources = [f'source {i}' for i in range(20_000)]
  splits = [corpus.assign_split(s, 0.1, 0.05, seed=7) for s in sources]
  assert splits == [corpus.assign_split(s, 0.1, 0.05, seed=7) for s in sources]
  assert splits != [corpus.assign_split(s, 0.1, 0.05, seed=8) for s in sources]
  counts = {name: splits.count(name) / len(sources) for name in ('valid', 'test')}
  assert abs(counts['valid'] - 0.1) < 0.01 and abs(counts['test'] - 0.05) < 0.01
