"""decoding/bleu: BLEU and chrF from summed per-part statistics equal sacrebleu on the
whole corpus."""

import pytest
import sacrebleu

from jaxnmt.decoding import bleu


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
