"""--mode=export to CTranslate2, checked against CTranslate2 itself: random models of
every option (each value and each pair of values at least once), a trained workdir
through the command line, the refusals."""

import collections
import os

import ctranslate2
import numpy as np
import pytest
import sacrebleu
import sentencepiece as spm
from flax import nnx

from jaxnmt.decoding import inference
from jaxnmt.decoding import translation
from jaxnmt.interop import ctranslate2 as ct2_export
from jaxnmt.interop import weights as weights_lib
from jaxnmt.runtime import files
from tests import helpers
from tests.interop import ct2_oracle

FACTORS = {
    'pre_layer_norm': [True, False],
    'norm': ['layernorm', 'rmsnorm'],
    'activation': ['relu', 'gelu', 'gelu_sigmoid', 'swish', 'swiglu'],
    'position_embedding': ['sinusoidal', 'learned', 'rope'],
    'share_embeddings': [True, False],
    'attention_bias': [False, True],
    'output_bias': [False, True],
    'decoder_start': ['bos', 'zeros'],
}
TRANSLATION_MODELS = ct2_oracle.pairwise(FACTORS)
LM_MODELS = ct2_oracle.pairwise({**{k: v for k, v in FACTORS.items() if k != 'decoder_start'},
                                 'kind': ['decoder_lm']})


def test_the_option_sets_hold_every_pair_of_values():
  lm_factors = {**{k: v for k, v in FACTORS.items() if k != 'decoder_start'},
                'kind': ['decoder_lm']}
  for factors, rows in ((FACTORS, TRANSLATION_MODELS), (lm_factors, LM_MODELS)):
    for a, b in ((a, b) for a in factors for b in factors if a < b):
      assert {(x, y) for x in factors[a] for y in factors[b]} <= {
          (row[a], row[b]) for row in rows}, (a, b)
  # activation x position_embedding alone needs 15.
  assert len(TRANSLATION_MODELS) <= 16 and len(LM_MODELS) <= 16


@pytest.mark.slow
@pytest.mark.parametrize('options', TRANSLATION_MODELS, ids=str)
def test_translation_model_matches_ctranslate2(options, tmp_path):
  model = ct2_oracle.random_model(1, **options)
  translator = ct2_oracle.export(model, str(tmp_path / 'ct2'))
  compared = ct2_oracle.compare_translation(model, translator, ct2_oracle.random_sources(100),
                                            beam=False)
  assert compared.greedy_same == 100, compared
  assert compared.score_difference <= 1e-4, compared


@pytest.mark.slow
@pytest.mark.parametrize('options', LM_MODELS, ids=str)
def test_language_model_matches_ctranslate2(options, tmp_path):
  model = ct2_oracle.random_model(1, **options)
  generator = ct2_oracle.export(model, str(tmp_path / 'ct2'))
  prompts = [source[:4] for source in ct2_oracle.random_sources(200) if len(source) >= 4]
  compared = ct2_oracle.compare_generation(model, generator, prompts[:50])
  assert compared.greedy_same == compared.sentences, compared
  assert compared.score_difference <= 1e-4, compared


def test_the_comparison_fails_when_one_tensor_is_transposed(tmp_path):
  """The oracle is not blind: Marian's layout (post-LN, swish, biases, zero start) with
  one attention projection written transposed no longer matches."""
  options = dict(pre_layer_norm=False, activation='swish', attention_bias=True,
                 output_bias=True, decoder_start='zeros')
  model = ct2_oracle.random_model(2, **options)
  sources = ct2_oracle.random_sources(40)
  good = ct2_oracle.compare_translation(model, ct2_oracle.export(model, str(tmp_path / 'a')),
                                        sources, beam=False)
  assert good.greedy_same == 40 and good.score_difference <= 1e-4, good
  arrays = weights_lib.flat(nnx.state(model, nnx.Param))
  name = 'decoder_layers.1.self_attention.query'
  square = arrays[name].reshape(arrays[name].shape[0], -1)
  arrays[name] = np.ascontiguousarray(square.T).reshape(arrays[name].shape)
  spec = ct2_export.build_spec(model.config, arrays, ct2_oracle.VOCABULARY)
  ct2_export.save(spec, str(tmp_path / 'b'))
  broken = ct2_oracle.compare_translation(
      model, ctranslate2.Translator(str(tmp_path / 'b'), compute_type='float32'), sources,
      beam=False)
  assert broken.score_difference > 1e-2, broken


def test_a_language_model_with_a_zero_start_is_refused(tmp_path):
  model = ct2_oracle.random_model(0, kind='decoder_lm', decoder_start='zeros')
  arrays = weights_lib.flat(nnx.state(model, nnx.Param))
  with pytest.raises(ct2_export.ExportError, match="decoder_start='zeros'"):
    ct2_export.build_spec(model.config, arrays, ct2_oracle.VOCABULARY)


# ----------------------------------------------------------------------------- a trained run


