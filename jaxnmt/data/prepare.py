"""`--mode=prepare`: corpora -> held-out splits, a tokenizer and ArrayRecord shards of
token ids, once. Training runs it itself when its workdir has no prepared data.

  1. split   stream every corpus once: skip malformed lines (counted by reason),
             optionally drop exact duplicates, send each pair to valid/test (decided by
             a hash of its source sentence) or to raw training shards, and keep a
             bounded random sample of sentences (reservoir sampling) for SentencePiece
  2. tokenizer  trained on that sample (or an existing one copied in)
  3. tokenize  every raw shard in a pool of worker processes (all cores), filter by
             length and length ratio, write `<corpus>-NNNNN.arrayrecord`
  4. manifest.json  shards, pair and token counts, tokenizer sha256, each input file's
             size and sha256, filters and what they dropped; written last

Nothing half-written is ever read: shards are written under temporary names and
renamed, and a rerun after a crash skips every finished shard (and a finished split
stage). Layout of the prepared directory (default WORKDIR/data):

  manifest.json  tokenizer.model  splits/{valid,test}.{src,ref}  splits/test_<name>.*
  <corpus>-00000.arrayrecord (+ .json: its counts)  ...
"""

import collections
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import time
import zlib

import numpy as np
import tqdm

from jaxnmt.runtime import files
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.data import corpus as corpus_lib
from jaxnmt.data import records as records_lib
from jaxnmt.data import tags as tags_lib
from jaxnmt.errors import ConfigError, DataError, UserError

MANIFEST = 'manifest.json'
TOKENIZER = 'tokenizer.model'
SPLITS = 'splits'
FORMAT = 1
_RAW = 'raw'  # stage-1 output, removed once the manifest is written
_SPLIT_DONE = 'split.json'
SPREAD = 16  # raw shards filled together (see _RawShards)


def prepared_dir(config, workdir: str) -> str:
  """Where the prepared corpus lies: config.data.prepared_dir, else WORKDIR/data. It
  must be local (ArrayRecord reads local files): with a gs:// workdir, each host
  prepares into, or holds a copy of, config.data.prepared_dir."""
  directory = config.data.prepared_dir
  if files.is_remote(workdir) and not directory:
    raise ConfigError(f'--workdir={workdir} is on Cloud Storage: set '
                      f'config.data.prepared_dir to a local folder on every host')
  if directory and '://' in directory:
    raise ConfigError(f'config.data.prepared_dir={directory} must be a local path '
                      f'(ArrayRecord shards are read from local files)')
  return directory or os.path.join(workdir, 'data')


def corpus_specs(config) -> list[str]:
  """The corpora of the config: data.path (comma-separated), else the default corpus."""
  specs = corpus_lib.split_list(config.data.path)
  return specs or [corpus_lib.resolve_path('', config.data.url, config.data.filename)]


def test_sets(config) -> dict[str, str]:
  """data.test_sets 'name=path,...' -> {name: path}."""
  sets = {}
  for item in corpus_lib.split_list(config.data.test_sets):
    name, _, spec = item.partition('=')
    sets[name.strip()] = spec.strip()
  return sets


def data_spec(config) -> dict:
  """The config fields that decide what prepared data holds: a prepared directory is
  reused only by a config with the same spec."""
  data = config.data
  return {
      'path': data.path, 'filename': data.filename if not data.path else '',
      'source_lang': data.source_lang, 'target_lang': data.target_lang,
      'reverse': data.reverse, 'valid_fraction': data.valid_fraction,
      'test_fraction': data.test_fraction, 'split_seed': data.split_seed,
      'max_heldout_pairs': data.max_heldout_pairs,
      'test_sets': data.test_sets, 'filter_max_tokens': data.filter_max_tokens,
      'filter_max_length_ratio': data.filter_max_length_ratio, 'dedup': data.dedup,
      'tokenizer': {'path': config.tokenizer.path, 'vocab_size': config.tokenizer.vocab_size,
                    'model_type': config.tokenizer.model_type},
      # Only when set: directories prepared before tags existed stay valid.
      **({'tags': {'corpora': tags_lib.corpus_prefixes(config, len(corpus_specs(config))),
                   'tokenizer': tags_lib.all_tags(config)}} if tags_lib.all_tags(config) else {}),
  }


