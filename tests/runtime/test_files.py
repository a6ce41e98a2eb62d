"""runtime/files: the path layer on a local folder and on Cloud Storage (gs://, against
a local GCS emulator that honours generation preconditions: tests/gcs_emulator.py), the
results file, and a run trained, resumed and scored with its workdir on gs://."""

import hashlib
import json
import logging
import os
import time

import pytest

from jaxnmt import errors
from jaxnmt.runtime import files
from tests.tiny_config import tiny_config


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
  assert files.sha256(target) == hashlib.sha256(b'two').hexdigest()


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


@pytest.mark.slow  # a whole train, resume and eval cycle: the fast suite is near 5 minutes
def test_train_resume_eval_on_gcs(gcs_dir, small_corpus, tmp_path, caplog):
  """train 4 steps (checkpoints at 2 and 4) -> resume to 6 -> score a checkpoint
  -> set one aside, all with the workdir on gs://."""
  # pylint: disable=g-import-not-at-top
  from jaxnmt.commands import evaluate
  from jaxnmt.training import metrics
  from jaxnmt.training import loop
  config = tiny_config(small_corpus)
  config.data.prepared_dir = str(tmp_path / 'prepared')  # local on every host
  config.num_train_steps = 4
  config.checkpoint_every_steps = config.eval_every_steps = config.log_every_steps = 2
  started = time.time()
  first = loop.train_and_evaluate(config, gcs_dir)
  trained = time.time() - started
  assert first['step'] == 4
  listed = files.listdir(gcs_dir)
  for name in ('config.json', 'tokenizer.model', 'splits', 'checkpoints', 'train',
               'valid'):
    assert name in listed, listed
  assert {'2', '4'} <= set(files.listdir(files.checkpoints_dir(gcs_dir)))
  assert files.exists(files.join(gcs_dir, 'checkpoints', '4', 'commit_success.txt'))
  assert files.finished_step(gcs_dir) == 4
  assert not files.exists(files.join(gcs_dir, files.LOCK))  # released
  records = metrics.read_jsonl(files.join(gcs_dir, 'train', files.METRICS))
  assert [r['step'] for r in records] == [2, 4]
  assert any(name.startswith('events.out.tfevents')
             for name in files.listdir(files.join(gcs_dir, 'train')))
  assert files.load_config(gcs_dir).num_train_steps == 4

  config.num_train_steps = 6
  started = time.time()
  with caplog.at_level(logging.INFO):
    second = loop.train_and_evaluate(config, gcs_dir)
  resumed = time.time() - started
  assert second['step'] == 6
  assert 'Resumed from checkpoint at step 4' in caplog.text
  records = metrics.read_jsonl(files.join(gcs_dir, 'train', files.METRICS))
  assert [r['step'] for r in records] == [2, 4, 6]

  started = time.time()
  results = evaluate.run_eval_worker(gcs_dir, checkpoint_step=4, batch_size=16,
                                     max_test_sentences=8, max_valid_sentences=8)
  scored = time.time() - started
  assert [r['step'] for r in results] == [4]
  assert files.scored_steps(gcs_dir) == {4}
  assert files.exists(results[0]['hypotheses'])
  assert not files.exists(files.join(gcs_dir, files.WORKER))  # released
  # An unreadable step set aside on gs://: out of Orbax's list, its files kept.
  from jaxnmt.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointer = checkpointing.Checkpointer(gcs_dir)
  assert checkpointer.all_steps() == [2, 4, 6]
  checkpointer.set_aside(2)
  assert checkpointer.all_steps() == [4, 6]
  checkpointer.close()
  aside = [name for name in files.listdir(files.checkpoints_dir(gcs_dir))
           if name.startswith('unreadable-2-')]
  assert len(aside) == 1 and '2' not in files.listdir(files.checkpoints_dir(gcs_dir))
  assert files.exists(files.join(files.checkpoints_dir(gcs_dir), aside[0],
                                     'state', 'manifest.ocdbt'))
  logging.warning('gs:// workdir: train %.1f s, resume %.1f s, eval %.1f s', trained,
                  resumed, scored)
  print(json.dumps({'train_s': round(trained, 1), 'resume_s': round(resumed, 1),
                    'eval_s': round(scored, 1)}))


def test_results_never_hold_a_step_twice(tmp_path):
  workdir = str(tmp_path)
  os.makedirs(os.path.join(workdir, 'eval'))
  target = os.path.join(workdir, files.RESULTS)
  with open(target, 'w') as handle:  # an older jaxnmt's duplicate, then a killed write
    handle.write(''.join(json.dumps(r) + '\n' for r in (
        {'step': 10, 'bleu': 1.0}, {'step': 20, 'bleu': 2.0}, {'step': 10, 'bleu': 3.0})))
    handle.write('{"step": 30, "bl')
  # Readers keep the last result of a step and skip the cut line.
  assert [(r['step'], r['bleu']) for r in files.read_results(workdir)] == [
      (20, 2.0), (10, 3.0)]
  assert files.scored_steps(workdir) == {10, 20}

  def lines():
    return [(json.loads(line)['step'], json.loads(line)['bleu'])
            for line in open(target).read().splitlines()]
  files.append_result(workdir, {'step': 30, 'bleu': 4.0})  # after the cut line
  assert lines() == [(20, 2.0), (10, 3.0), (30, 4.0)]
  files.append_result(workdir, {'step': 20, 'bleu': 5.0})  # scored again
  assert lines() == [(10, 3.0), (30, 4.0), (20, 5.0)]
  files.append_result(workdir, {'step': 40, 'bleu': 6.0})
  assert lines() == [(10, 3.0), (30, 4.0), (20, 5.0), (40, 6.0)]
