"""`--mode=score` (commands/score): one TSV row per pair, the scoring library's numbers,
malformed pairs kept in place, two files or one TSV, one-line errors."""

import io

import numpy as np
import pytest

from jaxnmt.commands import score as score_command
from jaxnmt.decoding import scoring
from jaxnmt.errors import UserError
from tests.helpers import run_main

PAIRS = [('Good morning.', 'Buenos días.'), ('Tom is here.', 'Tom está aquí.'),
         ('I love you.', 'Te quiero.')]


def test_rows_are_the_scoring_librarys_in_input_order(trained_workdir, loaded, tmp_path):
  source = tmp_path / 'pairs.tsv'
  source.write_text(''.join(f'{s}\t{t}\n' for s, t in PAIRS) + 'no tab\n\tno source\n',
                    encoding='utf-8')
  output = io.StringIO()
  summary = score_command.run(trained_workdir, str(source), output=output, commit_lines=2)
  rows = [row.split('\t') for row in output.getvalue().splitlines()]
  assert [int(row[0]) for row in rows] == list(range(5))
  expected = scoring.score_text(loaded, *zip(*PAIRS))
  np.testing.assert_allclose([float(row[1]) for row in rows[:3]],
                             [s.total for s in expected], atol=1e-3)
  assert [int(row[2]) for row in rows[:3]] == [s.tokens for s in expected]
  np.testing.assert_allclose([float(row[3]) for row in rows[:3]],
                             [s.mean for s in expected], atol=1e-3)
  assert rows[3:] == [['3', 'nan', '0', 'nan'], ['4', 'nan', '0', 'nan']]
  assert (summary['lines'], summary['unscored']) == (5, 2)
  # The same pairs from two files, into an output file.
  sources, targets = tmp_path / 'src.txt', tmp_path / 'tgt.txt'
  sources.write_text(''.join(s + '\n' for s, _ in PAIRS), encoding='utf-8')
  targets.write_text(''.join(t + '\n' for _, t in PAIRS), encoding='utf-8')
  scored = tmp_path / 'scores.tsv'
  score_command.run(trained_workdir, str(sources), str(targets), output_path=str(scored))
  assert scored.read_text(encoding='utf-8').splitlines() == output.getvalue().splitlines()[:3]
  targets.write_text('one line\n', encoding='utf-8')
  with pytest.raises(UserError, match='different line counts'):
    score_command.run(trained_workdir, str(sources), str(targets), output=io.StringIO())


def test_score_without_input_is_one_line(trained_workdir):
  result = run_main('--mode=score', f'--workdir={trained_workdir}', timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith('error: --mode=score needs --input')
