"""training/executables: the train step compiled ahead of time for the tests' 8 CPU
devices, saved with real JAX serialization, and run by `--compiled_step` instead of
compiling (the same losses); refused with one line when it was compiled for another
config, other devices, other versions or code, or when the file is missing or corrupt."""

import json
import os

import jax
import numpy as np
import pytest

from jaxnmt import config_lib
from jaxnmt.errors import CompiledStepError
from jaxnmt.runtime import sharding
from jaxnmt.training import executables
from jaxnmt.training import fit
from jaxnmt.training import loop
from jaxnmt.training import optim
from jaxnmt.training import setup
from jaxnmt.training import train_state
from tests.helpers import environment, last_error, losses_by_step, run_main
from tests.tiny_config import tiny_config

# What the runs below set beyond tests/tiny_config.py: none of it is in the program.
RUN_FLAGS = {'num_train_steps': 3, 'log_every_steps': 1, 'num_text_samples': 0}


def run_config(corpus: str = '', **data):
  config = tiny_config(corpus)
  for field, value in RUN_FLAGS.items():
    config[field] = value
  for field, value in data.items():
    config.data[field] = value
  return config


@pytest.fixture(scope='module')
def saved_step(build_once) -> str:
  """The tiny config's train step compiled for the 8-device data mesh and saved, once
  per test run (compiled here: the tests' persistent compilation cache may hold it,
  see `executables.uncached`)."""
  def build(folder):
    config = run_config()
    mesh, rules = setup.plan(config)
    with executables.uncached():
      compiled = fit.compile_train_step(
          config, config_lib.model_config(config, config.tokenizer.vocab_size), mesh,
          rules, config.data.batch_size)
    executables.save(compiled, os.path.join(folder, 'train_step.bin'), config=config,
                     mesh=mesh, extra={'by': 'test'})
  return os.path.join(build_once('compiled_step', build), 'train_step.bin')


def refusal(path: str, config=None, mesh=None) -> str:
  """The one-line message with which `load` refuses the step at `path`."""
  config = config or run_config()
  mesh = mesh or setup.plan(config)[0]
  with pytest.raises(CompiledStepError) as raised:
    executables.load(path, config=config, mesh=mesh)
  message = str(raised.value)
  assert '\n' not in message and path in message
  return message


def rewritten(path: str, target, change) -> str:
  """A copy of the step at `path` at `target` whose metadata `change(metadata)` edited."""
  with open(path, 'rb') as handle:
    magic, line, payload = handle.read().split(b'\n', 2)
  metadata = json.loads(line)
  change(metadata)
  target.write_bytes(b'\n'.join([magic, json.dumps(metadata).encode(), payload]))
  return str(target)


@pytest.mark.slow
def test_a_run_on_the_saved_step_logs_the_losses_of_one_that_compiles(
    saved_step, small_corpus, tmp_path):
  prepared = str(tmp_path / 'data')  # both runs train on the same prepared data
  loop.train_and_evaluate(run_config(small_corpus, prepared_dir=prepared),
                          str(tmp_path / 'compiled_in_run'))
  result = run_main('--config=tests/tiny_config.py', f'--workdir={tmp_path / "loaded"}',
                    f'--compiled_step={saved_step}', f'--config.data.prepared_dir={prepared}',
                    *(f'--config.{field}={value}' for field, value in RUN_FLAGS.items()),
                    env=environment(small_corpus, JAX_LOG_COMPILES='1'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Loaded the compiled train step from' in result.stderr
  compiles = [line for line in result.stderr.splitlines() if 'Compiling' in line]
  assert any('eval_step' in line for line in compiles)  # jitted as always ...
  assert not any('train_step' in line for line in compiles), compiles  # ... but not this
  expected = losses_by_step(tmp_path / 'compiled_in_run')
  assert sorted(expected) == [1, 2, 3]
  assert losses_by_step(tmp_path / 'loaded') == expected  # exactly


def test_the_loaded_step_updates_like_the_jitted_one_and_checks_its_arguments(saved_step):
  config = run_config()
  mesh, rules = setup.plan(config)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  model_cfg = config_lib.model_config(config, config.tokenizer.vocab_size)
  _, state, rest, _ = train_state.create_train_state(model_cfg, tx, config.seed, mesh, rules)
  where = sharding.batch_sharding(mesh, rules)
  rows, length = config.data.batch_size, config.data.max_target_length
  tokens = np.random.default_rng(0).integers(3, 400, (rows, length), dtype=np.int32)
  batch = {key: jax.device_put(tokens, where) for key in ('inputs', 'decoder_inputs', 'targets')}
  for key in ('inputs', 'targets'):
    batch[f'{key}_segment_ids'] = jax.device_put(np.ones((rows, length), np.int32), where)
    batch[f'{key}_positions'] = jax.device_put(
        np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)), where)
  step = executables.load(saved_step, config=config, mesh=mesh)
  assert step.metadata['extra'] == {'by': 'test'}
  wrong = dict(batch, targets=batch['targets'][:, :-1])
  with pytest.raises(CompiledStepError, match=r"batch\['targets'\] has shape \(8, 23\) here, "
                                              r'\(8, 24\) in the step'):
    step(state, rest, wrong)
  unpositioned = {key: value for key, value in batch.items() if key != 'inputs_positions'}
  with pytest.raises(CompiledStepError, match=r"batch\['inputs_positions'\] is missing here"):
    step(state, rest, unpositioned)
  old_step = state['step']
  state, sums = step(state, rest, batch)
  assert old_step.is_deleted()  # donated, as by the jitted step
  assert int(state['step']) == 1 and np.isfinite(float(sums['loss']))
  assert float(sums['tokens']) == rows * length