def load_manifest(directory: str) -> dict | None:
  target = os.path.join(directory, MANIFEST)
  if not os.path.exists(target):
    return None
  try:
    with open(target, encoding='utf-8') as handle:
      manifest = json.load(handle)
  except (OSError, ValueError) as error:
    raise DataError(f'{target} is unreadable ({error}); delete it to prepare again') from None
  if manifest.get('format') != FORMAT:
    raise DataError(f'{target} has layout {manifest.get("format")}, this jaxnmt reads '
                    f'{FORMAT}: prepare the data again into a new directory')
  return manifest


def check_spec(manifest: dict, config, directory: str) -> None:
  """A DataError when `directory` was prepared from another data config."""
  wanted, found = data_spec(config), manifest['spec']
  differences = [f'{key}={found.get(key)!r} (config: {wanted[key]!r})'
                 for key in wanted if found.get(key) != wanted[key]]
  if differences:
    raise DataError(f'{directory} was prepared with other data settings: '
                    f'{"; ".join(differences)}. Prepare into a new directory '
                    f'(config.data.prepared_dir or a new --workdir)')


def prepare(config, workdir: str, progress: bool = True) -> dict:
  """Prepares the config's corpora (once) and returns the manifest."""
  directory = prepared_dir(config, workdir)
  manifest = load_manifest(directory)
  if manifest is not None:
    check_spec(manifest, config, directory)
    return manifest
  started = time.time()
  created = not os.path.exists(directory)
  os.makedirs(directory, exist_ok=True)
  try:
    specs = corpus_specs(config)
    names = _unique_names(specs)
    seconds = {'split': time.time()}
    split_stats = _split_stage(config, directory, specs, names, progress)
    seconds['tokenizer'] = time.time()
    tokenizer_file = _tokenizer_stage(config, directory)
    tokenizer = tokenizer_lib.load(tokenizer_file, config.tokenizer.model_type)
    dtype = records_lib.record_dtype(tokenizer.vocab_size)
    seconds['tokenize'] = time.time()
    shards = _tokenize_stage(config, directory, tokenizer_file, dtype, progress)
    seconds['end'] = time.time()
  except UserError:  # bad input: leave nothing half-made behind
    shutil.rmtree(directory if created else os.path.join(directory, _RAW),
                  ignore_errors=True)
    raise
  manifest = {
      'format': FORMAT, 'spec': data_spec(config), 'created': time.time(),
      'tokenizer': TOKENIZER, 'tokenizer_sha256': corpus_lib.file_sha256(tokenizer_file),
      'vocab_size': tokenizer.vocab_size, 'record_dtype': dtype.str,
      'splits': split_stats['splits'], 'corpora': [],
  }
  for name, spec in zip(names, specs):
    read = split_stats['corpora'][name]
    mine = sorted((s for s in shards if s['corpus'] == name), key=lambda s: s['file'])
    filtered = collections.Counter(read['filtered'])
    for shard in mine:
      filtered.update(shard['filtered'])
    pairs = sum(s['pairs'] for s in mine)
    if not pairs:
      raise DataError(f'{spec}: no training pair left after the held-out split and the '
                      f'filters ({dict(filtered)})')
    manifest['corpora'].append({
        'name': name, 'spec': spec, 'files': read['files'], 'lines': read['lines'],
        'malformed': read['malformed'], 'filtered': dict(filtered), 'pairs': pairs,
        'source_tokens': sum(s['source_tokens'] for s in mine),
        'target_tokens': sum(s['target_tokens'] for s in mine),
        'shards': [{'file': s['file'], 'pairs': s['pairs']} for s in mine if s['pairs']],
    })
  stages = list(seconds)
  manifest['seconds'] = {stage: round(seconds[after] - seconds[stage], 1)
                         for stage, after in zip(stages, stages[1:])}
  manifest['seconds']['total'] = round(time.time() - started, 1)
  _write_json(os.path.join(directory, MANIFEST), manifest)
  shutil.rmtree(os.path.join(directory, _RAW), ignore_errors=True)
  for corpus in manifest['corpora']:
    logging.info('Prepared %s: %d training pairs (%d source + %d target tokens) in %d '
                 'shards; malformed %s; filtered %s', corpus['name'], corpus['pairs'],
                 corpus['source_tokens'], corpus['target_tokens'], len(corpus['shards']),
                 corpus['malformed'] or 'none', corpus['filtered'] or 'none')
  logging.info('Prepared data in %s (seconds: %s); held out %s', directory,
               manifest['seconds'], manifest['splits'])
  return manifest


