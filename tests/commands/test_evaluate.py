"""`--mode=eval` (commands/evaluate): the eval worker scores each checkpoint once (as
sacrebleu does), survives a checkpoint deleted under it, scores one checkpoint or
averaged weights on request, every named test set, holds its workdir alone, writes
nothing on processes other than 0; `--mode=curves` renders what it logged."""

import json
import os
import shutil
import socket

import jax
import numpy as np
import pytest
import sacrebleu

from jaxnmt import errors
from jaxnmt.commands import curves
from jaxnmt.commands import evaluate
from jaxnmt.decoding import averaging
from jaxnmt.decoding import translation
from jaxnmt.runtime import files
from jaxnmt.runtime import locks
from tests.helpers import last_error, run_main

OPTIONS = translation.DecodeOptions(beam_size=2)
# Eight test and eight validation sentences everywhere: the same decoder shapes in every
# test (compiled once), and no test pays for translating the whole validation split.
SENTENCES = 8


def _score(workdir, **kwargs) -> list[dict]:
  kwargs = {'options': OPTIONS, 'poll_seconds': 0.1, 'max_test_sentences': SENTENCES,
            'max_valid_sentences': SENTENCES, **kwargs}
  return evaluate.run_eval_worker(workdir, **kwargs)


def test_worker_scores_each_checkpoint_once_and_matches_sacrebleu(workdir_copy):
  results = _score(workdir_copy)
  assert [r['step'] for r in results] == [10, 20]
  for result in results:
    hypotheses = open(result['hypotheses'], encoding='utf-8').read().splitlines()
    references = open(os.path.join(workdir_copy, 'splits', 'test.ref'),
                      encoding='utf-8').read().splitlines()[:SENTENCES]
    assert len(hypotheses) == SENTENCES
    assert result['bleu'] == pytest.approx(sacrebleu.corpus_bleu(hypotheses,
                                                                 [references]).score)
    assert np.isfinite(result['valid_loss']) and result['sentences'] == SENTENCES
    assert np.isfinite(result['valid_bleu'])
  # A restarted worker remembers what it scored.
  assert _score(workdir_copy) == []
  results_file = os.path.join(workdir_copy, 'eval', 'results.jsonl')
  lines = open(results_file).read().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [10, 20]
  # One killed after its TensorBoard write for step 20, before the results line, scores
  # step 20 again and logs it once.
  with open(results_file, 'w') as handle:
    handle.write(lines[0] + '\n')
  again = _score(workdir_copy)
  assert [r['step'] for r in again] == [20]
  scalars = [json.loads(line) for line in open(
      os.path.join(workdir_copy, 'eval', 'metrics.jsonl'), encoding='utf-8')]
  assert [line['step'] for line in scalars] == [10, 20]
  assert not os.path.exists(os.path.join(workdir_copy, files.WORKER))  # released
  png = curves.render(workdir_copy)
  assert open(png, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_worker_survives_a_checkpoint_deleted_under_it(workdir_copy):
  shutil.rmtree(os.path.join(workdir_copy, 'checkpoints', '10', 'state'))
  results = _score(workdir_copy)
  assert [r['step'] for r in results] == [20]


def test_single_checkpoint_mode(workdir_copy):
  results = _score(workdir_copy, checkpoint_step=10)
  assert [r['step'] for r in results] == [10]
  # Scored again (say with other decoding options), its result replaces the first.
  (again,) = _score(workdir_copy, checkpoint_step=10,
                    options=translation.DecodeOptions(beam_size=1))
  lines = open(os.path.join(workdir_copy, files.RESULTS)).read().splitlines()
  assert [(json.loads(line)['step'], json.loads(line)['beam_size']) for line in lines] == [
      (10, 1)]
  with pytest.raises(errors.CheckpointError):
    _score(workdir_copy, checkpoint_step=15)
  assert not os.path.exists(os.path.join(workdir_copy, files.WORKER))  # released


def test_worker_scores_every_named_test_set(workdir_copy):
  # A named test set (config.data.test_sets) is prepared into splits/test_<name>.*.
  splits = os.path.join(workdir_copy, 'splits')
  for suffix in ('src', 'ref'):
    lines = open(os.path.join(splits, f'valid.{suffix}'), encoding='utf-8').readlines()
    with open(os.path.join(splits, f'test_news.{suffix}'), 'w', encoding='utf-8') as handle:
      handle.writelines(lines[:6])
  (result,) = _score(workdir_copy, checkpoint_step=20)
  assert result['test_set'] == 'test' and result['bleu'] == result['bleu_test']
  hypotheses = open(os.path.join(workdir_copy, 'eval', 'news_hypotheses_20.txt'),
                    encoding='utf-8').read().splitlines()
  references = open(os.path.join(splits, 'test_news.ref'),
                    encoding='utf-8').read().splitlines()
  assert len(hypotheses) == 6
  assert result['bleu_news'] == pytest.approx(
      sacrebleu.corpus_bleu(hypotheses, [references]).score)
  scalars = [json.loads(line) for line in open(
      os.path.join(workdir_copy, 'eval', 'metrics.jsonl'), encoding='utf-8')]
  assert any('bleu/news' in line and 'chrf/news' in line for line in scalars)


def test_a_second_eval_worker_refuses_while_one_runs(workdir_copy):
  first = locks.EvalLock(workdir_copy)  # a live worker: this process, this host
  try:
    with pytest.raises(errors.WorkdirError) as raised:
      _score(workdir_copy, checkpoint_step=20)
    message = str(raised.value)
    assert message.startswith(f'{workdir_copy} is in use by another eval worker (pid '
                              f'{os.getpid()} on {socket.gethostname()}, last heartbeat')
    assert '\n' not in message
    assert not os.path.exists(os.path.join(workdir_copy, files.RESULTS))
    first.refresh()  # still the first worker's
    # Through the command line: one line, exit code 2.
    result = run_main('--mode=eval', f'--workdir={workdir_copy}', timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = last_error(result.stderr)
    assert last.startswith(f'error: {message.split(", last heartbeat")[0]}, last heartbeat')
    assert last.endswith(message[-40:]) and 'Traceback' not in result.stderr
  finally:
    first.release()
  assert not os.path.exists(os.path.join(workdir_copy, files.WORKER))


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
    results = _score(workdir_copy)
    assert [r['step'] for r in results] == [10, 20]
    assert all(np.isfinite(r['bleu']) for r in results)
    assert _snapshot(workdir_copy) == before
  finally:
    holder.release()



@pytest.mark.slow
def test_eval_worker_scores_the_average_and_keeps_the_best(ema_copy):
  results = _score(ema_copy)
  assert [r['step'] for r in results] == [5, 10, 15, 20]
  assert all(r['weights'] == 'ema' and 'valid_bleu' in r for r in results)
  best = files.best_result(ema_copy)
  with open(os.path.join(ema_copy, 'eval', 'best.json'), encoding='utf-8') as handle:
    assert json.load(handle)['step'] == best['step']
  before = files.read_results(ema_copy)
  averaging.average(ema_copy, last=2, name='two')
  [result] = _score(ema_copy, weights='two')
  assert result['weights'] == 'two' and result['averaged_steps'] == [15, 20]
  assert os.path.exists(os.path.join(ema_copy, 'eval', 'averaged_two.json'))
  assert os.path.exists(os.path.join(ema_copy, 'eval', 'test_hypotheses_two.txt'))
  assert files.read_results(ema_copy) == before  # per-checkpoint results untouched
