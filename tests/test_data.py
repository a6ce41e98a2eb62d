"""Corpus readers, bad input, the one-time preparation, and the global-order stream."""

import gzip
import json
import os
import zipfile

import numpy as np
import pytest

from jaxnmt import errors
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.data import corpus
from jaxnmt.data import eval_batches
from jaxnmt.data import pipeline
from jaxnmt.data import records as records_lib
from jaxnmt.data import order as order_lib
from jaxnmt.data import prepare
from tests.tiny_config import tiny_config


def write_lines(path, lines: list[bytes]) -> str:
  path.write_bytes(b'\n'.join(lines) + b'\n')
  return str(path)


# ----------------------------------------------------------------------------- reading


def test_malformed_lines_are_skipped_and_counted(tmp_path):
  path = write_lines(tmp_path / 'pairs.tsv', [
      b'Hello.\tHola.',
      b'no tab here',
      b'\tempty source',
      b'empty target\t   ',
      b'bad bytes \xff\xfe\tmal',
      b'',
      b'nul \x00 byte\tx',
      b'Go.\tVe.\tCC-BY 2.0 (France) Attribution: tatoeba.org',
  ])
  pairs, report = corpus.read_pairs(path)
  assert pairs == [('Hello.', 'Hola.'), ('Go.', 'Ve.')]
  assert report.malformed == {'no tab': 1, 'empty side': 2, 'not UTF-8': 1, 'blank line': 1,
                              'NUL byte (binary data)': 1}
  assert report.first_malformed_line == 2 and report.lines == 8


def test_every_format_gives_the_same_pairs(tmp_path):
  lines = ['Go.\tVe.', 'Hi.\tHola.', 'I ran.\tCorrí.']
  text = '\n'.join(lines) + '\n'
  expected = [tuple(line.split('\t')) for line in lines]
  (tmp_path / 'plain.tsv').write_text(text, encoding='utf-8')
  with gzip.open(tmp_path / 'pairs.tsv.gz', 'wt', encoding='utf-8') as handle:
    handle.write(text)
  import zstandard  # pylint: disable=g-import-not-at-top
  (tmp_path / 'pairs.tsv.zst').write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
  with zipfile.ZipFile(tmp_path / 'spa-eng.zip', 'w') as archive:
    archive.writestr('spa-eng/_about.txt', 'about the data')
    archive.writestr('spa-eng/spa.txt', text)
  (tmp_path / 'train.en').write_text(''.join(s + '\n' for s, _ in expected), encoding='utf-8')
  with gzip.open(tmp_path / 'train.es.gz', 'wt', encoding='utf-8') as handle:
    handle.write(''.join(t + '\n' for _, t in expected))
  for spec in ('plain.tsv', 'pairs.tsv.gz', 'pairs.tsv.zst', 'spa-eng.zip', 'train'):
    assert corpus.read_pairs(str(tmp_path / spec))[0] == expected, spec
  # The other direction from the same files is one flag.
  assert corpus.read_pairs(str(tmp_path / 'train'), reverse=True)[0] == [
      (t, s) for s, t in expected]


@pytest.mark.parametrize('make, message', [
    (lambda d: write_lines(d / 'bad.tsv', [b'just text', b'\t']),
     r'bad.tsv: no valid sentence pair in 2 lines \(1 no tab, 1 blank line\)'),
    (lambda d: (d / 'empty.tsv').write_bytes(b'') and None or str(d / 'empty.tsv'),
     r'empty.tsv: empty file'),
    (lambda d: (d / 'image.tsv').write_bytes(bytes(range(256)) * 40) and None or
     str(d / 'image.tsv'), r'image.tsv: no valid sentence pair .*NUL byte'),
    (lambda d: (d / 'cut.tsv.gz').write_bytes(gzip.compress(b''.join(
        b'sentence %d\tfrase %d\n' % (i, i) for i in range(5000)))[:5000]) and None or
     str(d / 'cut.tsv.gz'),
     r'cut.tsv.gz: unreadable after \d+ lines: the file is cut short or corrupt'),
    (lambda d: _zip_without_text(d / 'no-text.zip'),
     r'no-text.zip: zip archive holds no .txt or .tsv file'),
    (lambda d: str(d / 'missing.tsv'), r'missing.tsv: no such file \(nor a file pair'),
    (lambda d: _misaligned_pair(d), r'train.es has fewer lines than .*train.en \(2\)'),
])
def test_bad_input_is_one_clear_error_naming_the_file(tmp_path, make, message):
  with pytest.raises(errors.DataError, match=message):
    corpus.read_pairs(make(tmp_path))