def _ct2_translate(translator, processor, loaded, lines, **options):
  """CTranslate2's translations of `lines` with jaxnmt's output cap per sentence (its
  EOS not counted), length_penalty 0, beam `options['beam_size']`."""
  pieces = [processor.encode(line, out_type=str) for line in lines]
  by_cap = collections.defaultdict(list)
  for index, tokens in enumerate(pieces):
    cap = translation.output_cap(len(tokens) + 1, loaded.config.decode, None)
    by_cap[cap].append(index)
  out = [''] * len(lines)
  for cap, indices in by_cap.items():
    results = translator.translate_batch([pieces[i] for i in indices], length_penalty=0.0,
                                         max_decoding_length=cap - 1,
                                         min_decoding_length=0, **options)
    for i, result in zip(indices, results):
      out[i] = processor.decode(result.hypotheses[0])
  return out


@pytest.fixture(scope='module')
def exported(trained_workdir, tmp_path_factory):
  """trained_workdir exported through the command line, float32 and int8."""
  out = tmp_path_factory.mktemp('exported')
  for quantization in ('float32', 'int8'):
    result = helpers.run_main('--mode=export', f'--workdir={trained_workdir}',
                              f'--output={out / quantization}',
                              f'--quantization={quantization}')
    assert result.returncode == 0, result.stderr[-2000:]
  return out


@pytest.mark.slow
def test_exported_workdir_translates_as_jaxnmt(trained_workdir, exported):
  names = sorted(os.listdir(exported / 'float32'))
  assert {'model.bin', 'sentencepiece.model', 'README.md'} <= set(names), names
  loaded = inference.load(trained_workdir)
  lines = files.read_lines(files.split_file(trained_workdir, 'test.src'))[:100]
  processor = spm.SentencePieceProcessor(model_file=str(exported / 'float32' /
                                                        'sentencepiece.model'))
  translator = ctranslate2.Translator(str(exported / 'float32'), compute_type='float32')
  for beam in (1, 4):
    ours = translation.Translator(loaded, translation.DecodeOptions(
        beam_size=beam, length_penalty=0.0)).translate(lines)
    theirs = _ct2_translate(translator, processor, loaded, lines, beam_size=beam)
    differ = [(line, a, b) for line, a, b in zip(lines, ours, theirs) if a != b]
    assert len(differ) <= (0 if beam == 1 else 2), (beam, len(differ), differ[:3])
  # int8: BLEU on the test split within 0.5 of jaxnmt's beam search.
  references = files.read_lines(files.split_file(trained_workdir, 'test.ref'))[:100]
  int8 = ctranslate2.Translator(str(exported / 'int8'), compute_type='int8')
  hypotheses = _ct2_translate(int8, processor, loaded, lines, beam_size=4)
  ours = translation.Translator(loaded, translation.DecodeOptions(
      beam_size=4, length_penalty=0.0)).translate(lines)
  assert abs(sacrebleu.corpus_bleu(hypotheses, [references]).score -
             sacrebleu.corpus_bleu(ours, [references]).score) <= 0.5


@pytest.mark.slow
def test_half_precision_exports_load_on_this_cpu(trained_workdir, tmp_path):
  result = helpers.run_main('--mode=export', f'--workdir={trained_workdir}',
                            f'--output={tmp_path / "float16"}', '--quantization=float16')
  assert result.returncode == 0, result.stderr[-2000:]
  ctranslate2.Translator(str(tmp_path / 'float16'))  # loads (it runs on GPUs only)
  # bfloat16, without torch: half the float32 weights' bytes; it loads here, and with
  # its weights widened to float32 it translates as the float32 export nearly always.
  lines = files.read_lines(files.split_file(trained_workdir, 'test.src'))[:50]
  loaded = inference.load(trained_workdir)
  processor = spm.SentencePieceProcessor(model_file=os.path.join(trained_workdir,
                                                                 'tokenizer.model'))
  outputs, sizes = {}, {}
  for quantization in ('float32', 'bfloat16', 'int8_bfloat16'):
    result = helpers.run_main('--mode=export', f'--workdir={trained_workdir}',
                              f'--output={tmp_path / quantization}',
                              f'--quantization={quantization}')
    assert result.returncode == 0, result.stderr[-2000:]
    sizes[quantization] = os.path.getsize(tmp_path / quantization / 'model.bin')
    translator = ctranslate2.Translator(str(tmp_path / quantization), compute_type='float32')
    outputs[quantization] = _ct2_translate(translator, processor, loaded, lines, beam_size=1)
  assert sizes['bfloat16'] < 0.55 * sizes['float32']
  assert sum(a == b for a, b in zip(outputs['bfloat16'], outputs['float32'])) >= 45
  assert sum(a == b for a, b in zip(outputs['int8_bfloat16'], outputs['float32'])) >= 35


def test_export_refuses_with_one_line(trained_workdir, tmp_path):
  (tmp_path / 'taken').mkdir()
  taken = helpers.run_main('--mode=export', f'--workdir={trained_workdir}',
                           f'--output={tmp_path / "taken"}')
  assert taken.returncode == 2
  assert helpers.last_error(taken.stderr).startswith('error: --output=')
  assert 'Traceback' not in taken.stderr
  bad = helpers.run_main('--mode=export', f'--workdir={trained_workdir}',
                         f'--output={tmp_path / "x"}', '--quantization=int3')
  assert bad.returncode == 2 and '--quantization=int3' in helpers.last_error(bad.stderr)
  assert not os.path.exists(tmp_path / 'x')
