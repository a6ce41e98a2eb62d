"""data/prepare: the one-time preparation of a workdir's data (counts, shards, the
tokenizer, held-out splits, filters, resume after a crash, reuse only under the same
settings), on a local prepared directory only."""

import os

import numpy as np
import pytest

from jaxnmt import errors
from jaxnmt.data import corpus
from jaxnmt.data import prepare
from jaxnmt.data import records as records_lib
from jaxnmt.data import tokenizer as tokenizer_lib
from tests.tiny_config import tiny_config


def test_reservoir_keeps_a_bounded_uniform_sample():
  reservoir = prepare._Reservoir(capacity=100, seed=0)  # pylint: disable=protected-access
  for item in range(10_000):
    reservoir.add(item)
  assert len(reservoir.items) == 100 and len(set(reservoir.items)) == 100
  # Uniform over the stream: not just its start (a head sample would be all < 100).
  assert 3_000 < np.mean(reservoir.items) < 7_000


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


def test_a_gcs_workdir_needs_a_local_prepared_dir():
  config = tiny_config('')
  with pytest.raises(errors.ConfigError, match='prepared_dir'):
    prepare.prepared_dir(config, 'gs://bucket/run')
  config.data.prepared_dir = 'gs://bucket/data'
  with pytest.raises(errors.ConfigError, match='must be a local path'):
    prepare.prepared_dir(config, 'gs://bucket/run')
  config.data.prepared_dir = '/local/data'
  assert prepare.prepared_dir(config, 'gs://bucket/run') == '/local/data'
  config.data.prepared_dir = ''
  assert prepare.prepared_dir(config, 'runs/tiny') == os.path.join('runs/tiny', 'data')
