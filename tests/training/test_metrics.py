"""training/metrics: a run resumed from checkpoint step S leaves no step twice in its
logs: metrics.jsonl loses the killed run's records after S, and TensorBoard is told to
hide its events."""

import json
import os
import struct

from tensorboardX.proto import event_pb2

from jaxnmt.training import metrics
from jaxnmt.training import loop
from jaxnmt.runtime import files


def _events(directory: str) -> list[event_pb2.Event]:
  """Every event of every event file in `directory`, in the order TensorBoard reads
  them (files by name; TFRecord framing: length, its CRC, data, its CRC)."""
  events = []
  for name in sorted(os.listdir(directory)):
    if 'tfevents' not in name:
      continue
    with open(os.path.join(directory, name), 'rb') as handle:
      data = handle.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def _tensorboard_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
  """The scalars TensorBoard shows: a restart marker (SessionLog START at step P)
  discards what was read before at steps >= P, as its EventAccumulator does."""
  scalars = {}
  for event in _events(directory):
    if event.HasField('session_log') and event.session_log.status == \
        event_pb2.SessionLog.START:
      scalars = {tag: [(step, value) for step, value in points if step < event.step]
                 for tag, points in scalars.items()}
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _jsonl(workdir: str, name: str) -> list[dict]:
  return metrics.read_jsonl(os.path.join(workdir, name, files.METRICS))


def test_a_resumed_writer_leaves_no_step_twice(tmp_path):
  workdir = str(tmp_path)
  killed = metrics.Writer(workdir, 'train')
  for step in range(1, 9):
    killed.scalars(step, {'loss': float(step)})
  killed.close()
  with open(os.path.join(workdir, 'train', files.METRICS), 'a') as handle:
    handle.write('{"step": 9, "lo')  # killed mid-line
  resumed = metrics.Writer(workdir, 'train', purge_step=6)  # from checkpoint step 5
  for step in range(6, 11):
    resumed.scalars(step, {'loss': 100.0 + step})
  resumed.close()

  expected = [(step, float(step)) for step in range(1, 6)] + [
      (step, 100.0 + step) for step in range(6, 11)]
  assert [(r['step'], r['loss']) for r in _jsonl(workdir, 'train')] == expected
  # Both event files are kept (the second was opened within the same second), the
  # second carries the restart marker, and TensorBoard shows each step once.
  directory = os.path.join(workdir, 'train')
  assert len([name for name in os.listdir(directory) if 'tfevents' in name]) == 2
  starts = [e.step for e in _events(directory) if e.HasField('session_log')]
  assert starts == [6]
  assert _tensorboard_scalars(directory) == {'loss': expected}


def test_without_a_purge_step_nothing_is_dropped(tmp_path):
  workdir = str(tmp_path)
  for values in ({10: 1.0, 20: 2.0}, {10: 3.0}):
    writer = metrics.Writer(workdir, 'eval')
    for step, value in values.items():
      writer.scalars(step, {'bleu': value})
    writer.close()
  assert [(r['step'], r['bleu']) for r in _jsonl(workdir, 'eval')] == [
      (10, 1.0), (20, 2.0), (10, 3.0)]
  assert not any(e.HasField('session_log') for e in _events(os.path.join(workdir, 'eval')))


def test_the_trainer_log_purges_what_came_after_its_resume_step(tmp_path):
  workdir = str(tmp_path)
  for name in (files.TRAIN_LOGS, files.VALID_LOGS):
    os.makedirs(os.path.join(workdir, name))
    with open(os.path.join(workdir, name, files.METRICS), 'w') as handle:
      handle.writelines(json.dumps({'step': step, 'loss': 1.0}) + '\n'
                        for step in (5, 10, 15))
  # pylint: disable-next=protected-access
  with loop._Log(workdir, lambda step: 0.0, total=20, start=10):
    pass
  for name in (files.TRAIN_LOGS, files.VALID_LOGS):
    assert [r['step'] for r in _jsonl(workdir, name)] == [5, 10]
    assert [e.step for e in _events(os.path.join(workdir, name))
            if e.HasField('session_log')] == [11]
