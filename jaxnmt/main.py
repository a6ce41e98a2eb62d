"""jaxnmt command line: one entry point for every mode, on one process or many.

  python -m jaxnmt.main --config=configs/tiny.py --workdir=runs/tiny
  python -m jaxnmt.main --mode=translate --workdir=runs/tiny < english.txt
  python -m jaxnmt.main --mode=eval --workdir=runs/tiny            # BLEU eval worker
  python -m jaxnmt.main --mode=curves --workdir=runs/tiny          # curves.png
  python -m jaxnmt.main --mode=bench --config=configs/tiny.py --workdir=runs/bench
  python -m jaxnmt.main --mode=generate --workdir=runs/lm_char --prompt=ROMEO:
  NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh --config=configs/tiny.py --workdir=runs/mp
"""

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_enum('mode', 'train',
                  ['train', 'translate', 'eval', 'generate', 'curves', 'bench'],
                  'train; translate stdin/--input; eval: the eval worker; generate: sample '
                  'from a language model; curves: render WORKDIR/curves.png; bench: '
                  'measure training and decoding speed, write WORKDIR/bench.json.')
flags.DEFINE_integer('bench_steps', 20, 'bench: timed training steps.')
flags.DEFINE_integer('bench_warmup', 3, 'bench: untimed steps first (>= 1).')
flags.DEFINE_integer('bench_decode_sentences', 128,
                     'bench: test sentences decoded greedily and with beam 4 (0 = skip).')
flags.DEFINE_string('prompt', '\n', 'generate: text to continue.')
flags.DEFINE_integer('num_tokens', 300, 'generate: tokens to sample.')
flags.DEFINE_integer('num_samples', 1, 'generate: independent samples.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, tokenizer and logs.')
flags.DEFINE_string('input', None, 'translate: file of source lines (default: stdin).')
flags.DEFINE_integer('batch_size', 64, 'translate/eval: sentences decoded together.')
flags.DEFINE_integer('beam_size', 4, 'translate/eval: beam size (1 = greedy).')
flags.DEFINE_float('length_penalty', 0.6, 'translate/eval: GNMT length penalty alpha.')
flags.DEFINE_float('temperature', 0.0, 'translate: > 0 samples at this temperature '
                   '(generate: 0 means 1.0).')
flags.DEFINE_integer('top_k', 0, 'translate: sample among the k most likely (0 = all).')
flags.DEFINE_float('top_p', 1.0, 'translate: sample from the nucleus of this mass.')
flags.DEFINE_integer('decode_seed', 0, 'translate: seed of sampling.')
flags.DEFINE_bool('decode_cache', True, 'translate/eval: decode with the KV cache (off: '
                  'recompute the decoder every step, for comparison).')
flags.DEFINE_bool('follow', False, 'eval: keep following new checkpoints forever.')
flags.DEFINE_integer('checkpoint_step', None, 'eval: score this checkpoint only, then exit.')
flags.DEFINE_float('poll_seconds', 10.0, 'eval: how often to look for new checkpoints.')
flags.DEFINE_integer('max_test_sentences', 0, 'eval: score only the first N test pairs.')
flags.DEFINE_string('coordinator_address', None,
                    'Multi-process: host:port of process 0 (else auto-detected on '
                    'SLURM, TPU pods and Open MPI).')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process: index of this process.')
flags.DEFINE_integer('distributed_timeout_s', 120,
                     'Multi-process: give up joining the job after this many seconds.')
config_flags.DEFINE_config_file('config', None, 'Run config file (configs/*.py).',
                                lock_config=True)
flags.mark_flag_as_required('workdir')


