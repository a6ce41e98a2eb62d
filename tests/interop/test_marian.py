"""--mode=import of a Marian model directory, checked against CTranslate2's own Marian
converter; the round trip through --mode=export; the refusals."""

import collections
import os

import ctranslate2
import numpy as np
import pytest
import sentencepiece as spm
from ctranslate2.converters import marian as ct2_marian

from jaxnmt.decoding import inference
from jaxnmt.decoding import translation
from jaxnmt.interop import marian
from jaxnmt.model import layers
from tests import helpers
from tests.interop import marian_model

SENTENCES = [en for en, _ in helpers.real_pairs(100, seed=11)]


def _marian_positions(num_positions, dim):
  """Marian's own table (sines, then cosines, of timescales 10000^(i / (D/2 - 1)))."""
  return np.asarray(layers.sinusoidal_positions(np.arange(num_positions)[None], dim)[0])


def test_ctranslate2_writes_another_sinusoidal_table_than_marian():
  """Why the converter below gets Marian's table: CTranslate2's Marian converter writes
  timescales 10000^(i / (D/2)). If this starts failing, CTranslate2 fixed it."""
  ours = _marian_positions(64, 32)
  theirs = ct2_marian._make_sinusoidal_position_encodings(32, 64)  # pylint: disable=protected-access
  assert np.allclose(ours[:, [0, 16]], theirs[:, [0, 16]])  # the first timescale agrees
  assert not np.allclose(ours, theirs, atol=1e-3)


def _ct2_marian(directory, output, monkeypatch):
  monkeypatch.setattr(ct2_marian, '_make_sinusoidal_position_encodings',
                      lambda dim, num_positions=2048: _marian_positions(num_positions, dim))
  converter = ct2_marian.MarianConverter(os.path.join(directory, 'model.npz'),
                                         [os.path.join(directory, 'vocab.yml')] * 2)
  converter.convert(output, quantization='float32')
  return ctranslate2.Translator(output, compute_type='float32')


def _ct2_translate(translator, directory, caps, lines):
  source = spm.SentencePieceProcessor(model_file=os.path.join(directory, 'source.spm'))
  target = spm.SentencePieceProcessor(model_file=os.path.join(directory, 'target.spm'))
  pieces = [source.encode(line, out_type=str) for line in lines]
  groups = collections.defaultdict(list)
  for index, tokens in enumerate(pieces):
    groups[caps(len(tokens) + 1)].append(index)
  out = [''] * len(lines)
  for cap, indices in groups.items():
    results = translator.translate_batch([pieces[i] for i in indices], beam_size=1,
                                         max_decoding_length=cap - 1, min_decoding_length=0)
    for i, result in zip(indices, results):
      out[i] = target.decode(result.hypotheses[0])
  return out