def fingerprint(manifest: dict) -> str:
  """A hash of what the training stream reads (shards, counts, tokenizer): the same for
  a re-preparation of the same inputs with the same tokenizer."""
  content = {'tokenizer_sha256': manifest['tokenizer_sha256'],
             'record_dtype': manifest['record_dtype'],
             'corpora': [{'name': corpus['name'], 'pairs': corpus['pairs'],
                          'shards': corpus['shards'],
                          'inputs': [f['sha256'] for f in corpus['files']]}
                         for corpus in manifest['corpora']]}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def open_corpora(manifest: dict, directory: str) -> list[records_lib.ShardedRecords]:
  """Per corpus, its shards as one random-access sequence of records."""
  return [records_lib.ShardedRecords([os.path.join(directory, s['file'])
                                   for s in corpus['shards']],
                                  [s['pairs'] for s in corpus['shards']])
          for corpus in manifest['corpora']]


def _unique_names(specs: list[str]) -> list[str]:
  names, seen = [], collections.Counter()
  for spec in specs:
    name = corpus_lib.corpus_name(spec)
    seen[name] += 1
    names.append(name if seen[name] == 1 else f'{name}{seen[name]}')
  return names


def _write_json(target: str, value) -> None:
  partial = target + '.partial'
  with open(partial, 'w', encoding='utf-8') as handle:
    json.dump(value, handle, indent=1, ensure_ascii=False)
  os.replace(partial, target)


# ----------------------------------------------------------------------------- 1. split


class _Reservoir:
  """A uniform random sample of at most `capacity` items of a stream (0: keep all)."""

  def __init__(self, capacity: int, seed: int):
    self.capacity, self.items, self.seen = capacity, [], 0
    self._random = random.Random(seed)

  def add(self, item) -> None:
    self.seen += 1
    if not self.capacity or len(self.items) < self.capacity:
      self.items.append(item)
    else:
      slot = self._random.randrange(self.seen)
      if slot < self.capacity:
        self.items[slot] = item


def _split_stage(config, directory: str, specs: list[str], names: list[str],
                 progress: bool) -> dict:
  raw_dir = os.path.join(directory, _RAW)
  done = os.path.join(raw_dir, _SPLIT_DONE)
  if os.path.exists(done):
    with open(done, encoding='utf-8') as handle:
      return json.load(handle)
  shutil.rmtree(raw_dir, ignore_errors=True)  # an interrupted split starts over
  os.makedirs(raw_dir)
  data = config.data
  splits_dir = os.path.join(directory, SPLITS)
  os.makedirs(splits_dir, exist_ok=True)
  stats = {'corpora': {}, 'splits': {}}
  # Named test sets: written as given, and their sources kept out of training.
  test_sources = set()
  for name, spec in test_sets(config).items():
    pairs, _ = corpus_lib.read_pairs(spec, data.source_lang, data.target_lang, data.reverse)
    _write_pairs(splits_dir, f'test_{name}', pairs)
    test_sources.update(source for source, _ in pairs)
    stats['splits'][f'test_{name}'] = len(pairs)
  # Held-out pairs are never trained on; each split keeps a uniform sample of at most
  # max_heldout_pairs of them (so a web-scale corpus gives a usable validation set).
  heldout = {name: _Reservoir(data.max_heldout_pairs, data.split_seed + index)
             for index, name in enumerate(('valid', 'test'))}
  sample = _Reservoir(config.tokenizer.max_training_sentences, config.seed)
  seen = set() if data.dedup else None
  with tqdm.tqdm(desc='split', unit=' pairs', disable=not progress, mininterval=2) as bar:
    prefixes = tags_lib.corpus_prefixes(config, len(specs))
    for name, spec, prefix in zip(names, specs, prefixes):
      stats['corpora'][name] = _split_corpus(config, spec, name, raw_dir, test_sources,
                                             heldout, sample, seen, bar, prefix)
  rng = np.random.default_rng(data.split_seed)  # spa.txt is sorted by length
  for split, sample_of_split in heldout.items():
    pairs = sample_of_split.items
    _write_pairs(splits_dir, split, [pairs[i] for i in rng.permutation(len(pairs))])
    stats['splits'][split] = len(pairs)
    if sample_of_split.seen > len(pairs):
      stats['splits'][f'{split}_beyond_max_heldout_pairs'] = sample_of_split.seen - len(pairs)
  with open(os.path.join(raw_dir, 'sample.txt'), 'w', encoding='utf-8') as handle:
    handle.writelines(sentence.replace('\n', ' ') + '\n' for sentence in sample.items)
  stats['sample_sentences'] = len(sample.items)
  _write_json(done, stats)
  return stats


