"""data/pipeline: packed training batches (masks, shifted targets, packing density),
the same global batches on any number of processes, exact resume across process counts,
worker processes, and a mixture drawn at its weights."""

import json

import numpy as np
import pytest

from jaxnmt import errors
from jaxnmt.data import order as order_lib
from jaxnmt.data import pipeline
from jaxnmt.data import prepare
from jaxnmt.data import records as records_lib
from jaxnmt.data import tokenizer as tokenizer_lib
from tests.helpers import real_stream
from tests.tiny_config import tiny_config


def _records(count: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [records_lib.encode_record(list(range(10, 10 + rng.integers(1, 20))),
                                 list(range(100, 100 + rng.integers(1, 20))), np.uint16)
          for _ in range(count)]


def _stream(records, **overrides):
  kwargs = dict(batch_size=8, max_source_length=32, max_target_length=32, seed=0)
  kwargs.update(overrides)
  return pipeline.TrainStream([records_lib.InMemorySource(records)], np.uint16, **kwargs)


def _global_batches(records, process_count: int, count: int, **overrides):
  iterators = [iter(_stream(records, process_index=p, process_count=process_count,
                            **overrides)) for p in range(process_count)]
  batches, placed = [], []
  for _ in range(count):
    parts = [next(iterator) for iterator in iterators]
    batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    placed += [g for iterator in iterators for row in iterator.last_positions for g in row]
  return batches, placed, iterators


def test_packed_batches_have_consistent_masks_and_shifted_targets():
  batches, _, _ = _global_batches(_records(500), 1, 10)
  for b in batches:
    for side, key in (('inputs', 'inputs'), ('targets', 'targets'),
                      ('targets', 'decoder_inputs')):
      assert ((b[key] != 0) == (b[f'{side}_segment_ids'] != 0)).all()
    for row in range(8):
      for segment in set(b['targets_segment_ids'][row]) - {0}:
        where = b['targets_segment_ids'][row] == segment
        decoder_inputs, targets = b['decoder_inputs'][row][where], b['targets'][row][where]
        assert decoder_inputs[0] == tokenizer_lib.BOS_ID
        assert targets[-1] == tokenizer_lib.EOS_ID
        assert (decoder_inputs[1:] == targets[:-1]).all()
        assert (b['targets_positions'][row][where] == np.arange(where.sum())).all()
        source = b['inputs'][row][b['inputs_segment_ids'][row] == segment]
        assert source[-1] == tokenizer_lib.EOS_ID and source[0] == 10
  assert np.mean([pipeline.real_token_fraction(b) for b in batches]) > 0.8
  assert np.mean([b['inputs_segment_ids'].max(axis=1).mean() for b in batches]) > 1.5


def test_global_batches_do_not_depend_on_the_process_count():
  records = _records(400)
  reference, placed, (iterator,) = _global_batches(records, 1, 30)
  for process_count in (2, 4):
    batches, placed_here, _ = _global_batches(records, process_count, 30)
    for want, got in zip(reference, batches):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert sorted(placed_here) == sorted(placed)
  # No pair is seen twice or skipped: the positions each row has taken from its
  # sub-stream are exactly those placed plus those it still carries.
  assert len(placed) == len(set(placed))
  taken, carried = set(), set()
  for row, (next_index, carry) in iterator.get_state()['rows'].items():
    taken |= {int(row) + 8 * k for k in range(next_index)}
    carried |= set(carry)
  _, records = order_lib.GlobalOrder([400], [1.0], seed=0, batch_size=8).locate(
      np.asarray(sorted(taken)))
  empty = {g for g, record in zip(sorted(taken), records) if record < 0}  # short block
  assert taken == set(placed) | carried | empty and not set(placed) & carried


def test_resume_continues_exactly_on_another_process_count():
  records = _records(300)
  reference, _, _ = _global_batches(records, 1, 12)
  _, _, iterators = _global_batches(records, 2, 5)
  position = pipeline.merge_states([iterator.get_state() for iterator in iterators])
  json.dumps(position)  # stored in checkpoints as JSON
  for process_count in (1, 4):
    resumed = [iter(_stream(records, process_index=p, process_count=process_count))
               for p in range(process_count)]
    for iterator in resumed:
      iterator.set_state(position)
    for want in reference[5:]:
      parts = [next(iterator) for iterator in resumed]
      got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(errors.DataError, match='batches of 8 rows, this run uses 16'):
    iter(_stream(records, batch_size=16)).set_state(position)


def test_worker_processes_give_the_same_batches_and_state():
  records = _records(300)
  plain = iter(_stream(records))
  workers = iter(_stream(records, num_workers=2))
  try:
    for _ in range(6):
      want, got = next(plain), next(workers)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert workers.get_state() == plain.get_state()
    workers.set_state(plain.get_state())
    want, got = next(plain), next(workers)
    np.testing.assert_array_equal(got['targets'], want['targets'])
  finally:
    workers.close()


def test_packing_fills_most_slots_and_padding_does_not(pairs_tokenizer):
  fractions = {}
  for packing in (True, False):
    iterator = iter(real_stream(pairs_tokenizer, packing))
    fractions[packing] = np.mean([pipeline.real_token_fraction(next(iterator))
                                  for _ in range(5)])
    iterator.close()
  assert fractions[True] >= 0.85
  assert fractions[False] < 0.6 * fractions[True]


def test_a_mixture_draws_each_corpus_at_its_weight(tmp_path, small_corpus):
  lines = open(small_corpus, encoding='utf-8').read().splitlines()
  (tmp_path / 'big.tsv').write_text('\n'.join(lines[:2000]) + '\n', encoding='utf-8')
  (tmp_path / 'clean.tsv').write_text('\n'.join(lines[2000:2400]) + '\n', encoding='utf-8')
  config = tiny_config(f'{tmp_path / "big.tsv"},{tmp_path / "clean.tsv"}')
  config.data.weights = '0.5,0.5'
  directory = str(tmp_path / 'w' / 'data')
  manifest = prepare.prepare(config, str(tmp_path / 'w'), progress=False)
  assert [c['name'] for c in manifest['corpora']] == ['big', 'clean']
  sizes = [c['pairs'] for c in manifest['corpora']]
  stream = pipeline.TrainStream(prepare.open_corpora(manifest, directory),
                                manifest['record_dtype'], batch_size=8, max_source_length=24,
                                max_target_length=24, seed=0, weights=[0.5, 0.5])
  iterator = iter(stream)
  placed = []
  for _ in range(200):
    next(iterator)
    placed += [g for row in iterator.last_positions for g in row]
  order = order_lib.GlobalOrder(sizes, [0.5, 0.5], seed=0, batch_size=8)
  corpus_of, _ = order.locate(np.asarray(placed))
  # The clean corpus is a sixth of the pairs but half of what training reads.
  assert sizes[1] < sizes[0] / 3
  assert abs(np.mean(corpus_of == 1) - 0.5) < 0.1