@pytest.mark.slow
@pytest.mark.parametrize('options', [
    {},  # OPUS-MT's: post-LN, swish, tied embeddings
    {'transformer-preprocess': 'n', 'transformer-postprocess': 'da',
     'transformer-postprocess-top': 'n', 'transformer-ffn-activation': 'gelu',
     'tied-embeddings-all': False, 'tied-embeddings': True},
], ids=['opus-mt', 'pre-ln-gelu-untied'])
def test_import_translates_as_ctranslate2s_marian_converter(options, tmp_path, monkeypatch):
  directory = str(tmp_path / 'marian')
  marian_model.write(directory, **options)
  result = helpers.run_main('--mode=import', '--from=marian', f'--input={directory}',
                            f'--workdir={tmp_path / "run"}')
  assert result.returncode == 0, result.stderr[-2000:]
  loaded = inference.load(str(tmp_path / 'run'))
  ours = translation.Translator(loaded, translation.DecodeOptions(beam_size=1)).translate(
      SENTENCES)
  caps = lambda tokens: translation.output_cap(tokens, loaded.config.decode, None)
  theirs = _ct2_translate(_ct2_marian(directory, str(tmp_path / 'ct2'), monkeypatch),
                          directory, caps, SENTENCES)
  differ = [(s, a, b) for s, a, b in zip(SENTENCES, ours, theirs) if a != b]
  assert not differ, (len(differ), differ[:2])
  # Every token's log-probability of the reference pairs (what --mode=score gives),
  # within 1e-4 of CTranslate2's score_batch: random Marian weights make degenerate
  # greedy outputs, the scores test every weight on real text.
  from jaxnmt.decoding import scoring  # pylint: disable=g-import-not-at-top
  pairs = helpers.real_pairs(100, seed=11)
  scored = scoring.score_text(loaded, [en for en, _ in pairs], [es for _, es in pairs],
                              per_token=True)
  source = spm.SentencePieceProcessor(model_file=os.path.join(directory, 'source.spm'))
  target = spm.SentencePieceProcessor(model_file=os.path.join(directory, 'target.spm'))
  ct2 = _ct2_marian(directory, str(tmp_path / 'ct2-scores'), monkeypatch)
  reference = ct2.score_batch([source.encode(en, out_type=str) for en, _ in pairs],
                              [target.encode(es, out_type=str) for _, es in pairs])
  for mine, theirs in zip(scored, reference):
    np.testing.assert_allclose(mine.token_log_probs, theirs.log_probs, atol=1e-4)
  # Round trip: import -> export -> CTranslate2 translates as jaxnmt did.
  exported = helpers.run_main('--mode=export', f'--workdir={tmp_path / "run"}',
                              f'--output={tmp_path / "export"}')
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert {'source.spm', 'target.spm'} <= set(os.listdir(tmp_path / 'export'))
  again = _ct2_translate(ctranslate2.Translator(str(tmp_path / 'export'),
                                                compute_type='float32'),
                         directory, caps, SENTENCES)
  assert again == ours


def test_vocabulary_is_reordered_and_padded(tmp_path):
  directory = str(tmp_path / 'marian')
  marian_model.write(directory)
  vocabulary = marian.read_vocabulary(os.path.join(directory, 'vocab.yml'))
  assert vocabulary[:2] == ['</s>', '<unk>'] and len(set(vocabulary)) == len(vocabulary)
  pieces, order = marian._vocabulary_order(vocabulary)  # pylint: disable=protected-access
  assert pieces[:4] == ['<pad>', '<unk>', '<s>', '</s>']
  assert len(pieces) % marian.VOCAB_MULTIPLE == 0 and list(order[:4]) == [-1, 1, -1, 0]
  assert [vocabulary[i] for i in order if i >= 0] == [vocabulary[1], vocabulary[0],
                                                      *vocabulary[2:]]


@pytest.mark.parametrize('option, value, named', [
    ('transformer-ffn-activation', 'tanh', 'transformer-ffn-activation'),
    ('transformer-postprocess-emb', 'dn', 'transformer-postprocess-emb'),
    ('transformer-tied-layers', [1, 1], 'transformer-tied-layers'),
    ('transformer-decoder-autoreg', 'rnn', 'transformer-decoder-autoreg'),
])
def test_an_unsupported_option_is_one_line(option, value, named, tmp_path):
  directory = str(tmp_path / 'marian')
  marian_model.write(directory, **{option: value})
  result = helpers.run_main('--mode=import', f'--input={directory}',
                            f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2, result.stderr[-1000:]
  assert named in helpers.last_error(result.stderr) and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'run' / 'config.json')


def test_a_missing_file_is_one_line(tmp_path):
  result = helpers.run_main('--mode=import', f'--input={tmp_path}', f'--workdir={tmp_path / "r"}')
  assert result.returncode == 2 and 'decoder.yml' in helpers.last_error(result.stderr)


