"""Corpus BLEU and chrF from sacrebleu's own sufficient statistics, so scores computed
on parts of a test set (other devices, other processes, other batches) add up to
exactly the score sacrebleu gives on the whole."""

from typing import Sequence

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

_BLEU = BLEU()  # 13a tokenization, exponential smoothing: sacrebleu's defaults
_CHRF = CHRF()


def statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """Summable statistics of BLEU then chrF for one reference per hypothesis: int64 [N]."""
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} references')
  if not hypotheses:
    return np.zeros(_num_bleu_stats() + _num_chrf_stats(), np.int64)
  bleu = np.sum(_BLEU._extract_corpus_statistics(hypotheses, [references]), axis=0)  # pylint: disable=protected-access
  chrf = np.sum(_CHRF._extract_corpus_statistics(hypotheses, [references]), axis=0)  # pylint: disable=protected-access
  return np.concatenate([bleu, chrf]).astype(np.int64)


def scores(stats: np.ndarray) -> dict:
  """{'bleu', 'chrf', 'bleu_signature', 'chrf_signature', 'bleu_text'} of summed stats."""
  stats = [int(value) for value in stats]
  split = _num_bleu_stats()
  bleu = _BLEU._compute_score_from_stats(stats[:split])  # pylint: disable=protected-access
  chrf = _CHRF._compute_score_from_stats(stats[split:])  # pylint: disable=protected-access
  return {'bleu': bleu.score, 'chrf': chrf.score, 'bleu_text': str(bleu),
          'bleu_signature': str(_BLEU.get_signature()),
          'chrf_signature': str(_CHRF.get_signature())}


def _num_bleu_stats() -> int:
  return 2 + 2 * _BLEU.max_ngram_order


def _num_chrf_stats() -> int:
  return 3 * (_CHRF.char_order + _CHRF.word_order)
