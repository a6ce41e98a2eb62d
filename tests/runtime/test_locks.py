"""runtime/locks: one trainer per workdir and one eval worker per workdir, on a local
folder and on gs:// (a local GCS emulator that honours generation preconditions); a
stale lease is taken over, a live one on another host respected, a lost one noticed."""

import json
import logging
import os
import socket
import subprocess
import time

import pytest

from jaxnmt import errors
from jaxnmt.runtime import files
from jaxnmt.runtime import locks
from tests.helpers import last_error, run_main


def test_second_trainer_on_a_live_workdir_refuses(tmp_path, small_corpus):
  workdir = tmp_path / 'busy'
  held = locks.TrainerLock(str(workdir), owner=True)  # a live trainer's lock
  try:
    with pytest.raises(errors.WorkdirError, match=f'pid {os.getpid()}'):
      locks.TrainerLock(str(workdir), owner=True)
    second = run_main(f'--workdir={workdir}', '--config=tests/tiny_config.py',
                      corpus=small_corpus)
    assert second.returncode == 2, second.stderr[-2000:]
    assert 'is in use by another trainer' in last_error(second.stderr)
    assert 'Traceback' not in second.stderr
    assert not os.path.exists(workdir / 'checkpoints')  # refused before any work
  finally:
    held.release()
  locks.TrainerLock(str(workdir), owner=True).release()  # free once released


def _lease(workdir: str, **holder) -> None:
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  with open(os.path.join(workdir, files.WORKER), 'w') as handle:
    json.dump({'token': 'theirs', 'since': time.time(), **holder}, handle)


@pytest.mark.parametrize('host, pid, silent_s, why', [
    ('elsewhere', 1, 2 * 3600, 'silent for 7200 s'),
    (socket.gethostname(), None, 0, 'is gone'),  # None: a process that has exited
])
def test_a_stale_eval_lease_is_taken_over(tmp_path, caplog, host, pid, silent_s, why):
  workdir = str(tmp_path)
  _lease(workdir, host=host, pid=pid or _exited_pid(), heartbeat=time.time() - silent_s)
  with caplog.at_level(logging.WARNING):
    lease = locks.EvalLock(workdir)
  assert any('Taking over the eval worker lease' in r.getMessage() and why in r.getMessage()
             for r in caplog.records)
  taken = json.load(open(os.path.join(workdir, files.WORKER)))
  assert taken['pid'] == os.getpid() and taken['token'] != 'theirs'
  assert files.worker_alive(workdir)
  lease.release()
  assert not os.path.exists(os.path.join(workdir, files.WORKER))


def _exited_pid() -> int:
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def test_a_live_lease_on_another_host_is_respected_and_a_lost_one_noticed(tmp_path):
  workdir = str(tmp_path)
  _lease(workdir, host='elsewhere', pid=1, heartbeat=time.time())
  with pytest.raises(errors.WorkdirError, match='in use by another eval worker '
                     r'\(pid 1 on elsewhere, last heartbeat 0 s ago\)'):
    locks.EvalLock(workdir)
  os.remove(os.path.join(workdir, files.WORKER))
  # A holder silent longer than the timeout loses its lease to the next worker; its
  # next refresh says so, and its release leaves the new holder's lease alone.
  first = locks.EvalLock(workdir, timeout_s=0.05)
  time.sleep(0.1)
  second = locks.EvalLock(workdir, timeout_s=0.05)
  with pytest.raises(errors.WorkdirError, match='lost its lease'):
    first.refresh()
  first.release()
  assert json.load(open(os.path.join(workdir, files.WORKER)))['pid'] == os.getpid()
  second.refresh()
  second.release()
  assert not os.path.exists(os.path.join(workdir, files.WORKER))


def test_lease_on_gcs(gcs_dir):
  lease = locks.EvalLock(gcs_dir)
  with pytest.raises(errors.WorkdirError, match='in use by another eval worker'):
    locks.EvalLock(gcs_dir)
  lease.refresh()
  assert files.worker_alive(gcs_dir)
  time.sleep(0.2)
  # A contender that finds the holder silent past its timeout takes the lease over
  # (deleting only the generation it read); the old holder learns it at its refresh.
  taker = locks.Lease(gcs_dir, files.WORKER, 'eval worker', timeout_s=0.1)
  with pytest.raises(errors.WorkdirError, match='lost its lease'):
    lease.refresh()
  lease.release()  # no longer ours: leaves the taker's file alone
  assert files.exists(files.join(gcs_dir, files.WORKER))
  taker.release()
  assert not files.exists(files.join(gcs_dir, files.WORKER))
  locks.EvalLock(gcs_dir).release()  # free again


def test_trainer_lock_on_gcs(gcs_dir):
  lock = locks.TrainerLock(gcs_dir, owner=True)
  with pytest.raises(errors.WorkdirError, match='in use by another trainer'):
    locks.TrainerLock(gcs_dir, owner=True)
  locks.TrainerLock(gcs_dir, owner=False).release()  # other processes take nothing
  lock.release()
  locks.TrainerLock(gcs_dir, owner=True).release()