def _setup_compilation_cache() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  cache_dir = os.environ.get('JAXNMT_COMPILATION_CACHE',
                             os.path.join(os.path.expanduser('~'), '.cache', 'jaxnmt', 'xla'))
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _run() -> None:
  from jaxnmt import config_lib, distributed  # pylint: disable=g-import-not-at-top
  if FLAGS.mode == 'curves':
    from jaxnmt import curves  # pylint: disable=g-import-not-at-top
    print(curves.render(FLAGS.workdir))
    return
  if FLAGS.mode in ('train', 'bench'):
    if FLAGS.config is None:
      raise app.UsageError(f'--config is required for --mode={FLAGS.mode}')
    if FLAGS.bench_steps < 1 or FLAGS.bench_warmup < 1 or FLAGS.bench_decode_sentences < 0:
      raise app.UsageError('--bench_steps and --bench_warmup must be >= 1, '
                           '--bench_decode_sentences >= 0')
    config_lib.validate(FLAGS.config)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.distributed_timeout_s)
  import jax  # pylint: disable=g-import-not-at-top
  logging.info('Process %d of %d: local devices %s', jax.process_index(),
               jax.process_count(), [str(d) for d in jax.local_devices()])
  _setup_compilation_cache()
  if FLAGS.mode == 'train':
    from jaxnmt import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  elif FLAGS.mode == 'bench':
    from jaxnmt import bench  # pylint: disable=g-import-not-at-top
    bench.run(FLAGS.config, FLAGS.workdir, steps=FLAGS.bench_steps, warmup=FLAGS.bench_warmup,
              decode_sentences=FLAGS.bench_decode_sentences, decode_batch_size=FLAGS.batch_size)
  elif FLAGS.mode == 'translate':
    from jaxnmt import translate  # pylint: disable=g-import-not-at-top
    translate.run(FLAGS.workdir, FLAGS.input, batch_size=FLAGS.batch_size,
                  options=_decode_options())
  elif FLAGS.mode == 'generate':
    from jaxnmt import generate  # pylint: disable=g-import-not-at-top
    generator = generate.Generator(FLAGS.workdir)
    for text in generator.generate(FLAGS.prompt, FLAGS.num_tokens,
                                   temperature=FLAGS.temperature or 1.0, top_k=FLAGS.top_k,
                                   top_p=FLAGS.top_p, seed=FLAGS.decode_seed,
                                   num_samples=FLAGS.num_samples):
      print(text, flush=True)
  elif FLAGS.mode == 'eval':
    from jaxnmt import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run_eval_worker(FLAGS.workdir, follow=FLAGS.follow,
                             checkpoint_step=FLAGS.checkpoint_step,
                             options=_decode_options(), batch_size=FLAGS.batch_size,
                             poll_seconds=FLAGS.poll_seconds,
                             max_test_sentences=FLAGS.max_test_sentences)


def _decode_options():
  from jaxnmt import translate  # pylint: disable=g-import-not-at-top
  if FLAGS.beam_size < 1 or FLAGS.temperature < 0 or not 0 < FLAGS.top_p <= 1 or FLAGS.top_k < 0:
    raise app.UsageError('--beam_size must be >= 1, --temperature >= 0, --top_k >= 0 and '
                         '--top_p in (0, 1]')
  return translate.DecodeOptions(beam_size=FLAGS.beam_size,
                                 length_penalty=FLAGS.length_penalty,
                                 temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                 top_p=FLAGS.top_p, seed=FLAGS.decode_seed,
                                 use_cache=FLAGS.decode_cache)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Everything jaxnmt logs goes to stderr, so translations on stdout stay clean.
  logging.getLogger().setLevel(logging.INFO)
  # Libraries that log through absl (Orbax logs every save step) speak only on warnings.
  logging.getLogger('absl').setLevel(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from jaxnmt import checkpoint, config_lib, data, distributed, generate, sharding
  from jaxnmt import train as train_lib
  user_errors = (config_lib.ConfigError, FileNotFoundError, data.DataError,
                 checkpoint.CheckpointError, train_lib.TrainingError, sharding.MeshError,
                 distributed.DistributedError, generate.GenerateError)
  from jaxnmt import host_runtime
  host_runtime.apply_cpu_xla_flags()
  allocator = host_runtime.describe_allocator()
  if os.environ.get(host_runtime.ALLOCATOR_ENV, 'auto') == 'auto':
    if allocator == 'glibc malloc':
      allocator += (' (CPU training steps run 1.2-1.4x faster with tcmalloc: apt install '
                    'libtcmalloc-minimal4; or JAXNMT_ALLOCATOR=glibc, which uses more memory)')
    elif allocator.startswith('glibc malloc'):
      allocator += ' (tcmalloc is faster still: apt install libtcmalloc-minimal4)'
  logging.info('Host allocator: %s; XLA_FLAGS=%r', allocator, os.environ.get('XLA_FLAGS', ''))
  try:
    _run()
  except user_errors as error:  # known problems: one line, no traceback
    sys.exit(f'error: {error}')


if __name__ == '__main__':
  from jaxnmt import host_runtime  # pylint: disable=g-import-not-at-top
  try:
    host_runtime.choose_allocator()  # first: may restart this command once
  except (FileNotFoundError, host_runtime.AllocatorError) as error:
    sys.exit(f'error: {error}')
  app.run(main)
