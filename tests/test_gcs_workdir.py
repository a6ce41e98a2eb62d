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
from jaxnmt.runtime import files
from jaxnmt.runtime import locks
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
  target = files.join(any_dir, 'a', 'b.txt')
  assert not files.exists(target) and files.listdir(any_dir) == []
  files.makedirs(files.join(any_dir, 'a'))
  files.write_text(target, 'one')
  files.write_text(target, 'two')  # replaced whole
  assert files.read_text(target) == 'two' and files.exists(target)
  assert files.isdir(files.join(any_dir, 'a')) and not files.isdir(target)
  files.write_bytes(files.join(any_dir, 'c.bin'), b'\x00\x01')
  assert files.listdir(any_dir) == ['a', 'c.bin']
  assert files.listdir(files.join(any_dir, 'a')) == ['b.txt']
  assert files.read_bytes(files.join(any_dir, 'c.bin')) == b'\x00\x01'
  assert files.read_json(files.join(any_dir, 'missing.json')) is None
  with pytest.raises(FileNotFoundError):
    files.read_text(files.join(any_dir, 'missing.txt'))
  assert abs(files.getmtime(target) - time.time()) < 120
  assert len(files.sha256(target)) == 64
  with files.local_copy(target) as copy:
    with open(copy, encoding='utf-8') as handle:
      assert handle.read() == 'two'


def test_layer_appends_moves_and_removes(any_dir):
  lines = files.join(any_dir, 'log', 'lines.jsonl')
  files.append_text(lines, 'x\n')
  files.append_text(lines, 'y\n')
  appender = files.AppendFile(lines)
  appender.write('z\n')
  appender.flush()
  assert files.read_text(lines) == 'x\ny\nz\n'
  appender.close()
  assert files.create_exclusive(files.join(any_dir, 'lock'), 'mine')
  assert not files.create_exclusive(files.join(any_dir, 'lock'), 'theirs')
  assert files.read_text(files.join(any_dir, 'lock')) == 'mine'
  files.write_text(files.join(any_dir, 'step', '1', 'f'), 'f')
  files.move(files.join(any_dir, 'step'), files.join(any_dir, 'aside'))
  assert files.read_text(files.join(any_dir, 'aside', '1', 'f')) == 'f'
  assert not files.exists(files.join(any_dir, 'step'))
  files.remove(files.join(any_dir, 'lock'))
  files.remove(files.join(any_dir, 'lock'))  # missing_ok
  assert not files.exists(files.join(any_dir, 'lock'))
  files.rmtree(any_dir)
  assert files.listdir(any_dir) == []


def test_layer_paths():
  assert files.join('gs://b/run/', 'eval', 'x.txt') == 'gs://b/run/eval/x.txt'
  assert files.absolute('gs://b/run/') == 'gs://b/run'
  assert files.dirname('gs://b/run/eval/x') == 'gs://b/run/eval'
  assert files.checkpoints_dir('gs://b/run') == 'gs://b/run/checkpoints'
  files.check_supported('gs://b/run')
  files.check_supported('runs/tiny')
  with pytest.raises(errors.WorkdirError, match='only local paths and gs://'):
    files.check_supported('s3://b/run')


def test_generation_preconditions_hold(gcs_dir):
  """The emulator must refuse what real GCS refuses, or the lease tests prove nothing."""
  target = files.join(gcs_dir, 'lease.json')
  first = files.replace_if_generation(target, b'a', 0)
  assert first is not None
  assert files.replace_if_generation(target, b'b', 0) is None  # exists already
  assert files.read_with_generation(target) == (b'a', first)
  second = files.replace_if_generation(target, b'c', first)
  assert second not in (None, first)
  assert files.replace_if_generation(target, b'd', first) is None  # stale generation
  assert not files.remove_if_generation(target, first)
  assert files.remove_if_generation(target, second)
  assert files.read_with_generation(target) is None


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
  from jaxnmt.commands import evaluate
  from jaxnmt.training import metrics
  from jaxnmt.training import loop
  config = tiny_config(small_corpus)
  config.data.prepared_dir = str(tmp_path / 'prepared')  # local on every host
  config.num_train_steps = 12
  config.checkpoint_every_steps = 6
  config.eval_every_steps = 6
  config.log_every_steps = 6
  started = time.time()
  first = loop.train_and_evaluate(config, gcs_dir)
  trained = time.time() - started
  assert first['step'] == 12
  listed = files.listdir(gcs_dir)
  for name in ('config.json', 'tokenizer.model', 'splits', 'checkpoints', 'train',
               'valid'):
    assert name in listed, listed
  assert {'6', '12'} <= set(files.listdir(files.checkpoints_dir(gcs_dir)))
  assert files.exists(files.join(gcs_dir, 'checkpoints', '12', 'commit_success.txt'))
  assert files.finished_step(gcs_dir) == 12
  assert not files.exists(files.join(gcs_dir, files.LOCK))  # released
  records = metrics.read_jsonl(files.join(gcs_dir, 'train', files.METRICS))
  assert [r['step'] for r in records] == [6, 12]
  assert any(name.startswith('events.out.tfevents')
             for name in files.listdir(files.join(gcs_dir, 'train')))
  assert files.load_config(gcs_dir).num_train_steps == 12

  config.num_train_steps = 18
  started = time.time()
  with caplog.at_level(logging.INFO):
    second = loop.train_and_evaluate(config, gcs_dir)
  resumed = time.time() - started
  assert second['step'] == 18
  assert 'Resumed from checkpoint at step 12' in caplog.text
  records = metrics.read_jsonl(files.join(gcs_dir, 'train', files.METRICS))
  assert [r['step'] for r in records] == [6, 12, 18]

  started = time.time()
  results = evaluate.run_eval_worker(gcs_dir, checkpoint_step=12, batch_size=16,
                                     max_test_sentences=16)
  scored = time.time() - started
  assert [r['step'] for r in results] == [12]
  assert files.scored_steps(gcs_dir) == {12}
  assert files.exists(results[0]['hypotheses'])
  assert not files.exists(files.join(gcs_dir, files.WORKER))  # released
  # An unreadable step set aside on gs://: out of Orbax's list, its files kept.
  from jaxnmt.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointer = checkpointing.Checkpointer(gcs_dir)
  assert checkpointer.all_steps() == [6, 12, 18]
  checkpointer.set_aside(6)
  assert checkpointer.all_steps() == [12, 18]
  checkpointer.close()
  aside = [name for name in files.listdir(files.checkpoints_dir(gcs_dir))
           if name.startswith('unreadable-6-')]
  assert len(aside) == 1 and '6' not in files.listdir(files.checkpoints_dir(gcs_dir))
  assert files.exists(files.join(files.checkpoints_dir(gcs_dir), aside[0],
                                     'state', 'manifest.ocdbt'))
  logging.warning('gs:// workdir: train %.1f s, resume %.1f s, eval %.1f s', trained,
                  resumed, scored)
  print(json.dumps({'train_s': round(trained, 1), 'resume_s': round(resumed, 1),
                    'eval_s': round(scored, 1)}))
