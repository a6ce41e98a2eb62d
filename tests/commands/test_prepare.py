"""`--mode=prepare` (commands/prepare): bad input is exit code 2 with one line, and
leaves no prepared data behind."""

import gzip
import os

from tests.helpers import last_error, run_main


def test_prepare_command_on_bad_input_exits_2_and_leaves_nothing(tmp_path):
  (tmp_path / 'cut.tsv.gz').write_bytes(gzip.compress(b''.join(
      b'sentence %d\tfrase %d\n' % (i, i) for i in range(5000)))[:5000])
  result = run_main('--mode=prepare', '--config=tests/tiny_config.py',
                    f'--workdir={tmp_path / "w"}', corpus=str(tmp_path / 'cut.tsv.gz'),
                    timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  last = last_error(result.stderr)
  assert last.startswith('error: ') and 'cut.tsv.gz: unreadable after' in last, last
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'w' / 'data')
