"""`--mode=translate` (commands/translate): stdin streamed line by line with one output
line per input line, logs on stderr, a file input, the n-best TSV of a chosen
checkpoint, and its one-line errors."""

import dataclasses
import io
import queue
import subprocess
import threading

import jax
import numpy as np
import pytest

from jaxnmt.commands import translate as translate_command
from jaxnmt.decoding import translation
from jaxnmt.errors import UserError
from tests.helpers import last_error, run_main, start_main

BEAM2 = translation.DecodeOptions(beam_size=2)


def _lines_of(pipe) -> queue.Queue:
  """A queue the lines of `pipe` arrive on (None at its end)."""
  lines = queue.Queue()

  def read():
    for line in iter(pipe.readline, ''):
      lines.put(line)
    lines.put(None)

  threading.Thread(target=read, daemon=True).start()
  return lines


def test_stdin_is_streamed_line_by_line_one_output_line_each(trained_workdir, loaded,
                                                             tmp_path):
  first = ['Hello.', '', 'Where is the station?']
  rest = ['I love you.', '', 'Ünïcödé 日本語 🙂', 'long ' * 100, 'We will leave tomorrow.']
  expected = translation.Translator(loaded, BEAM2).translate(first + rest)
  log = tmp_path / 'stderr.txt'
  with open(log, 'w', encoding='utf-8') as stderr:
    process = start_main('--mode=translate', f'--workdir={trained_workdir}',
                         '--beam_size=2', stdin=subprocess.PIPE, stderr=stderr, bufsize=1,
                         start_new_session=False)
  try:
    outputs = _lines_of(process.stdout)
    # Each translation comes back while stdin is still open.
    process.stdin.write(first[0] + '\n')
    process.stdin.flush()
    assert outputs.get(timeout=240) == expected[0] + '\n'
    process.stdin.write('\n'.join(first[1:]) + '\n')
    process.stdin.flush()
    assert outputs.get(timeout=60) == '\n'  # a blank line stays a blank line
    assert outputs.get(timeout=60) == expected[2] + '\n'
    process.stdin.write('\n'.join(rest) + '\n')
    process.stdin.close()
    got = [outputs.get(timeout=120) for _ in rest]
    assert outputs.get(timeout=60) is None  # one line each, in order, nothing more
    assert process.wait(timeout=60) == 0
  finally:
    process.kill()
  assert got == [line + '\n' for line in expected[len(first):]]
  stderr = log.read_text(encoding='utf-8')
  assert 'truncated' in stderr  # the over-long line is reported
  assert 'Loaded the raw weights of checkpoint 20' in stderr  # logs on stderr


def test_translate_from_file_matches_stdin(trained_workdir, loaded, tmp_path):
  lines = ['Good morning.', 'How are you?', 'Tom is here.']
  source = tmp_path / 'in.txt'
  source.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  output = tmp_path / 'out.txt'
  with open(output, 'w', encoding='utf-8') as handle:
    translate_command.run(trained_workdir, str(source), handle, batch_size=2)
  assert output.read_text(encoding='utf-8').splitlines() == translation.Translator(
      loaded).translate(lines)


@pytest.mark.slow
def test_nbest_tsv_from_a_file_and_checkpoint_step(trained_workdir, tmp_path):
  lines = ['Good morning.', '', 'Tom is here.']
  source = tmp_path / 'in.txt'
  source.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  result = run_main('--mode=translate', f'--workdir={trained_workdir}', f'--input={source}',
                    '--beam_size=3', '--nbest=2', '--checkpoint_step=10')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'weights of checkpoint 10' in result.stderr
  rows = [line.split('\t') for line in result.stdout.splitlines()]
  assert [(int(r[0]), int(r[1])) for r in rows] == [(i, k) for i in range(3) for k in range(2)]
  assert all(len(row) == 4 for row in rows)
  scores = np.array([float(row[2]) for row in rows]).reshape(3, 2)
  assert (scores[[0, 2], 0] >= scores[[0, 2], 1]).all() and (scores[[0, 2]] < 0).all()
  assert [row[3] for row in rows[2:4]] == ['', '']  # the blank line
  # The same as the library on checkpoint 10.
  at_10 = translation.Translator.from_workdir(trained_workdir, 10, dataclasses.replace(
      BEAM2, beam_size=3), devices=jax.local_devices())
  assert at_10.step == 10
  expected = at_10.translate_nbest(lines, 2)
  assert [row[3] for row in rows] == [h.text for hs in expected for h in hs]
  np.testing.assert_allclose(scores, [[h.score for h in hs] for hs in expected], atol=1e-3)


