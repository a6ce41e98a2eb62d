"""runtime/distributed: joining a job whose coordinator nobody serves is a clear error
in bounded time, and a straggler is named at an agreement point within the collective
timeout (on processes started through launch/local.sh)."""

import subprocess
import time

import pytest

from tests import faults
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time():
  outcome = faults.coordinator_unreachable(timeout_s=10)
  assert outcome.exit_codes[1] == 1
  assert outcome.seconds < 60
  assert 'could not join the job through the coordinator 127.0.0.1:9' in outcome.note


def test_a_straggler_is_named_at_the_agreement_point_within_the_timeout(tmp_path):
  env = dict(faults.environment('', 2, 1, tmp_path / 'logs'), JAXNMT_MAIN='tests.agree_run')
  began = time.time()
  result = subprocess.run(['launch/local.sh', '--straggle_s=40', '--collective_timeout_s=5',
                           '--peer_timeout_s=60'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  seconds = time.time() - began
  assert 'process 0 exited with code 1' in result.stderr, result.stderr[-2000:]
  assert 'processes 1 did not reach the first stop check within 5 s' in result.stderr
  # Process 1 learns it from process 0's notice, not by waiting out its sleep.
  log = (tmp_path / 'logs' / 'process_1.log').read_text()
  assert 'process 0 failed: processes 1 did not reach' in log
  assert 'process 1 exited with code 1' in result.stderr
  assert seconds < 40, seconds
