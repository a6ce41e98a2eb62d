"""The workdir on Cloud Storage (gs://), against a local GCS emulator that honours
generation preconditions (tests/gcs_emulator.py): the path layer on a local folder
and on gs://, the leases, and a run trained, resumed and scored with its workdir on
gs://."""

import json
import logging
import os
import time
import uuid

import pytest

from jaxnmt import errors
from jaxnmt import storage
from jaxnmt import locks
from jaxnmt import workdir as workdir_lib
from tests.tiny_config import tiny_config


@pytest.fixture
def gcs_dir(gcs_bucket, request) -> str:
  """A fresh prefix of the emulator's bucket for one test."""
  return f'{gcs_bucket}/{request.node.name.split("[")[0]}-{uuid.uuid4().hex[:8]}'


@pytest.fixture(params=['local', 'gs'])
def any_dir(request, tmp_path) -> str:
  """The same layer tests on a local folder and on gs://."""
  if request.param == 'local':
    return str(tmp_path / 'run')
  return request.getfixturevalue('gcs_dir')


def test_layer_reads_and_writes(any_dir):
  target = storage.join(any_dir, 'a', 'b.txt')
  assert not storage.exists(target) and storage.listdir(any_dir) == []
  storage.makedirs(storage.join(any_dir, 'a'))
  storage.write_text(target, 'one')
  storage.write_text(target, 'two')  # replaced whole
  assert storage.read_text(target) == 'two' and storage.exists(target)
  assert storage.isdir(storage.join(any_dir, 'a')) and not storage.isdir(target)
  storage.write_bytes(storage.join(any_dir, 'c.bin'), b'\x00\x01')
  assert storage.listdir(any_dir) == ['a', 'c.bin']
  assert storage.listdir(storage.join(any_dir, 'a')) == ['b.txt']
  assert storage.read_bytes(storage.join(any_dir, 'c.bin')) == b'\x00\x01'
  assert storage.read_json(storage.join(any_dir, 'missing.json')) is None
  with pytest.raises(FileNotFoundError):
    storage.read_text(storage.join(any_dir, 'missing.txt'))
  assert abs(storage.getmtime(target) - time.time()) < 120
  assert len(storage.sha256(target)) == 64
  with storage.local_copy(target) as copy:
    with open(copy, encoding='utf-8') as handle:
      assert handle.read() == 'two'


def test_layer_appends_moves_and_removes(any_dir):
  lines = storage.join(any_dir, 'log', 'lines.jsonl')
  storage.append_text(lines, 'x\n')
  storage.append_text(lines, 'y\n')
  appender = storage.AppendFile(lines)
  appender.write('z\n')
  appender.flush()
  assert storage.read_text(lines) == 'x\ny\nz\n'
  appender.close()
  assert storage.create_exclusive(storage.join(any_dir, 'lock'), 'mine')
  assert not storage.create_exclusive(storage.join(any_dir, 'lock'), 'theirs')
  assert storage.read_text(storage.join(any_dir, 'lock')) == 'mine'
  storage.write_text(storage.join(any_dir, 'step', '1', 'f'), 'f')
  storage.move(storage.join(any_dir, 'step'), storage.join(any_dir, 'aside'))
  assert storage.read_text(storage.join(any_dir, 'aside', '1', 'f')) == 'f'
  assert not storage.exists(storage.join(any_dir, 'step'))
  storage.remove(storage.join(any_dir, 'lock'))
  storage.remove(storage.join(any_dir, 'lock'))  # missing_ok
  assert not storage.exists(storage.join(any_dir, 'lock'))
  storage.rmtree(any_dir)
  assert storage.listdir(any_dir) == []


def test_layer_paths():
  assert storage.join('gs://b/run/', 'eval', 'x.txt') == 'gs://b/run/eval/x.txt'
  assert storage.absolute('gs://b/run/') == 'gs://b/run'
  assert storage.dirname('gs://b/run/eval/x') == 'gs://b/run/eval'
  assert workdir_lib.checkpoints_dir('gs://b/run') == 'gs://b/run/checkpoints'
  storage.check_supported('gs://b/run')
  storage.check_supported('runs/tiny')
  with pytest.raises(errors.WorkdirError, match='only local paths and gs://'):
    storage.check_supported('s3://b/run')


def test_generation_preconditions_hold(gcs_dir):
  """The emulator must refuse what real GCS refuses, or the lease tests prove nothing."""
  target = storage.join(gcs_dir, 'lease.json')
  first = storage.replace_if_generation(target, b'a', 0)
  assert first is not None
  assert storage.replace_if_generation(target, b'b', 0) is None  # exists already
  assert storage.read_with_generation(target) == (b'a', first)
  second = storage.replace_if_generation(target, b'c', first)
  assert second not in (None, first)
  assert storage.replace_if_generation(target, b'd', first) is None  # stale generation
  assert not storage.remove_if_generation(target, first)
  assert storage.remove_if_generation(target, second)
  assert storage.read_with_generation(target) is None


