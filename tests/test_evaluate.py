"""The eval worker, BLEU statistics, checkpoint retention and the curves command."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import sacrebleu

from jaxnmt.decoding import bleu
from jaxnmt.commands import curves
from jaxnmt import errors
from jaxnmt.commands import evaluate
from jaxnmt.training import loop
from jaxnmt.decoding import translation
from jaxnmt.runtime import locks
from jaxnmt.runtime import files
from tests.tiny_config import tiny_config

OPTIONS = translation.DecodeOptions(beam_size=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summed_statistics_equal_sacrebleu_on_the_whole():
  hypotheses = ['El gato duerme en el sofá.', 'Hola mundo', '', 'Nos vamos mañana.']
  references = ['El gato está durmiendo en el sofá.', '¡Hola, mundo!', 'Sí.',
                'Nos iremos mañana por la mañana.']
  parts = bleu.statistics(hypotheses[:1], references[:1]) + bleu.statistics(
      hypotheses[1:], references[1:])
  scores = bleu.scores(parts)
  assert scores['bleu'] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
  assert scores['chrf'] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
  assert scores['bleu_signature'].startswith('nrefs:1|case:mixed|eff:no|tok:13a')


@pytest.fixture
def workdir_copy(trained_workdir, tmp_path):
  path = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, path)
  return path


def test_worker_scores_each_checkpoint_once_and_matches_sacrebleu(workdir_copy):
  results = evaluate.run_eval_worker(workdir_copy, options=OPTIONS, poll_seconds=0.1,
                                     max_test_sentences=24)
  assert [r['step'] for r in results] == [10, 20]
  for result in results:
    hypotheses = open(result['hypotheses'], encoding='utf-8').read().splitlines()
    references = open(os.path.join(workdir_copy, 'splits', 'test.ref'),
                      encoding='utf-8').read().splitlines()[:24]
    assert len(hypotheses) == 24
    assert result['bleu'] == pytest.approx(sacrebleu.corpus_bleu(hypotheses,
                                                                 [references]).score)
    assert np.isfinite(result['valid_loss']) and result['sentences'] == 24
  # A restarted worker remembers what it scored.
  assert evaluate.run_eval_worker(workdir_copy, options=OPTIONS, poll_seconds=0.1) == []
  results_file = os.path.join(workdir_copy, 'eval', 'results.jsonl')
  lines = open(results_file).read().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [10, 20]
  # One killed after its TensorBoard write for step 20, before the results line, scores
  # step 20 again and logs it once.
  with open(results_file, 'w') as handle:
    handle.write(lines[0] + '\n')
  again = evaluate.run_eval_worker(workdir_copy, options=OPTIONS, poll_seconds=0.1,
                                   max_test_sentences=8)
  assert [r['step'] for r in again] == [20]
  scalars = [json.loads(line) for line in open(
      os.path.join(workdir_copy, 'eval', 'metrics.jsonl'), encoding='utf-8')]
  assert [line['step'] for line in scalars] == [10, 20]
  assert not os.path.exists(os.path.join(workdir_copy, files.WORKER))  # released
  png = curves.render(workdir_copy)
  assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_worker_survives_a_checkpoint_deleted_under_it(workdir_copy):
  shutil.rmtree(os.path.join(workdir_copy, 'checkpoints', '10', 'state'))
  results = evaluate.run_eval_worker(workdir_copy, options=OPTIONS, poll_seconds=0.1,
                                     max_test_sentences=8)
  assert [r['step'] for r in results] == [20]


def test_single_checkpoint_mode(workdir_copy):
  results = evaluate.run_eval_worker(workdir_copy, checkpoint_step=10, options=OPTIONS,
                                     max_test_sentences=8)
  assert [r['step'] for r in results] == [10]
  # Scored again (say with other decoding options), its result replaces the first.
  (again,) = evaluate.run_eval_worker(workdir_copy, checkpoint_step=10,
                                      options=translation.DecodeOptions(beam_size=1),
                                      max_test_sentences=8)
  lines = open(os.path.join(workdir_copy, files.RESULTS)).read().splitlines()
  assert [(json.loads(line)['step'], json.loads(line)['beam_size']) for line in lines] == [
      (10, 1)]
  with pytest.raises(errors.CheckpointError):
    evaluate.run_eval_worker(workdir_copy, checkpoint_step=15, options=OPTIONS)
  assert not os.path.exists(os.path.join(workdir_copy, files.WORKER))  # released


@pytest.mark.slow
def test_retention_keeps_what_a_live_worker_has_not_scored(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 1
  alone = str(tmp_path / 'alone')
  loop.train_and_evaluate(config, alone)
  assert sorted(os.listdir(os.path.join(alone, 'checkpoints'))) == ['20']

  watched = str(tmp_path / 'watched')
  os.makedirs(os.path.join(watched, 'eval'))
  with open(os.path.join(watched, files.WORKER), 'w') as handle:
    json.dump({'pid': 0, 'heartbeat': time.time()}, handle)
  with open(os.path.join(watched, files.RESULTS), 'w') as handle:
    handle.write(json.dumps({'step': 5}) + '\n')
  loop.train_and_evaluate(config, watched)
  assert sorted(os.listdir(os.path.join(watched, 'checkpoints')), key=int) == ['10', '15', '20']


def test_worker_scores_every_named_test_set(workdir_copy):
  # A named test set (config.data.test_sets) is prepared into splits/test_<name>.*.
  splits = os.path.join(workdir_copy, 'splits')
  for suffix in ('src', 'ref'):
    lines = open(os.path.join(splits, f'valid.{suffix}'), encoding='utf-8').readlines()
    with open(os.path.join(splits, f'test_news.{suffix}'), 'w', encoding='utf-8') as handle:
      handle.writelines(lines[:12])
  (result,) = evaluate.run_eval_worker(workdir_copy, options=OPTIONS, checkpoint_step=20,
                                       max_test_sentences=16)
  assert result['test_set'] == 'test' and result['bleu'] == result['bleu_test']
  hypotheses = open(os.path.join(workdir_copy, 'eval', 'news_hypotheses_20.txt'),
                    encoding='utf-8').read().splitlines()
  references = open(os.path.join(splits, 'test_news.ref'),
                    encoding='utf-8').read().splitlines()
  assert len(hypotheses) == 12
  assert result['bleu_news'] == pytest.approx(
      sacrebleu.corpus_bleu(hypotheses, [references]).score)
  scalars = [json.loads(line) for line in open(
      os.path.join(workdir_copy, 'eval', 'metrics.jsonl'), encoding='utf-8')]
  assert any('bleu/news' in line and 'chrf/news' in line for line in scalars)


def _lease(workdir: str, **holder) -> None:
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  with open(os.path.join(workdir, files.WORKER), 'w') as handle:
    json.dump({'token': 'theirs', 'since': time.time(), **holder}, handle)


def test_a_second_eval_worker_refuses_while_one_runs(workdir_copy):
  first = locks.EvalLock(workdir_copy)  # a live worker: this process, this host
  try:
    with pytest.raises(errors.WorkdirError) as raised:
      evaluate.run_eval_worker(workdir_copy, checkpoint_step=20, options=OPTIONS)
    message = str(raised.value)
    assert message.startswith(f'{workdir_copy} is in use by another eval worker (pid '
                              f'{os.getpid()} on {socket.gethostname()}, last heartbeat')
    assert '\n' not in message
    assert not os.path.exists(os.path.join(workdir_copy, files.RESULTS))
    first.refresh()  # still the first worker's
    # Through the command line: one line, exit code 2.
    result = subprocess.run(
        [sys.executable, '-m', 'jaxnmt.main', '--mode=eval', f'--workdir={workdir_copy}'],
        cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: {message.split(", last heartbeat")[0]}, last heartbeat')
    assert last.endswith(message[-40:]) and 'Traceback' not in result.stderr
  finally:
    first.release()
  assert not os.path.exists(os.path.join(workdir_copy, files.WORKER))


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


def _snapshot(directory: str) -> dict:
  """Every file and folder under `directory`, with its size and modification time."""
  found = {}
  for root, folders, files in os.walk(directory):
    for name in folders + files:
      stat = os.stat(os.path.join(root, name))
      found[os.path.relpath(os.path.join(root, name), directory)] = (
          stat.st_size, stat.st_mtime_ns)
  return found


def test_processes_other_than_zero_score_but_write_nothing(workdir_copy, monkeypatch):
  holder = locks.EvalLock(workdir_copy)  # process 0 holds the lease
  try:
    before = _snapshot(workdir_copy)
    monkeypatch.setattr(jax, 'process_index', lambda *unused, **unused_kw: 1)
    results = evaluate.run_eval_worker(workdir_copy, options=OPTIONS, poll_seconds=0.1,
                                       max_test_sentences=8)
    assert [r['step'] for r in results] == [10, 20]
    assert all(np.isfinite(r['bleu']) for r in results)
    assert _snapshot(workdir_copy) == before
  finally:
    holder.release()


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