def _zip_without_text(path) -> str:
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('image.png', b'\x89PNG')
  return str(path)


def _misaligned_pair(directory) -> str:
  (directory / 'train.en').write_text('a\nb\nc\n', encoding='utf-8')
  (directory / 'train.es').write_text('x\ny\n', encoding='utf-8')
  return str(directory / 'train')


def test_resolve_path(tmp_path, monkeypatch):
  monkeypatch.setenv(corpus.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(errors.DataError, match='holds no spa-eng.zip'):
    corpus.resolve_path('', 'http://unused')
  (tmp_path / 'spa-eng.zip').write_bytes(b'x')
  assert corpus.resolve_path('', 'http://unused') == str(tmp_path / 'spa-eng.zip')


def test_split_is_by_source_sentence_deterministic_and_near_the_fractions():
  sources = [f'source {i}' for i in range(20_000)]
  splits = [corpus.assign_split(s, 0.1, 0.05, seed=7) for s in sources]
  assert splits == [corpus.assign_split(s, 0.1, 0.05, seed=7) for s in sources]
  assert splits != [corpus.assign_split(s, 0.1, 0.05, seed=8) for s in sources]
  counts = {name: splits.count(name) / len(sources) for name in ('valid', 'test')}
  assert abs(counts['valid'] - 0.1) < 0.01 and abs(counts['test'] - 0.05) < 0.01


def test_reservoir_keeps_a_bounded_uniform_sample():
  reservoir = prepare._Reservoir(capacity=100, seed=0)  # pylint: disable=protected-access
  for item in range(10_000):
    reservoir.add(item)
  assert len(reservoir.items) == 100 and len(set(reservoir.items)) == 100
  # Uniform over the stream: not just its start (a head sample would be all < 100).
  assert 3_000 < np.mean(reservoir.items) < 7_000


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, small_corpus):
  """A prepared copy of small_corpus (3,000 pairs) with 2 bad lines and a test set."""
  root = tmp_path_factory.mktemp('prepared')
  lines = open(small_corpus, encoding='utf-8').read().splitlines()
  (root / 'corpus.tsv').write_text('\n'.join(lines[:1500] + ['no tab', ''] + lines[1500:]),
                                   encoding='utf-8')
  (root / 'news.tsv').write_text('\n'.join(lines[:20]) + '\n', encoding='utf-8')
  config = tiny_config(str(root / 'corpus.tsv'))
  config.data.test_sets = f'news={root / "news.tsv"}'
  config.data.pairs_per_shard = 700
  workdir = str(root / 'workdir')
  manifest = prepare.prepare(config, workdir, progress=False)
  return config, workdir, manifest


def test_prepare_counts_every_line_and_writes_readable_shards(prepared):
  config, workdir, manifest = prepared
  directory = prepare.prepared_dir(config, workdir)
  (entry,) = manifest['corpora']
  assert entry['lines'] == 3002 and entry['malformed'] == {'no tab': 1, 'blank line': 1}
  # The news sources are kept out of training; every other line is somewhere.
  splits = manifest['splits']
  assert splits['test_news'] == 20
  held_out = splits['valid'] + splits['test']
  assert entry['pairs'] + held_out + sum(entry['filtered'].values()) == 3000
  assert entry['filtered']['source in a test set'] >= 20
  assert 0 < held_out < 300
  # Training pairs are dealt round robin over 16 shards (of at most 700 pairs).
  assert len(entry['shards']) == prepare.SPREAD
  assert max(s['pairs'] for s in entry['shards']) <= 700
  tokenizer = tokenizer_lib.load(os.path.join(directory, 'tokenizer.model'), 'unigram')
  assert manifest['tokenizer_sha256'] == corpus.file_sha256(
      os.path.join(directory, 'tokenizer.model'))
  (source,) = prepare.open_corpora(manifest, directory)
  assert len(source) == entry['pairs']
  source_ids, target_ids = records_lib.decode_record(source.__getitems__([0])[0],
                                                  np.dtype(manifest['record_dtype']))
  text = tokenizer.decode(source_ids.tolist())
  assert text and tokenizer.decode(target_ids.tolist())
  assert entry['source_tokens'] > entry['pairs']
  assert entry['files'][0]['sha256'] == corpus.file_sha256(entry['spec'])
  assert not os.path.exists(os.path.join(directory, 'raw'))  # scratch removed