def _split_corpus(config, spec: str, name: str, raw_dir: str, test_sources: set,
                  heldout: dict, sample: _Reservoir, seen: set | None, bar,
                  prefix: str = '') -> dict:
  """Streams one corpus into raw training shards, the held-out lists and the sample;
  `prefix` (its tags, data/tags.py) goes before every source, held-out ones too."""
  data = config.data
  report = corpus_lib.ReadReport(spec)
  filtered = collections.Counter()
  writer = _RawShards(raw_dir, name, data.pairs_per_shard)
  for pair in corpus_lib.iter_pairs(spec, data.source_lang, data.target_lang, data.reverse,
                                    report):
    bar.update()
    if pair[0] in test_sources:
      filtered['source in a test set'] += 1
      continue
    if seen is not None:
      digest = hashlib.blake2b(f'{pair[0]}\t{pair[1]}'.encode(), digest_size=8).digest()
      if digest in seen:
        filtered['duplicate'] += 1
        continue
      seen.add(digest)
    split = corpus_lib.assign_split(pair[0], data.valid_fraction, data.test_fraction,
                                    data.split_seed)
    if prefix:
      pair = (prefix + pair[0], pair[1])
    if split == 'train':
      writer.write(pair)
      sample.add(pair[0])
      sample.add(pair[1])
    else:
      heldout[split].add(pair)
  writer.close()
  report.check()
  corpus_paths = corpus_lib.corpus_files(spec, data.source_lang, data.target_lang)
  return {'files': [{'path': os.path.abspath(f), 'bytes': os.path.getsize(f),
                     'sha256': corpus_lib.file_sha256(f)} for f in corpus_paths],
          'lines': report.lines, 'malformed': dict(report.malformed),
          'filtered': dict(filtered), 'raw_shards': writer.count}


class _RawShards:
  """Writes training pairs as TSV into raw shards of at most `size` pairs, dealt round
  robin over SPREAD shards at a time: a corpus in some order (spa.txt is sorted by
  length) gives shards that each sample a long stretch of it. Each shard is shuffled
  again when tokenized, so a block of consecutive records is a random sample."""

  def __init__(self, directory: str, name: str, size: int):
    self.directory, self.name, self.size = directory, name, size
    self.written, self.count, self._handles = 0, 0, []

  def write(self, pair: tuple[str, str]) -> None:
    index = self.written % (SPREAD * self.size)
    if index == 0:  # a new group of SPREAD shards
      self.close()
    if index % SPREAD == len(self._handles):
      path = os.path.join(self.directory, f'{self.name}-{self.count:05d}.tsv')
      self._handles.append(open(path, 'w', encoding='utf-8'))
      self.count += 1
    shard = index % SPREAD
    self._handles[shard].write(f'{pair[0]}\t{pair[1]}\n')
    self.written += 1

  def close(self) -> None:
    for handle in self._handles:
      handle.close()
    self._handles = []


def _write_pairs(directory: str, name: str, pairs) -> None:
  for side, suffix in ((0, 'src'), (1, 'ref')):
    target = os.path.join(directory, f'{name}.{suffix}')
    with open(target + '.partial', 'w', encoding='utf-8') as handle:
      handle.writelines(pair[side] + '\n' for pair in pairs)
    os.replace(target + '.partial', target)


# ----------------------------------------------------------------------------- 2. tokenizer


def _tokenizer_stage(config, directory: str) -> str:
  target = os.path.join(directory, TOKENIZER)
  if os.path.exists(target):
    return target
  if config.tokenizer.path:
    if not os.path.isfile(config.tokenizer.path):
      raise DataError(f'config.tokenizer.path: no such file: {config.tokenizer.path}')
    shutil.copyfile(config.tokenizer.path, target + '.partial')
    tags_lib.check_tokenizer(config, tokenizer_lib.load(
        target + '.partial', config.tokenizer.model_type), config.tokenizer.path)
    os.replace(target + '.partial', target)
    logging.info('Tokenizer: copied %s', config.tokenizer.path)
    return target
  with open(os.path.join(directory, _RAW, 'sample.txt'), encoding='utf-8') as handle:
    sentences = handle.read().splitlines()
  started = time.time()
  if config.tokenizer.model_type == 'char':
    tokenizer_lib.train_chars(''.join(sentences), target)
  else:
    tokenizer_lib.train(sentences, target, vocab_size=config.tokenizer.vocab_size,
                        model_type=config.tokenizer.model_type, seed=config.seed,
                        tags=tags_lib.all_tags(config))
  logging.info('Tokenizer: trained on a sample of %d sentences in %.0f s', len(sentences),
               time.time() - started)
  return target


