"""`--mode=compile` from the command line: a multislice slice's table and JSON, the
one-line refusal of a model no chip holds, a saved step a training run uses, and a
stopped plan resumed."""

import glob
import importlib.util
import json
import os

import jax
import pytest

from jaxnmt import config_lib
from jaxnmt.commands import compile as compile_command
from jaxnmt.training import preflight
from tests.helpers import last_error
from tests.helpers import losses_by_step
from tests.helpers import run_main
from tests.tiny_config import tiny_config

TEST_CONFIG = '--config=tests/tiny_config.py'


def _cuda_compiler_installed() -> bool:
  try:
    return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


@pytest.mark.slow
def test_two_slices_send_only_the_gradient_reduction_over_dcn(libtpu, tmp_path):
  result = run_main('--mode=compile', TEST_CONFIG, '--topology=v5e-4', '--num_slices=2',
                    '--config.mesh.data=2', '--config.mesh.fsdp=4',
                    # 4 rows per chip (with 1, the partitioner also moves a few KB of
                    # activations between the slices to reshape the batch).
                    '--config.data.batch_size=32', '--config.data.eval_batch_size=32',
                    f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  for function in ('train_step', 'eval_step', 'decode_greedy', 'decode_beam'):
    assert f'\n{function} ' in result.stdout
  report = json.load(open(tmp_path / 'compile' / '2xv5e-4.json'))
  functions = {record['function']: record for record in report['functions']}
  assert report['devices'] == 8 and all(record['fits'] for record in functions.values())
  train = functions['train_step']
  assert train['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  crossing = [item for item in train['collectives'] if item['crosses_slices']]
  # The gradients' reduction over the data axis, and nothing else, crosses slices.
  assert {(item['kind'], tuple(item['axes'])) for item in crossing} == {
      ('all-reduce', ('data',))}
  assert sum(item['bytes'] for item in crossing) >= train['state']['params']
  inside = [item for item in train['collectives'] if not item['crosses_slices']]
  assert all('data' not in item['axes'] for item in inside if item['bytes'] > 1024)
  # The decoders split sentences over one host's chips, as translate does, and each
  # chip's beams stay on it (reordering the beams gathers nothing from other chips).
  assert functions['decode_beam']['mesh'] == {'data': 4}
  assert functions['decode_beam']['state']['params'] > 3 * train['state']['params']
  assert all(item['kind'] != 'all-gather' for item in functions['decode_beam']['collectives'])


def test_a_model_no_chip_holds_is_one_line_exit_2(libtpu, tmp_path):
  # 5.9 billion parameters in 2+2 layers: 23 GB in float32 on a 16 GiB chip.
  result = run_main('--mode=compile', '--config=configs/big.py', '--topology=v5e-1',
                    '--config.model.d_model=8192', '--config.model.d_ff=32768',
                    '--config.model.num_heads=64', '--config.tokenizer.vocab_size=256000',
                    '--config.model.num_encoder_layers=2',
                    '--config.model.num_decoder_layers=2', f'--workdir={tmp_path}')
  assert result.returncode == 2, result.stderr[-2000:]
  error = last_error(result.stderr)
  assert error.startswith('error: train_step does not fit v5e-1: the train state alone '
                          'needs 65.44 GiB'), error
  assert error.endswith('--config.mesh.fsdp=16; it needs at least that many chips)')
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_a_saved_step_trains_like_one_compiled_in_the_run(small_corpus, tmp_path):
  """--mode=compile --save_compiled on this job's 8 CPU devices, then a run with
  --compiled_step: the losses of a run that compiles its own step."""
  compiled = run_main('--mode=compile', TEST_CONFIG, '--save_compiled',
                      f'--workdir={tmp_path / "plan"}', corpus=small_corpus)
  assert compiled.returncode == 0, compiled.stderr[-2000:]
  [saved] = glob.glob(str(tmp_path / 'plan' / 'compile' / '*.train_step'))
  steps = ('--config.num_train_steps=3', '--config.log_every_steps=1')
  runs = {}
  for name, extra in [('compiled', (f'--compiled_step={saved}',)), ('plain', ())]:
    result = run_main(TEST_CONFIG, *steps, *extra, f'--workdir={tmp_path / name}',
                      corpus=small_corpus)
    assert result.returncode == 0, result.stderr[-2000:]
    runs[name] = losses_by_step(tmp_path / name)
  assert runs['compiled'] == runs['plain'] and sorted(runs['plain']) == [1, 2, 3]
  assert os.path.getsize(saved) > 0


@pytest.mark.slow
@pytest.mark.skipif(not _cuda_compiler_installed(),
                    reason="needs the CUDA compiler: pip install -e '.[gpu-compile]'")
def test_an_h100_cluster_compiles_the_tiny_config(tmp_path):
  """Two nodes of 8 H100s, from the CUDA compiler without a GPU (the tests' 32-wide
  config is below what XLA's GPU tiling handles without autotuning: configs/tiny.py)."""
  result = run_main('--mode=compile', '--config=configs/tiny.py', '--topology=h100-16',
                    '--config.data.batch_size=32', '--config.data.eval_batch_size=32',
                    f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.load(open(tmp_path / 'compile' / 'h100-16.json'))
  train = report['functions'][0]
  assert report['devices'] == 16 and train['fits'] and train['flops'] > 0
  assert train['mesh'] == {'data': 16, 'fsdp': 1, 'tensor': 1}
  assert {(item['kind'], tuple(item['axes'])) for item in train['collectives']} == {
      ('all-reduce', ('data',))}


@pytest.mark.slow
def test_a_stopped_plan_resumes_without_compiling_its_meshes_again(tmp_path, monkeypatch):
  """`--plan` saves each compiled mesh as it goes: stopped after one compile, the next
  run compiles only the rest; a plan of another model is not reused."""
  config = tiny_config(str(tmp_path))
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  devices, target = jax.devices()[:2], '2 x cpu'
  meshes = preflight.candidate_meshes(config, 2)
  assert len(meshes) == 3  # data, fsdp or tensor
  real_compile, compiled = preflight.compile_function, []

  def counted(function, trial, *args, **kwargs):
    if stop_after is not None and len(compiled) == stop_after:
      raise KeyboardInterrupt
    compiled.append(dict(trial.mesh))
    return real_compile(function, trial, *args, **kwargs)
  monkeypatch.setattr(preflight, 'compile_function', counted)
  plan_file = tmp_path / 'compile' / compile_command._file_name(target, plan=True)

  stop_after = 1
  with pytest.raises(KeyboardInterrupt):
    compile_command._plan(config, model_cfg, devices, 2**30, target, str(tmp_path))
  saved = json.loads(plan_file.read_text())
  assert not saved['complete'] and len(saved['candidates']) == 1
  [first] = saved['candidates']

  stop_after, compiled[:] = None, []
  compile_command._plan(config, model_cfg, devices, 2**30, target, str(tmp_path))
  assert len(compiled) == 2 and first['mesh'] not in compiled
  saved = json.loads(plan_file.read_text())
  assert saved['complete'] and len(saved['candidates']) == 3
  assert all(candidate['fits'] for candidate in saved['candidates'])
  [again] = [c for c in saved['candidates'] if c['mesh'] == first['mesh']]
  assert again['report']['compile_s'] == first['report']['compile_s']

  def reused(config, target):
    fingerprint = compile_command._plan_fingerprint(config, target, 2**30)
    return len(compile_command._compiled_before(str(plan_file), fingerprint))
  assert reused(config, target) == 3
  assert reused(config, '4 x cpu') == 0
  config.model.d_ff *= 2
  assert reused(config, target) == 0
