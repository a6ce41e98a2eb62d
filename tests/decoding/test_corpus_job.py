"""decoding/corpus_job on one process: chunks in order to a stream or to an output
file, a killed job resumed with no line lost or repeated, a rerun with other settings
refused, compressed and broken inputs read line by line. (Several processes, with
kill -9: tests/commands/test_translate_processes.py.)"""

import gzip
import io
import json
import os

import pytest
import zstandard

from jaxnmt.decoding import corpus_job
from jaxnmt.errors import UserError

LINES = [f'line {i}' if i % 7 else '' for i in range(53)]


def _upper(first, chunk):
  """A chunk's work without a model: numbered, upper-cased lines."""
  text = ''.join(f'{first + i}\t{line.upper()}\n' for i, line in enumerate(chunk))
  return text, {'tokens': len(chunk), 'empty': sum(not line for line in chunk)}


EXPECTED = ''.join(f'{i}\t{line.upper()}\n' for i, line in enumerate(LINES))


@pytest.mark.parametrize('chunk_lines', [1, 10, 53, 1000])
def test_chunks_go_out_in_input_order_to_a_stream_or_a_file(tmp_path, chunk_lines):
  stream = io.StringIO()
  summary = corpus_job.run(lambda: iter(LINES), None, _upper, {}, chunk_lines, stream=stream)
  assert stream.getvalue() == EXPECTED
  assert summary == {'tokens': 53, 'empty': 8, 'lines': 53}
  output = tmp_path / 'out.txt'
  summary = corpus_job.run(lambda: iter(LINES), str(output), _upper, {'a': 1}, chunk_lines)
  assert output.read_text() == EXPECTED and summary['lines'] == 53
  assert not os.path.exists(f'{output}.parts')  # progress removed once joined


def test_a_killed_job_resumes_where_it_stopped(tmp_path):
  output, seen = str(tmp_path / 'out.txt'), []

  def dies_after_two_chunks(first, chunk):
    if len(seen) == 2:
      raise KeyboardInterrupt  # as a kill would end it: between two chunks' commits
    seen.append(first)
    return _upper(first, chunk)

  with pytest.raises(KeyboardInterrupt):
    corpus_job.run(lambda: iter(LINES), output, dies_after_two_chunks, {'a': 1}, 10)
  assert seen == [0, 10] and not os.path.exists(output)
  # A chunk whose text was written but not its counts file is not done: redone.
  os.remove(f'{output}.parts/00000001.json')
  again = []

  def counted(first, chunk):
    again.append(first)
    return _upper(first, chunk)

  corpus_job.run(lambda: iter(LINES), output, counted, {'a': 1}, 10)
  assert again == [10, 20, 30, 40, 50]  # chunk 0 is not done twice
  assert open(output, encoding='utf-8').read() == EXPECTED


def test_a_rerun_with_other_settings_is_refused_in_one_line(tmp_path):
  output = str(tmp_path / 'out.txt')
  os.makedirs(f'{output}.parts')
  with open(f'{output}.parts/job.json', 'w', encoding='utf-8') as handle:
    json.dump({'settings': {'beam': 4, 'chunk_lines': 10}, 'lines': 53}, handle)
  with pytest.raises(UserError, match=r"other settings \(beam: 4 then, 2 now\): rerun "
                                      r'with the same flags'):
    corpus_job.run(lambda: iter(LINES), output, _upper, {'beam': 2}, 10)
  with pytest.raises(UserError, match='--commit_lines must be >= 1'):
    corpus_job.run(lambda: iter(LINES), output, _upper, {}, 0)


def test_inputs_plain_gz_zst_with_bad_bytes_and_crlf(tmp_path):
  raw = b'first\r\n\nbad \xff\xfe byte\nlast'
  expected = [('first', False), ('', False), ('bad \ufffd\ufffd byte', True), ('last', False)]
  plain, packed, squeezed = tmp_path / 'a.txt', tmp_path / 'a.txt.gz', tmp_path / 'a.zst'
  plain.write_bytes(raw)
  packed.write_bytes(gzip.compress(raw))
  squeezed.write_bytes(zstandard.ZstdCompressor().compress(raw))
  for path in (plain, packed, squeezed):
    assert list(corpus_job.open_lines(str(path))) == expected, path
  packed.write_bytes(gzip.compress(raw * 1000)[:-20])  # cut short
  with pytest.raises(UserError, match='cut short or corrupt'):
    list(corpus_job.open_lines(str(packed)))
