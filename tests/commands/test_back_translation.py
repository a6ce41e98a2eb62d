"""The back-translation recipe of docs/back-translation.md at toy size, end to end:
train the reverse direction (data.reverse), translate the target-side monolingual
text with it by sampling on two processes, prepare the result as a corpus tagged <bt>
beside the real one, and train the forward model on the mixture."""

import json
import os

import pytest

from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.decoding import translation
from tests.helpers import real_pairs, run_main
from tests.tiny_config import tiny_config

pytestmark = pytest.mark.slow


def test_back_translation_end_to_end(tmp_path):
  from jaxnmt.training import loop  # pylint: disable=g-import-not-at-top
  pairs = real_pairs(3600)
  real, monolingual = pairs[:3000], [es for _, es in pairs[3000:]]  # disjoint slices
  (tmp_path / 'real.tsv').write_text(''.join(f'{en}\t{es}\n' for en, es in real),
                                     encoding='utf-8')
  (tmp_path / 'mono.es').write_text(''.join(es + '\n' for es in monolingual),
                                    encoding='utf-8')
  # 1. The reverse model, es -> en.
  reverse = tiny_config(str(tmp_path / 'real.tsv'))
  reverse.data.reverse = True
  loop.train_and_evaluate(reverse, str(tmp_path / 'es-en'))
  # 2. The Spanish text translated into synthetic English, sampled, on two processes.
  result = run_main('--mode=translate', f'--workdir={tmp_path / "es-en"}',
                    f'--input={tmp_path / "mono.es"}', f'--output={tmp_path / "mono.en"}',
                    '--temperature=1.0', '--top_k=10', '--min_length=2',
                    '--commit_lines=200', processes=2, devices=1, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  synthetic = (tmp_path / 'mono.en').read_text(encoding='utf-8').split('\n')[:-1]
  assert len(synthetic) == len(monolingual) and all(synthetic)
  # 3. The synthetic pairs as a corpus of their own: synthetic source, real target.
  (tmp_path / 'bt.tsv').write_text(''.join(f'{en}\t{es}\n' for en, es in
                                           zip(synthetic, monolingual)), encoding='utf-8')
  # 4. The forward model on the mixture, the back-translated corpus tagged <bt>.
  forward = tiny_config(f'{tmp_path / "real.tsv"},{tmp_path / "bt.tsv"}')
  forward.data.tags = ',bt'
  forward.data.weights = '0.5,0.5'
  workdir = str(tmp_path / 'en-es')
  loop.train_and_evaluate(forward, workdir)
  with open(os.path.join(workdir, 'data', 'manifest.json'), encoding='utf-8') as handle:
    corpora = json.load(handle)['corpora']
  assert [c['name'] for c in corpora] == ['real', 'bt'] and corpora[1]['pairs'] > 400
  tokenizer = tokenizer_lib.load(os.path.join(workdir, 'tokenizer.model'), 'unigram')
  assert tokenizer.tags == ('<bt>',)
  translator = translation.Translator.from_workdir(workdir)
  assert len(translator.translate(['Good morning.', '<bt> Good morning.'])) == 2
