"""training/samples: at each validation the trainer writes greedy translations of a few
validation sentences, with their sources, to TensorBoard's text tab."""

import glob
import os

from jaxnmt.runtime import files


def test_trainer_writes_greedy_validation_samples_to_tensorboard(ema_run):
  events = glob.glob(os.path.join(ema_run, 'valid', 'events.out.tfevents.*'))
  data = b''.join(open(path, 'rb').read() for path in events)
  first_source = files.read_lines(files.split_file(ema_run, 'valid.src'))[0]
  first_reference = files.read_lines(files.split_file(ema_run, 'valid.ref'))[0]
  assert b'samples' in data
  assert first_source.encode('utf-8') in data
  assert first_reference.encode('utf-8') in data
