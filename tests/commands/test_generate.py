"""`--mode=generate` (commands/generate) on a character LM trained and evaluated
through `python -m jaxnmt.main` on Tiny Shakespeare."""

import pytest

from tests.helpers import SHAKESPEARE, run_main


@pytest.mark.slow
def test_char_lm_trains_evaluates_and_generates(tmp_path):
  workdir = f'--workdir={tmp_path / "lm"}'
  trained = run_main(
      workdir, '--config=configs/lm_char.py', f'--config.data.path={SHAKESPEARE}',
      '--config.num_train_steps=30', '--config.model.num_decoder_layers=1',
      '--config.model.d_model=32', '--config.model.d_ff=64',
      '--config.data.max_target_length=32', '--config.data.batch_size=8',
      '--config.data.eval_batch_size=64', '--config.eval_every_steps=30',
      '--config.checkpoint_every_steps=30', '--config.mesh.tensor=2', devices=2,
      timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'validation loss' in trained.stderr
  generated = run_main(workdir, '--mode=generate', '--prompt=ROMEO:', '--num_tokens=45',
                       '--top_k=5', '--num_samples=2', devices=2)
  assert generated.returncode == 0, generated.stderr[-3000:]
  assert generated.stdout.startswith('ROMEO:') and generated.stdout.count('ROMEO:') == 2
  evaluated = run_main(workdir, '--mode=eval', devices=2)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'bits_per_char' in evaluated.stderr