def test_prepare_resumes_after_a_crash_without_redoing_finished_shards(tmp_path,
                                                                       small_corpus):
  config = tiny_config(small_corpus)
  config.data.pairs_per_shard = 1000
  workdir = str(tmp_path / 'run')
  first = prepare.prepare(config, workdir, progress=False)
  directory = prepare.prepared_dir(config, workdir)
  shards = [s['file'] for s in first['corpora'][0]['shards']]
  # A crash before the manifest, with the last shard half-written: its .partial file
  # is all that is left of it, and the raw stage is done.
  os.remove(os.path.join(directory, prepare.MANIFEST))
  os.makedirs(os.path.join(directory, 'raw'))
  prepare._split_stage(config, directory, [small_corpus], ['pairs'], False)  # pylint: disable=protected-access
  os.rename(os.path.join(directory, shards[-1]), os.path.join(directory, shards[-1] + '.partial'))
  os.remove(os.path.join(directory, shards[-1] + '.json'))
  kept = {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in shards[:-1]}
  again = prepare.prepare(config, workdir, progress=False)
  assert again['corpora'][0]['pairs'] == first['corpora'][0]['pairs']
  assert prepare.fingerprint(again) == prepare.fingerprint(first)
  assert kept == {name: os.stat(os.path.join(directory, name)).st_mtime_ns
                  for name in shards[:-1]}
  assert not [n for n in os.listdir(directory) if n.endswith('.partial')]


def test_prepared_data_is_reused_only_with_the_same_data_settings(prepared):
  config, workdir, manifest = prepared
  assert prepare.prepare(config, workdir, progress=False) == manifest
  changed = tiny_config(config.data.path)
  changed.data.test_sets = config.data.test_sets
  changed.data.pairs_per_shard = config.data.pairs_per_shard
  changed.data.filter_max_tokens = 10
  with pytest.raises(errors.DataError, match=r'prepared with other data settings: '
                     r'filter_max_tokens=250 \(config: 10\)'):
    prepare.prepare(changed, workdir, progress=False)


