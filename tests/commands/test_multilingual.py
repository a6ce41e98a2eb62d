"""A multilingual model end to end at toy size: two corpora of digit strings, one
reversed under the target tag <2rv>, one shifted by one under <2sh>; prepare puts the
tags before the sources, the tokenizer holds them as one id each, a tiny model learns
both tasks (>= 95% exact match per tag), and translate takes --target_lang or the
tag in the line, refusing one it has never seen."""

import io
import random

import pytest

from jaxnmt.commands import translate as translate_command
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.decoding import translation
from jaxnmt.errors import UserError
from tests.helpers import real_pairs
from tests.tiny_config import tiny_config

pytestmark = pytest.mark.slow

RULES = {'rv': lambda s: s[::-1], 'sh': lambda s: ''.join(str((int(c) + 1) % 10) for c in s)}


def _digits(rng) -> str:
  return ''.join(rng.choice('0123456789') for _ in range(rng.randint(3, 6)))


def _config(folder):
  rng = random.Random(0)
  for lang, rule in RULES.items():
    with open(folder / f'{lang}.tsv', 'w', encoding='utf-8') as handle:
      handle.writelines(f'{s}\t{rule(s)}\n' for s in (_digits(rng) for _ in range(4000)))
  # Digits alone give too few pieces for SentencePiece's 300 minimum: a tokenizer of
  # digits and some English, with the two tags, given to prepare.
  filler = [side for pair in real_pairs(300) for side in pair]
  tokenizer_lib.train(filler + [_digits(rng) + _digits(rng) for _ in range(300)],
                      str(folder / 'tok.model'), 400, tags=['<2rv>', '<2sh>'])
  config = tiny_config(f'{folder}/rv.tsv,{folder}/sh.tsv')
  config.data.target_langs = 'rv,sh'
  config.tokenizer.path = str(folder / 'tok.model')
  config.data.max_source_length = config.data.max_target_length = 16
  config.data.batch_size = config.data.eval_batch_size = 64
  config.data.test_fraction, config.data.valid_fraction = 0.0, 0.02
  config.model.d_model, config.model.num_heads, config.model.d_ff = 64, 4, 128
  config.model.num_encoder_layers = config.model.num_decoder_layers = 2
  config.num_train_steps = config.checkpoint_every_steps = 600
  config.eval_every_steps, config.log_every_steps = 100_000, 100
  config.optim.warmup_steps, config.optim.learning_rate = 100, 3e-3
  return config


def test_a_tiny_model_learns_each_tags_task(tmp_path):
  from jaxnmt.training import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(_config(tmp_path), workdir)
  greedy = translation.DecodeOptions(beam_size=1)
  translator = translation.Translator.from_workdir(workdir, options=greedy)
  assert translator.tokenizer.tags == ('<2rv>', '<2sh>')
  rng = random.Random(99)
  sources = [_digits(rng) for _ in range(200)]
  for lang, rule in RULES.items():
    tagged = translation.Translator(translator.loaded, greedy, target_lang=lang)
    outputs = tagged.translate(sources)
    accuracy = sum(o == rule(s) for s, o in zip(sources, outputs)) / len(sources)
    assert accuracy >= 0.95, (lang, accuracy, list(zip(sources, outputs))[:10])
    # The tag in the line instead of --target_lang: the same translations.
    assert translator.translate([f'<2{lang}> {s}' for s in sources]) == outputs
  source = tmp_path / 'in.txt'
  source.write_text('<2sh> 123\n\n456\n', encoding='utf-8')
  output = io.StringIO()
  translate_command.run(workdir, str(source), output, options=greedy, target_lang='rv')
  assert output.getvalue() == '234\n\n654\n'
  with pytest.raises(UserError, match='names no target language'):
    translator.translate(['123'])
  with pytest.raises(UserError, match='starts with the tag <2de>, which this model was not'):
    translator.translate(['<2de> 123'])
  with pytest.raises(UserError, match='--target_lang=de: this model has no tag <2de>'):
    translation.Translator(translator.loaded, greedy, target_lang='de')
