"""The eval worker, BLEU statistics, checkpoint retention and the curves command."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import sacrebleu

from jaxnmt import bleu
from jaxnmt import curves
from jaxnmt import errors
from jaxnmt import evaluate
from jaxnmt import train
from jaxnmt import translate
from jaxnmt import workdir as workdir_lib
from tests.tiny_config import tiny_config

OPTIONS = translate.DecodeOptions(beam_size=2)


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
  lines = open(os.path.join(workdir_copy, 'eval', 'results.jsonl')).read().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [10, 20]
  assert os.path.exists(os.path.join(workdir_copy, 'eval', 'metrics.jsonl'))
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
  with pytest.raises(errors.CheckpointError):
    evaluate.run_eval_worker(workdir_copy, checkpoint_step=15, options=OPTIONS)


@pytest.mark.slow
def test_retention_keeps_what_a_live_worker_has_not_scored(small_corpus, tmp_path):
  config = tiny_config(small_corpus)
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 1
  alone = str(tmp_path / 'alone')
  train.train_and_evaluate(config, alone)
  assert sorted(os.listdir(os.path.join(alone, 'checkpoints'))) == ['20']

  watched = str(tmp_path / 'watched')
  os.makedirs(os.path.join(watched, 'eval'))
  with open(os.path.join(watched, workdir_lib.WORKER), 'w') as handle:
    json.dump({'pid': 0, 'heartbeat': time.time()}, handle)
  with open(os.path.join(watched, workdir_lib.RESULTS), 'w') as handle:
    handle.write(json.dumps({'step': 5}) + '\n')
  train.train_and_evaluate(config, watched)
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