def test_filters_and_duplicates_are_counted(tmp_path):
  lines = ['Go.\tVe.'] * 5 + ['Hi.\tHola.'] + ['Hey.\tuna frase muy larga de verdad'] + [
      'A long one.\t' + ' '.join(['una frase muy larga de verdad'] * 10)] + [
      f'sentence {i}.\tfrase {i}.' for i in range(300)]
  (tmp_path / 'c.tsv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  config = tiny_config(str(tmp_path / 'c.tsv'))
  config.data.valid_fraction = config.data.test_fraction = 0.0
  config.data.dedup = True
  config.data.filter_max_length_ratio = 3.0
  config.data.filter_max_tokens = 250
  config.tokenizer.model_type = 'char'  # lengths in characters
  manifest = prepare.prepare(config, str(tmp_path / 'w'), progress=False)
  (entry,) = manifest['corpora']
  assert entry['filtered'] == {'duplicate': 4,
                               'length ratio above filter_max_length_ratio': 1,
                               'longer than filter_max_tokens': 1}
  assert entry['pairs'] == 302


# ----------------------------------------------------------------------------- the stream


def test_permute_is_a_bijection_that_changes_with_the_key():
  for size in (1, 2, 3, 7, 100, 1000, 4097):
    for key in (0, 12345):
      out = order_lib.permute(np.arange(size), size, np.full(size, key, np.uint64))
      assert sorted(out.tolist()) == list(range(size))
  a = order_lib.permute(np.arange(1000), 1000, np.full(1000, 1, np.uint64))
  b = order_lib.permute(np.arange(1000), 1000, np.full(1000, 2, np.uint64))
  assert (a != b).mean() > 0.9


def test_global_order_holds_the_mixture_and_every_epoch_covers_each_corpus():
  block = records_lib.BLOCK_PAIRS
  # Two corpora: 1,000 pairs (16 blocks, the last one short) and 100 pairs (2 blocks).
  order = order_lib.GlobalOrder([1000, 100], [0.9, 0.1], seed=3, batch_size=4)
  positions = np.arange(4 * block * 1024)
  corpus_of, record = order.locate(positions)
  shares = np.bincount(corpus_of) / len(corpus_of)
  np.testing.assert_allclose(shares, [0.9, 0.1], atol=0.01)
  # Row r reads block draws r, r + 4, ...: group positions by draw and check that each
  # run of a corpus's draws covers that corpus once (a new order every epoch).
  row, k = positions % 4, positions // 4
  draw = row + 4 * (k // block)
  for c, size in ((0, 1000), (1, 100)):
    draws = np.unique(draw[corpus_of == c])
    epochs = []
    for first in range(0, len(draws) - len(draws) % (16 if c == 0 else 2),
                       16 if c == 0 else 2):
      chosen = np.isin(draw, draws[first:first + (16 if c == 0 else 2)])
      records = record[chosen & (record >= 0)]
      assert sorted(records.tolist()) == list(range(size)), (c, first)
      epochs.append(tuple(records))
    assert len(set(epochs)) == len(epochs) > 3
  # Consecutive pairs of a row come from one block of consecutive records.
  row_zero = record[(row == 0) & (record >= 0)][:block]
  assert row_zero.max() - row_zero.min() < block
  # Deterministic: the same positions give the same records.
  again = order_lib.GlobalOrder([1000, 100], [0.9, 0.1], seed=3, batch_size=4).locate(
      np.arange(100, 200))
  np.testing.assert_array_equal(again[1], record[100:200])


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


def test_eval_batches_pad_the_last_batch(small_corpus):
  tokenizer = tokenizer_lib.CharTokenizer.__new__(tokenizer_lib.CharTokenizer)
  tokenizer.characters, tokenizer._ids = ['H', 'o'], {'H': 4, 'o': 5}  # pylint: disable=protected-access
  batches = list(eval_batches.make_eval_batches([('Ho', 'oH')] * 5, tokenizer, batch_size=4,
                                            max_source_length=16, max_target_length=16))
  assert len(batches) == 2
  assert (batches[1]['targets_segment_ids'][1:] == 0).all()
  assert (batches[1]['targets_segment_ids'][0] > 0).any()


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


def test_prepare_command_on_bad_input_exits_2_and_leaves_nothing(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (tmp_path / 'cut.tsv.gz').write_bytes(gzip.compress(b''.join(
      b'sentence %d\tfrase %d\n' % (i, i) for i in range(5000)))[:5000])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'jaxnmt.main', '--mode=prepare', '--config=tests/tiny_config.py',
       f'--workdir={tmp_path / "w"}'], cwd=root, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAXNMT_TEST_CORPUS': str(tmp_path / 'cut.tsv.gz'),
           'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'cut.tsv.gz: unreadable after' in last, last
  assert not os.path.exists(tmp_path / 'w' / 'data')


def test_held_out_splits_are_capped_and_never_trained_on(tmp_path):
  (tmp_path / 'c.tsv').write_text(''.join(f'sentence {i}.\tfrase {i}.\n' for i in range(600)),
                                  encoding='utf-8')
  config = tiny_config(str(tmp_path / 'c.tsv'))
  config.tokenizer.model_type = 'char'
  config.data.valid_fraction, config.data.test_fraction = 0.3, 0.1
  config.data.max_heldout_pairs = 25
  manifest = prepare.prepare(config, str(tmp_path / 'w'), progress=False)
  splits, pairs = manifest['splits'], manifest['corpora'][0]['pairs']
  assert splits['valid'] == splits['test'] == 25
  assert pairs + 50 + splits['valid_beyond_max_heldout_pairs'] + \
      splits['test_beyond_max_heldout_pairs'] == 600
  assert 0.5 < pairs / 600 < 0.7
  valid = open(tmp_path / 'w' / 'data' / 'splits' / 'valid.src').read().splitlines()
  assert len(valid) == 25


def test_prepare_can_take_an_existing_tokenizer(prepared, tmp_path):
  config, workdir, manifest = prepared
  existing = os.path.join(prepare.prepared_dir(config, workdir), 'tokenizer.model')
  other = tiny_config(config.data.path)
  other.tokenizer.path = existing
  again = prepare.prepare(other, str(tmp_path / 'w'), progress=False)
  assert again['tokenizer_sha256'] == manifest['tokenizer_sha256']
  assert again['corpora'][0]['source_tokens'] > 0


def test_a_sorted_corpus_gives_blocks_that_sample_all_of_it(tmp_path):
  # spa.txt is sorted by length; a block of consecutive records must not be.
  lines = [f'{"a" * (1 + i // 40)}\t{"b" * (1 + i // 40)}' for i in range(2000)]
  (tmp_path / 'sorted.tsv').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  config = tiny_config(str(tmp_path / 'sorted.tsv'))
  config.tokenizer.model_type = 'char'
  config.data.valid_fraction = config.data.test_fraction = 0.0
  directory = str(tmp_path / 'w' / 'data')
  manifest = prepare.prepare(config, str(tmp_path / 'w'), progress=False)
  (source,) = prepare.open_corpora(manifest, directory)
  block = [len(records_lib.decode_record(record, np.dtype(manifest['record_dtype']))[0])
           for record in source.__getitems__(list(range(records_lib.BLOCK_PAIRS)))]
  assert max(block) - min(block) > 25  # lengths run from 1 to 50 over the corpus
