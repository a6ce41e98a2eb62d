"""Corpus reading, the leak-free split, and the Grain pipelines."""

import zipfile

import numpy as np
import pytest

from jaxnmt import data
from jaxnmt import errors
from jaxnmt import tokenizer as tokenizer_lib


def write_lines(path, lines: list[bytes]) -> str:
  path.write_bytes(b'\n'.join(lines) + b'\n')
  return str(path)


def test_malformed_lines_are_skipped_and_counted(tmp_path):
  path = write_lines(tmp_path / 'pairs.tsv', [
      b'Hello.\tHola.',
      b'no tab here',
      b'\tempty source',
      b'empty target\t   ',
      b'bad bytes \xff\xfe\tmal',
      b'',
      b'Go.\tVe.\tCC-BY 2.0 (France) Attribution: tatoeba.org',
  ])
  pairs, report = data.read_pairs(path)
  assert pairs == [('Hello.', 'Hola.'), ('Go.', 'Ve.')]
  assert report.malformed == {'no tab': 1, 'empty side': 2, 'not UTF-8': 1, 'blank line': 1}
  assert report.first_malformed_line == 2


def test_file_without_valid_pairs_is_a_clear_error(tmp_path):
  path = write_lines(tmp_path / 'bad.tsv', [b'just text', b'\t'])
  with pytest.raises(errors.DataError, match=r'bad.tsv: no valid `source<TAB>target` line'):
    data.read_pairs(path)


def test_reads_the_published_zip_and_plain_text(tmp_path):
  archive_path = tmp_path / 'spa-eng.zip'
  with zipfile.ZipFile(archive_path, 'w') as archive:
    archive.writestr('spa-eng/_about.txt', 'about the data')
    archive.writestr('spa-eng/spa.txt', 'Go.\tVe.\nHi.\tHola.\n')
  assert data.read_pairs(str(archive_path))[0] == [('Go.', 'Ve.'), ('Hi.', 'Hola.')]


def test_resolve_path(tmp_path, monkeypatch):
  with pytest.raises(errors.DataError, match='config.data.path: no such file'):
    data.resolve_path(str(tmp_path / 'missing.tsv'), 'http://unused')
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(errors.DataError, match='holds no spa-eng.zip'):
    data.resolve_path('', 'http://unused')
  (tmp_path / 'spa-eng.zip').write_bytes(b'x')
  assert data.resolve_path('', 'http://unused') == str(tmp_path / 'spa-eng.zip')


def test_split_keeps_all_translations_of_a_source_together():
  pairs = [(f'source {i}', f'target {i}.{j}') for i in range(200) for j in range(i % 4 + 1)]
  splits = data.split_pairs(pairs, valid_fraction=0.1, test_fraction=0.1, seed=7)
  sources = {name: {s for s, _ in getattr(splits, name)} for name in ('train', 'valid', 'test')}
  assert not sources['train'] & sources['test']
  assert not sources['train'] & sources['valid']
  assert not sources['valid'] & sources['test']
  assert len(sources['test']) == len(sources['valid']) == 20
  # Nothing lost or duplicated, and the split is deterministic but seed-dependent.
  assert sorted(splits.train + splits.valid + splits.test) == sorted(pairs)
  again = data.split_pairs(pairs, 0.1, 0.1, seed=7)
  assert again.test == splits.test and again.train == splits.train
  assert data.split_pairs(pairs, 0.1, 0.1, seed=8).test != splits.test
  # Shuffled: the input is ordered by source, the training split is not.
  assert [s for s, _ in splits.train] != sorted(s for s, _ in splits.train)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory, small_corpus):
  pairs, _ = data.read_pairs(small_corpus)
  path = str(tmp_path_factory.mktemp('tok') / 'spm.model')
  return tokenizer_lib.train([side for pair in pairs for side in pair], path, vocab_size=400)


def make_dataset(pairs, tokenizer, **overrides):
  kwargs = dict(batch_size=8, max_source_length=24, max_target_length=24,
                num_packing_bins=16, seed=0)
  kwargs.update(overrides)
  return data.make_train_dataset(pairs, tokenizer, **kwargs)


def test_packed_batches_shapes_masks_and_real_fraction(small_corpus, tokenizer):
  pairs, _ = data.read_pairs(small_corpus)
  iterator = iter(make_dataset(pairs, tokenizer, max_source_length=64, max_target_length=72,
                               num_packing_bins=32))
  batches = [next(iterator) for _ in range(10)]
  iterator.close()
  batch = batches[0]
  assert {k: v.shape for k, v in batch.items()} == {
      'inputs': (8, 64), 'inputs_segment_ids': (8, 64), 'inputs_positions': (8, 64),
      'decoder_inputs': (8, 72), 'targets': (8, 72), 'targets_segment_ids': (8, 72),
      'targets_positions': (8, 72)}
  for b in batches:
    for side, key in (('inputs', 'inputs'), ('targets', 'targets'),
                      ('targets', 'decoder_inputs')):
      segments = b[f'{side}_segment_ids']
      assert ((b[key] != 0) == (segments != 0)).all()  # pad exactly where segment 0
    # Each packed target: BOS starts the decoder input, EOS ends the target, and
    # decoder inputs are the targets shifted right by one.
    for row in range(8):
      for segment in set(b['targets_segment_ids'][row]) - {0}:
        where = b['targets_segment_ids'][row] == segment
        decoder_inputs, targets = b['decoder_inputs'][row][where], b['targets'][row][where]
        assert decoder_inputs[0] == tokenizer_lib.BOS_ID
        assert targets[-1] == tokenizer_lib.EOS_ID
        assert (decoder_inputs[1:] == targets[:-1]).all()
        assert (b['targets_positions'][row][where] == np.arange(where.sum())).all()
  fraction = np.mean([data.real_token_fraction(b) for b in batches])
  assert fraction >= 0.85, fraction
  # Rows hold several pairs: packing happened.
  assert np.mean([b['inputs_segment_ids'].max(axis=1).mean() for b in batches]) > 1.3


def test_iterator_state_restores_the_exact_position(small_corpus, tokenizer):
  pairs, _ = data.read_pairs(small_corpus)
  dataset = make_dataset(pairs, tokenizer)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = iter(dataset)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  iterator.close()
  resumed.close()


def test_process_shards_are_disjoint_and_cover_the_data(tokenizer):
  # Each source sentence is unique, so which pairs a shard reads is visible from its tokens.
  pairs = [(f'sentence number {i}', f'frase {i}') for i in range(64)]
  seen = []
  for process in range(2):
    iterator = iter(make_dataset(pairs, tokenizer, process_index=process, process_count=2,
                                 batch_size=4, num_packing_bins=4))
    rows = set()
    for _ in range(30):  # a few epochs of this shard
      batch = next(iterator)
      assert batch['inputs'].shape[0] == 2  # the per-process part of the global batch
      for row in range(2):
        for segment in set(batch['inputs_segment_ids'][row]) - {0}:
          tokens = batch['inputs'][row][batch['inputs_segment_ids'][row] == segment]
          rows.add(tokenizer.decode(tokens))
    iterator.close()
    seen.append(rows)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {source for source, _ in pairs}


def test_eval_batches_pad_the_last_batch(tokenizer):
  pairs = [('Hello.', 'Hola.')] * 5
  batches = list(data.make_eval_batches(pairs, tokenizer, batch_size=4,
                                        max_source_length=16, max_target_length=16))
  assert len(batches) == 2
  assert (batches[1]['targets_segment_ids'][1:] == 0).all()
  assert (batches[1]['targets_segment_ids'][0] > 0).any()