@pytest.mark.slow
def test_an_imported_model_fine_tunes(tmp_path, small_corpus):
  """init_from an imported Marian model: training starts from its weights (the first
  loss is the imported model's), on data tokenized by its spm_vocab tokenizer, and
  the loss falls."""
  directory = str(tmp_path / 'marian')
  marian_model.write(directory)
  imported = helpers.run_main('--mode=import', f'--input={directory}',
                              f'--workdir={tmp_path / "opus"}')
  assert imported.returncode == 0, imported.stderr[-2000:]
  flags = [f'--config.{name}' for name in (
      'model.num_encoder_layers=2', 'model.num_decoder_layers=2', 'model.d_model=32',
      'model.num_heads=4', 'model.d_ff=48', 'model.activation=swish',
      'model.pre_layer_norm=False', 'model.attention_bias=True', 'model.output_bias=True',
      'model.decoder_start=zeros', 'tokenizer.model_type=spm_vocab',
      'tokenizer.vocab_size=' + str(inference.load(str(tmp_path / 'opus')).model_config.vocab_size),
      'model.attention_dropout_rate=0.0', 'num_train_steps=30',
      'checkpoint_every_steps=30', 'eval_every_steps=30', 'log_every_steps=5',
      'optim.learning_rate=3e-3', 'optim.warmup_steps=1')]
  tuned = helpers.run_main('--config=tests/tiny_config.py', f'--workdir={tmp_path / "tuned"}',
                           f'--config.init_from={tmp_path / "opus"}', *flags,
                           corpus=small_corpus, timeout=600)
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  losses = helpers.losses_by_step(tmp_path / 'tuned')
  assert losses[30] < 0.8 * losses[5], losses


@pytest.mark.slow
def test_a_multilingual_model_takes_its_target_language_tag(tmp_path, monkeypatch):
  """A multilingual OPUS-MT model (`>>spa<<`, `>>por<<` in its vocabulary): after import,
  `--target_lang=spa` puts `>>spa<<` before each source as one id, as a line that
  starts with it does; each pair's log-probability under either tag is what
  CTranslate2's Marian converter gives with the tag as the first source token, and
  greedy translations are its; other tags are refused in one line."""
  # pylint: disable=g-import-not-at-top
  from configs import base
  from jaxnmt.decoding import scoring
  from jaxnmt.errors import UserError
  directory = str(tmp_path / 'marian')
  marian_model.write(directory, tags=('>>spa<<', '>>por<<'))
  marian.import_model(directory, str(tmp_path / 'run'), base.get_config())
  loaded = inference.load(str(tmp_path / 'run'))
  assert loaded.config.data.target_tag_format == '>>{}<<'
  greedy = translation.DecodeOptions(beam_size=1)
  pairs = helpers.real_pairs(100, seed=11)[:30]
  lines = [en for en, _ in pairs]
  spa = translation.Translator(loaded, greedy, target_lang='spa')
  tag_id = loaded.tokenizer.tag_id('>>spa<<')
  assert [ids[0] for ids in spa.encode(lines)] == [tag_id] * len(lines)
  assert spa.translate(lines) == translation.Translator(loaded, greedy).translate(
      [f'>>spa<< {line}' for line in lines])
  ct2 = _ct2_marian(directory, str(tmp_path / 'ct2'), monkeypatch)
  caps = lambda tokens: translation.output_cap(tokens, loaded.config.decode, None)
  source = spm.SentencePieceProcessor(model_file=os.path.join(directory, 'source.spm'))
  target = spm.SentencePieceProcessor(model_file=os.path.join(directory, 'target.spm'))
  totals = {}
  for lang in ('spa', 'por'):
    ours = scoring.score_text(loaded, [f'>>{lang}<< {en}' for en, _ in pairs],
                              [es for _, es in pairs])
    sources = [[f'>>{lang}<<'] + source.encode(en, out_type=str) for en, _ in pairs]
    theirs = ct2.score_batch(sources, [target.encode(es, out_type=str) for _, es in pairs])
    totals[lang] = [score.total for score in ours]
    np.testing.assert_allclose(totals[lang], [sum(r.log_probs) for r in theirs],
                               rtol=1e-4, atol=1e-3)
    translated = translation.Translator(loaded, greedy, target_lang=lang).translate(lines)
    for pieces, mine in zip(sources, translated):
      result = ct2.translate_batch([pieces], beam_size=1, min_decoding_length=0,
                                   max_decoding_length=caps(len(pieces) + 1) - 1)
      assert target.decode(result[0].hypotheses[0]) == mine, (lang, pieces)
  assert np.abs(np.subtract(totals['spa'], totals['por'])).max() > 1e-2  # the tag counts
  with pytest.raises(UserError, match=r'no tag >>deu<< \(its target languages: spa, por\)'):
    translation.Translator(loaded, greedy, target_lang='deu')
  with pytest.raises(UserError, match='starts with the tag >>deu<<'):
    translation.Translator(loaded, greedy).translate(['>>deu<< Hello.'])