def test_nbest_beyond_the_beam_is_a_user_error(trained_workdir):
  with pytest.raises(UserError, match='--nbest must be in'):
    translate_command.run(trained_workdir, None, nbest=3, options=BEAM2)
  result = run_main('--mode=translate', f'--workdir={trained_workdir}', '--nbest=2',
                    '--beam_size=1', stdin='Hello.\n', timeout=120)
  assert result.returncode == 2 and 'error: --nbest must be in [0, 1]' in result.stderr


def test_translate_without_a_trained_model_is_a_clear_error(tmp_path):
  result = run_main('--mode=translate', f'--workdir={tmp_path}', stdin='Hello.\n',
                    timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert last_error(result.stderr).startswith('error: ')
  assert 'config.json not found' in result.stderr
  assert 'Traceback' not in result.stderr


def test_a_corpus_job_writes_the_librarys_translations_in_order(trained_workdir, loaded,
                                                                tmp_path):
  lines = ['Good morning.', '', 'How are you?', 'Tom is here.', 'bad \ufffd byte'] * 3
  source = tmp_path / 'in.txt'
  source.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  output = tmp_path / 'out.txt'
  summary = translate_command.run(trained_workdir, str(source), output_path=str(output),
                                  options=BEAM2)
  assert output.read_text(encoding='utf-8').splitlines() == translation.Translator(
      loaded, BEAM2).translate(lines)
  assert (summary['lines'], summary['empty']) == (15, 3)
  # Sampling: chunks of 4 lines (keys from line numbers) to a file and to stdout agree.
  sampling = translation.DecodeOptions(beam_size=1, temperature=1.0, seed=3)
  streamed = io.StringIO()
  translate_command.run(trained_workdir, str(source), streamed, options=sampling,
                        nbest=1, commit_lines=4)
  translate_command.run(trained_workdir, str(source), output_path=str(output),
                        options=sampling, nbest=1, commit_lines=4)
  assert output.read_text(encoding='utf-8') == streamed.getvalue()
  rows = [row.split('\t') for row in streamed.getvalue().splitlines()]
  assert [int(row[0]) for row in rows] == list(range(15))
  assert [row[3] for row in rows[1::5]] == [''] * 3  # blank lines keep their place


def test_a_prepared_corpus_is_translated_in_its_order_with_its_sources(
    trained_workdir, loaded, small_corpus, tmp_path):
  """`--input` = a prepared folder tokenized with the model's tokenizer: its pairs'
  sources in the prepared order, each row `source<TAB>translation`; one prepared
  with another tokenizer is refused in one line."""
  # pylint: disable=g-import-not-at-top
  import os
  from jaxnmt.data import prepare
  from jaxnmt.data import records
  from tests.tiny_config import tiny_config
  corpus = tmp_path / 'few.tsv'
  lines = open(small_corpus, encoding='utf-8').read().splitlines()[:40]
  corpus.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  config = tiny_config(str(corpus))
  config.data.valid_fraction = config.data.test_fraction = 0.0
  config.data.pairs_per_shard = 15
  config.tokenizer.path = os.path.join(trained_workdir, 'tokenizer.model')
  manifest = prepare.prepare(config, str(tmp_path / 'w'), progress=False)
  directory = prepare.prepared_dir(config, str(tmp_path / 'w'))
  shards = prepare.open_corpora(manifest, directory)
  dtype = np.dtype(manifest['record_dtype'])
  tokenizer = loaded.tokenizer
  sources = [tokenizer.decode(records.decode_record(record, dtype)[0])
             for corpus_records in shards
             for record in corpus_records.__getitems__(range(len(corpus_records)))]
  assert len(sources) == 40 and len(manifest['corpora'][0]['shards']) > 1
  output = tmp_path / 'out.tsv'
  summary = translate_command.run(trained_workdir, directory, output_path=str(output),
                                  options=BEAM2, commit_lines=16)
  rows = [row.split('\t') for row in output.read_text(encoding='utf-8').splitlines()]
  assert [row[0] for row in rows] == sources
  assert [row[1] for row in rows] == translation.Translator(loaded, BEAM2).translate(sources)
  assert summary['lines'] == 40
  # The same corpus prepared with its own tokenizer: refused, naming both hashes.
  config.tokenizer.path = ''
  config.data.prepared_dir = str(tmp_path / 'own')
  prepare.prepare(config, str(tmp_path / 'w2'), progress=False)
  with pytest.raises(UserError, match='prepared with another tokenizer'):
    translate_command.run(trained_workdir, str(tmp_path / 'own'), output_path=str(output))