# ----------------------------------------------------------------------------- 3. tokenize


def _tokenize_stage(config, directory: str, tokenizer_file: str, dtype: np.dtype,
                    progress: bool) -> list[dict]:
  raw_dir = os.path.join(directory, _RAW)
  raw_files = sorted(f for f in os.listdir(raw_dir) if f.endswith('.tsv'))
  filters = {'max_tokens': config.data.filter_max_tokens,
             'max_ratio': config.data.filter_max_length_ratio}
  tasks, results = [], []
  for raw in raw_files:
    shard = raw.removesuffix('.tsv') + '.arrayrecord'
    stats_file = os.path.join(directory, shard + '.json')
    if os.path.exists(os.path.join(directory, shard)) and os.path.exists(stats_file):
      with open(stats_file, encoding='utf-8') as handle:
        results.append(json.load(handle))  # finished before an interruption
    else:
      tasks.append((os.path.join(raw_dir, raw), os.path.join(directory, shard),
                    tokenizer_file, config.tokenizer.model_type, dtype.str, filters))
  if results:
    logging.info('Tokenize: %d of %d shards already done', len(results), len(raw_files))
  workers = min(config.data.prepare_workers or os.cpu_count() or 1, max(len(tasks), 1))
  with tqdm.tqdm(desc='tokenize', unit=' pairs', disable=not progress,
                 mininterval=2) as bar:
    if workers <= 1:
      for task in tasks:
        results.append(_tokenize_shard(task))
        bar.update(results[-1]['lines'])
    else:
      with multiprocessing.get_context('spawn').Pool(workers) as pool:
        for result in pool.imap_unordered(_tokenize_shard, tasks):
          results.append(result)
          bar.update(result['lines'])
  return results


_TOKENIZERS = {}


def _tokenize_shard(task) -> dict:
  """One raw TSV shard -> one ArrayRecord shard of token ids and its counts (.json)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  raw_path, shard_path, tokenizer_file, model_type, dtype, filters = task
  if tokenizer_file not in _TOKENIZERS:
    _TOKENIZERS[tokenizer_file] = tokenizer_lib.load(tokenizer_file, model_type)
  tokenizer = _TOKENIZERS[tokenizer_file]
  with open(raw_path, encoding='utf-8') as handle:
    pairs = [line.rstrip('\n').split('\t') for line in handle]
  order = np.random.default_rng(zlib.crc32(os.path.basename(raw_path).encode()))
  pairs = [pairs[i] for i in order.permutation(len(pairs))]
  sources = tokenizer.encode_batch([source for source, _ in pairs])
  targets = tokenizer.encode_target_batch([target for _, target in pairs])
  filtered = collections.Counter()
  counts = {'pairs': 0, 'source_tokens': 0, 'target_tokens': 0}
  partial = shard_path + '.partial'
  # One chunk per block of pairs: the unit the training stream reads (pipeline.py).
  writer = array_record_module.ArrayRecordWriter(partial,
                                                 f'group_size:{records_lib.BLOCK_PAIRS}')
  for source, target in zip(sources, targets):
    longest, shortest = max(len(source), len(target)), min(len(source), len(target))
    if filters['max_tokens'] and longest > filters['max_tokens']:
      filtered['longer than filter_max_tokens'] += 1
      continue
    if filters['max_ratio'] and longest > filters['max_ratio'] * max(shortest, 1):
      filtered['length ratio above filter_max_length_ratio'] += 1
      continue
    writer.write(records_lib.encode_record(source, target, dtype))
    counts['pairs'] += 1
    counts['source_tokens'] += len(source)
    counts['target_tokens'] += len(target)
  writer.close()
  name = os.path.basename(shard_path)
  result = {'file': name, 'corpus': name.rsplit('-', 1)[0], 'lines': len(pairs),
            'filtered': dict(filtered), **counts}
  _write_json(shard_path + '.json', result)  # counts first: a shard present is complete
  os.replace(partial, shard_path)
  return result