def test_lease_on_gcs(gcs_dir):
  lease = locks.EvalLock(gcs_dir)
  with pytest.raises(errors.WorkdirError, match='in use by another eval worker'):
    locks.EvalLock(gcs_dir)
  lease.refresh()
  assert workdir_lib.worker_alive(gcs_dir)
  time.sleep(0.2)
  # A contender that finds the holder silent past its timeout takes the lease over
  # (deleting only the generation it read); the old holder learns it at its refresh.
  taker = locks.Lease(gcs_dir, workdir_lib.WORKER, 'eval worker', timeout_s=0.1)
  with pytest.raises(errors.WorkdirError, match='lost its lease'):
    lease.refresh()
  lease.release()  # no longer ours: leaves the taker's file alone
  assert storage.exists(storage.join(gcs_dir, workdir_lib.WORKER))
  taker.release()
  assert not storage.exists(storage.join(gcs_dir, workdir_lib.WORKER))
  locks.EvalLock(gcs_dir).release()  # free again


def test_trainer_lock_on_gcs(gcs_dir):
  lock = locks.TrainerLock(gcs_dir, owner=True)
  with pytest.raises(errors.WorkdirError, match='in use by another trainer'):
    locks.TrainerLock(gcs_dir, owner=True)
  locks.TrainerLock(gcs_dir, owner=False).release()  # other processes take nothing
  lock.release()
  locks.TrainerLock(gcs_dir, owner=True).release()


def test_gcs_workdir_needs_local_prepared_dir(gcs_dir, small_corpus):
  from jaxnmt.data import prepare  # pylint: disable=g-import-not-at-top
  config = tiny_config(small_corpus)
  with pytest.raises(errors.ConfigError, match='prepared_dir'):
    prepare.prepared_dir(config, gcs_dir)
  config.data.prepared_dir = 'gs://bucket/data'
  with pytest.raises(errors.ConfigError, match='must be a local path'):
    prepare.prepared_dir(config, gcs_dir)


def test_train_resume_eval_on_gcs(gcs_dir, small_corpus, tmp_path, caplog):
  """train 12 steps (checkpoints at 6 and 12) -> resume to 18 -> score a checkpoint
  -> set one aside, all with the workdir on gs://."""
  # pylint: disable=g-import-not-at-top
  from jaxnmt import evaluate
  from jaxnmt import metrics
  from jaxnmt import train
  config = tiny_config(small_corpus)
  config.data.prepared_dir = str(tmp_path / 'prepared')  # local on every host
  config.num_train_steps = 12
  config.checkpoint_every_steps = 6
  config.eval_every_steps = 6
  config.log_every_steps = 6
  started = time.time()
  first = train.train_and_evaluate(config, gcs_dir)
  trained = time.time() - started
  assert first['step'] == 12
  listed = storage.listdir(gcs_dir)
  for name in ('config.json', 'tokenizer.model', 'splits', 'checkpoints', 'train',
               'valid'):
    assert name in listed, listed
  assert {'6', '12'} <= set(storage.listdir(workdir_lib.checkpoints_dir(gcs_dir)))
  assert storage.exists(storage.join(gcs_dir, 'checkpoints', '12', 'commit_success.txt'))
  assert workdir_lib.finished_step(gcs_dir) == 12
  assert not storage.exists(storage.join(gcs_dir, workdir_lib.LOCK))  # released
  records = metrics.read_jsonl(storage.join(gcs_dir, 'train', workdir_lib.METRICS))
  assert [r['step'] for r in records] == [6, 12]
  assert any(name.startswith('events.out.tfevents')
             for name in storage.listdir(storage.join(gcs_dir, 'train')))
  assert workdir_lib.load_config(gcs_dir).num_train_steps == 12

  config.num_train_steps = 18
  started = time.time()
  with caplog.at_level(logging.INFO):
    second = train.train_and_evaluate(config, gcs_dir)
  resumed = time.time() - started
  assert second['step'] == 18
  assert 'Resumed from checkpoint at step 12' in caplog.text
  records = metrics.read_jsonl(storage.join(gcs_dir, 'train', workdir_lib.METRICS))
  assert [r['step'] for r in records] == [6, 12, 18]

  started = time.time()
  results = evaluate.run_eval_worker(gcs_dir, checkpoint_step=12, batch_size=16,
                                     max_test_sentences=16)
  scored = time.time() - started
  assert [r['step'] for r in results] == [12]
  assert workdir_lib.scored_steps(gcs_dir) == {12}
  assert storage.exists(results[0]['hypotheses'])
  assert not storage.exists(storage.join(gcs_dir, workdir_lib.WORKER))  # released
  # An unreadable step set aside on gs://: out of Orbax's list, its files kept.
  from jaxnmt import checkpoint  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoint.Checkpointer(gcs_dir)
  assert checkpointer.all_steps() == [6, 12, 18]
  checkpointer.set_aside(6)
  assert checkpointer.all_steps() == [12, 18]
  checkpointer.close()
  aside = [name for name in storage.listdir(workdir_lib.checkpoints_dir(gcs_dir))
           if name.startswith('unreadable-6-')]
  assert len(aside) == 1 and '6' not in storage.listdir(workdir_lib.checkpoints_dir(gcs_dir))
  assert storage.exists(storage.join(workdir_lib.checkpoints_dir(gcs_dir), aside[0],
                                     'state', 'manifest.ocdbt'))
  logging.warning('gs:// workdir: train %.1f s, resume %.1f s, eval %.1f s', trained,
                  resumed, scored)
  print(json.dumps({'train_s': round(trained, 1), 'resume_s': round(resumed, 1),
                    'eval_s': round(scored, 1)}))
