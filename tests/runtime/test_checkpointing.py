"""runtime/checkpointing: a failed save keeps the complete checkpoints, an unreadable
latest checkpoint falls back to the one before (none readable is an error, not a fresh
start), checkpoints of another layout, model config or tokenizer are refused untouched,
and a sharded checkpoint restores onto one device."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxnmt import errors
from jaxnmt.decoding import inference
from jaxnmt.decoding import translation
from jaxnmt.runtime import checkpointing
from jaxnmt.training import loop
from tests import faults
from tests.helpers import committed_steps, last_error, run_main
from tests.tiny_config import tiny_config


def _train_on(workdir, corpus, steps: int):
  """`python -m jaxnmt.main` training the tiny config in `workdir` to `steps`."""
  return run_main(f'--workdir={workdir}', '--config=tests/tiny_config.py',
                  f'--config.num_train_steps={steps}', corpus=corpus)


def test_a_failed_save_is_a_clear_error_and_keeps_the_complete_checkpoints(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path))
  state = {'w': jax.numpy.arange(8.0)}
  checkpointer.save(1, state)
  checkpointer.wait()
  # The store breaks under the run (root ignores permissions, so: a file where the
  # checkpoint folder was; the complete checkpoint is kept aside meanwhile).
  folder = tmp_path / 'checkpoints'
  folder.rename(tmp_path / 'aside')
  folder.write_text('not a folder')
  with pytest.raises(checkpointing.SaveError, match='could not .*save.* checkpoint.*'
                     'untouched: rerun to resume'):
    checkpointer.save(2, state)
    checkpointer.wait()
  folder.unlink()
  (tmp_path / 'aside').rename(folder)
  reader = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  assert reader.all_steps() == [1]
  restored, _, _ = reader.restore(1, jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding),
      state))
  np.testing.assert_array_equal(restored['w'], state['w'])


def _flip_bytes(path) -> None:
  size = os.path.getsize(path)
  with open(path, 'r+b') as handle:
    handle.seek(size // 2)
    data = handle.read(4)
    handle.seek(size // 2)
    handle.write(bytes(byte ^ 0xFF for byte in data))


def _abstract(state):
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), state)


def test_checksums_are_recorded_and_a_flipped_byte_sets_the_step_aside(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), max_to_keep=None)
  state = {'w': jax.numpy.arange(1000.0), 'b': jax.numpy.ones((50, 50))}
  checkpointer.save(1, state)
  checkpointer.save(2, jax.tree.map(lambda x: x + 1, state))
  checkpointer.wait()
  base = tmp_path / 'checkpoints'
  for step in (1, 2):  # the step before the last recorded in the background
    record = json.loads((base / str(step) / 'checksums' / 'process_0.json').read_text())
    assert record['algorithm'] == 'crc32'
    assert any(name.startswith('state/ocdbt.process_0/d/') for name in record['files'])
  step, restored, _, _ = checkpointer.restore_latest(_abstract(state))
  assert step == 2 and restored['w'][1] == 2
  data = glob.glob(str(base / '2' / 'state' / 'ocdbt.process_0' / 'd' / '*'))
  _flip_bytes(max(data, key=os.path.getsize))  # same size: only the checksum tells
  step, restored, _, _ = checkpointer.restore_latest(_abstract(state))
  assert step == 1 and restored['w'][1] == 1
  assert len(glob.glob(str(base / 'unreadable-2-*'))) == 1
  checkpointer.close()


@pytest.mark.slow
def test_a_corrupt_array_file_read_by_one_process_only_is_set_aside_on_all(tmp_path,
                                                                              small_corpus):
  """2 processes x 1 device, the state split over both (mesh.fsdp=2): bytes flipped in
  one of process 1's array files of the newest step. Before Orbax's collective restore
  process 1 finds it, both agree, the step is set aside and the one before restored."""
  workdir, mesh = str(tmp_path / 'run'), ('--config.mesh.data=1', '--config.mesh.fsdp=2')
  faults.run(workdir, small_corpus, 2, 1, 20, *mesh)
  data = glob.glob(os.path.join(workdir, 'checkpoints', '20', 'state', 'ocdbt.process_1',
                                'd', '*'))
  _flip_bytes(max(data, key=os.path.getsize))
  stderr = faults.run(workdir, small_corpus, 2, 1, 30, *mesh)
  assert 'Resumed from checkpoint at step 10' in stderr, stderr[-3000:]
  assert glob.glob(os.path.join(workdir, 'checkpoints', 'unreadable-20-*'))
  log = open(f'{workdir}.logs/process_1.log', encoding='utf-8').read()
  assert 'ocdbt.process_1/d/' in log and 'is corrupt' in log
  assert committed_steps(workdir)[-1] == 30


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back(workdir_copy, small_corpus):
  latest = faults.corrupt_latest(workdir_copy)
  result = _train_on(workdir_copy, small_corpus, latest + 2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'could not be read' in result.stderr and 'falling back' in result.stderr
  assert f'Resumed from checkpoint at step {latest - 10}' in result.stderr
  assert glob.glob(os.path.join(workdir_copy, 'checkpoints', f'unreadable-{latest}-*'))
  assert latest + 2 in committed_steps(workdir_copy)


@pytest.mark.slow
def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(workdir_copy, small_corpus):
  for path in glob.glob(os.path.join(workdir_copy, 'checkpoints', '*', 'state', '**', '*'),
                        recursive=True):
    if os.path.isfile(path):
      open(path, 'wb').close()
  result = _train_on(workdir_copy, small_corpus, 40)
  assert result.returncode != 0
  assert 'could be read' in last_error(result.stderr)
  assert 'Traceback' not in result.stderr
  assert max(committed_steps(workdir_copy), default=0) <= 20  # nothing trained afresh


def _rewrite_metadata(workdir, change) -> None:
  for metadata_file in glob.glob(os.path.join(workdir, 'checkpoints', '*', 'metadata',
                                              'metadata')):
    with open(metadata_file, encoding='utf-8') as handle:
      metadata = json.load(handle)
    change(metadata)
    with open(metadata_file, 'w', encoding='utf-8') as handle:
      json.dump(metadata, handle)


def test_checkpoints_of_another_layout_are_refused_untouched(workdir_copy, small_corpus):
  _rewrite_metadata(workdir_copy, lambda metadata: metadata.pop('format'))  # as before
  with pytest.raises(errors.WorkdirError, match='have layout 1, this jaxnmt reads layout 2'):
    inference.load(workdir_copy)
  config = tiny_config(small_corpus)
  config.num_train_steps = 30
  with pytest.raises(errors.WorkdirError, match='have layout 1'):
    loop.train_and_evaluate(config, workdir_copy)
  assert sorted(os.listdir(os.path.join(workdir_copy, 'checkpoints'))) == ['10', '20']


def test_breaking_config_change_is_refused(workdir_copy, small_corpus):
  config = tiny_config(small_corpus)
  config.num_train_steps = 30
  config.model.d_model = 64
  with pytest.raises(errors.WorkdirError, match='model.d_model: 32 -> 64'):
    loop.train_and_evaluate(config, workdir_copy)
  assert committed_steps(workdir_copy) == [10, 20]


def test_a_checkpoint_of_another_tokenizer_is_refused(workdir_copy):
  _rewrite_metadata(workdir_copy, lambda metadata: metadata.update(tokenizer_sha256='0' * 64))
  with pytest.raises(errors.WorkdirError, match='is not the tokenizer the checkpoints'):
    inference.load(workdir_copy)


@pytest.mark.slow
def test_sharded_checkpoint_restores_on_one_device_and_translates(tmp_path, small_corpus):
  config = tiny_config(small_corpus)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.num_train_steps = config.checkpoint_every_steps = 10
  workdir = str(tmp_path / 'sharded')
  loop.train_and_evaluate(config, workdir)
  translator = translation.Translator.from_workdir(workdir)
  assert translator.step == config.num_train_steps
  leaf = jax.tree.leaves(translator.loaded.params)[0]
  assert len(leaf.sharding.device_set) == 1
  assert len(translator.translate(['Hello.', 'Thank you.'])) == 2