def test_a_step_for_another_config_is_refused_naming_the_field(saved_step, tmp_path):
  bigger = run_config()
  bigger.model.d_model = 64
  assert 'model.d_model=32 there, 64 here' in refusal(saved_step, bigger)
  smoothing = run_config()
  smoothing.optim.label_smoothing = 0.0  # same shapes, another program
  assert 'optim.label_smoothing=0.1 there, 0.0 here' in refusal(saved_step, smoothing)
  # Fields that only steer the loop or choose the data are not part of the program.
  loop_only = run_config('/elsewhere.tsv', eval_batch_size=32, prefetch_to_device=0)
  loop_only.num_train_steps, loop_only.log_every_steps = 500, 7  # rsqrt: steps not read
  mesh = setup.plan(loop_only)[0]
  assert executables.load(saved_step, config=loop_only, mesh=mesh).path == saved_step
  fitted = run_config(fit_batch_to_memory=True)
  with pytest.raises(CompiledStepError, match='cannot go with config.data.fit_batch_to_memory'):
    setup.build(fitted, str(tmp_path), *setup.plan(fitted), compiled_step=saved_step)


@pytest.mark.slow
def test_the_training_run_refuses_another_batch_size_with_one_line_exit_2(
    saved_step, small_corpus, tmp_path):
  result = run_main('--config=tests/tiny_config.py', f'--workdir={tmp_path}',
                    f'--compiled_step={saved_step}', '--config.data.batch_size=16',
                    corpus=small_corpus)
  assert result.returncode == 2, result.stderr[-3000:]
  assert last_error(result.stderr).startswith(
      f'error: {saved_step} was compiled for another config: data.batch_size=8 there, 16 '
      f'here')
  assert 'Traceback' not in result.stderr


def test_a_step_for_other_devices_is_refused(saved_step):
  config = run_config()
  fewer, _ = sharding.plan_mesh(config, jax.devices()[:4])
  assert ('was compiled for 8 cpu devices in 1 process, mesh data=8 x fsdp=1 x tensor=1; '
          'this job has 4 cpu devices in 1 process, mesh data=4') in refusal(
              saved_step, config, fewer)
  config.mesh.data, config.mesh.fsdp = 4, 2
  assert 'this job has 8 cpu devices in 1 process, mesh data=4 x fsdp=2' in refusal(
      saved_step, config)
  reversed_mesh = sharding.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1},
                                     jax.devices()[::-1])
  assert 'place 0 (in mesh order) holds device id 0 there, 7 here' in refusal(
      saved_step, run_config(), reversed_mesh)


def test_a_step_from_other_versions_or_code_is_refused(saved_step, tmp_path):
  def old_jaxlib(metadata):
    metadata['versions']['jaxlib'] = '0.4.1'
  message = refusal(rewritten(saved_step, tmp_path / 'jaxlib.bin', old_jaxlib))
  assert f'was compiled with jaxlib 0.4.1, this job has jaxlib {jax.__version__}' in message

  def other_layers(metadata):
    metadata['sources']['jaxnmt/model/layers.py'] = '0' * 16
  assert 'from other jaxnmt code (jaxnmt/model/layers.py differs)' in refusal(
      rewritten(saved_step, tmp_path / 'code.bin', other_layers))


def test_a_missing_or_corrupt_file_is_refused_with_one_line(saved_step, tmp_path):
  assert 'no compiled train step at' in refusal(str(tmp_path / 'absent.bin'))
  data = open(saved_step, 'rb').read()
  flipped = tmp_path / 'flipped.bin'
  flipped.write_bytes(data[:-1000] + bytes([data[-1000] ^ 1]) + data[-999:])
  assert 'is corrupt' in refusal(str(flipped))
  cut = tmp_path / 'cut.bin'
  cut.write_bytes(data[:len(data) // 2])
  assert 'is corrupt' in refusal(str(cut))
  other = tmp_path / 'config.json'
  other.write_text('{"model": {}}')
  assert 'is not a compiled train step written by jaxnmt' in refusal(str(other))
