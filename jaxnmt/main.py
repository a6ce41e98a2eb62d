"""jaxnmt command line: one entry point for every mode, on one process or many.

  python -m jaxnmt.main --config=configs/tiny.py                  # trains in runs/tiny
  python -m jaxnmt.main --mode=prepare --config=configs/big.py     # data only (once)
  python -m jaxnmt.main --mode=translate --workdir=runs/tiny < english.txt
  python -m jaxnmt.main --mode=serve --workdir=runs/tiny --port=8080  # HTTP translation
  python -m jaxnmt.main --mode=eval --workdir=runs/tiny            # BLEU eval worker
  python -m jaxnmt.main --mode=curves --workdir=runs/tiny          # curves.png
  python -m jaxnmt.main --mode=average --workdir=runs/tiny         # averaged/last5
  python -m jaxnmt.main --mode=bench --config=configs/tiny.py --workdir=runs/bench
  python -m jaxnmt.main --mode=generate --workdir=runs/lm_char --prompt=ROMEO:
  NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh --config=configs/tiny.py --workdir=runs/mp

Every way a run ends has its exit code (docs/checkpoints-and-faults.md, "Exit codes"): a user error (bad
config, flag, file or mesh) prints one line and exits 2; a runtime failure (non-finite
loss, a lost peer) one line and exits 1.
"""

import dataclasses
import logging
import os
import sys
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Mode:
  """A --mode: the module that runs it (its `main(workdir, flags)`) and what it needs."""
  command: str
  help: str
  needs_config: bool = False  # --config is required (and checked before joining a job)
  decoding: bool = False      # mostly decodes: host.prepare tunes XLA:CPU for that
  joins_job: bool = True      # False: reads files only, never starts JAX's runtime


MODES = {
    'train': Mode('jaxnmt.commands.train', 'train (and resume) a model', needs_config=True),
    'prepare': Mode('jaxnmt.commands.prepare', 'only prepare the data (training does it '
                    'when needed)', needs_config=True),
    'translate': Mode('jaxnmt.commands.translate', 'translate stdin or --input',
                      decoding=True),
    'score': Mode('jaxnmt.commands.score', 'log-probability of source/target pairs '
                  '(--input TSV, or with --target_input) as TSV rows', decoding=True),
    'eval': Mode('jaxnmt.commands.evaluate', 'the eval worker (BLEU of checkpoints)',
                 decoding=True),
    'serve': Mode('jaxnmt.commands.serve', 'translate over HTTP (--port)', decoding=True),
    'generate': Mode('jaxnmt.commands.generate', 'sample from a language model',
                     decoding=True),
    'average': Mode('jaxnmt.commands.average', 'average the last checkpoints into '
                    'WORKDIR/averaged/<name>'),
    'bench': Mode('jaxnmt.commands.bench', 'measure training and decoding speed into '
                  'WORKDIR/bench.json', needs_config=True),
    'curves': Mode('jaxnmt.commands.curves', 'render WORKDIR/curves.png', joins_job=False),
    'export': Mode('jaxnmt.commands.export', 'write the model as a CTranslate2 model '
                   '(--format=ctranslate2 --output=DIR [--quantization=int8])'),
    'import': Mode('jaxnmt.commands.import_model', 'make a workdir from an OPUS-MT / Marian '
                   'model directory (--from=marian --input=DIR)'),
    'compile': Mode('jaxnmt.commands.compile', 'compile every step for a TPU slice '
                    '(--topology) from this machine: memory, FLOPs and collectives per '
                    'chip into WORKDIR/compile/', needs_config=True),
}
flags.DEFINE_enum('mode', 'train', list(MODES), '; '.join(
    f'{name}: {mode.help}' for name, mode in MODES.items()) + '.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, tokenizer and logs '
                    '(train/bench default: runs/<config file name>).')
# Host settings (CPU backends only; docs/speed.md, "Host settings").
flags.DEFINE_string('allocator', 'auto', 'Host memory allocator on a CPU backend: auto '
                    '(one process: tcmalloc if installed, else glibc huge pages where '
                    'available), system, tcmalloc, hugepages, glibc (tuned in place), or '
                    'the path of a malloc library to preload.')
flags.DEFINE_enum('cpu_library_fusions', 'auto', ['auto', 'on', 'off'],
                  'XLA:CPU hands elementwise and reduction loops to its kernel library '
                  '(auto: on for one process on a CPU backend; the decoding modes, '
                  'translate, serve, eval and generate, get matmuls and reductions only).')
flags.DEFINE_string('compilation_cache_dir', '', 'Persistent XLA compilation cache '
                    'directory (empty: no cache); restarts then skip compiling.')
# Multi-process.
flags.DEFINE_string('coordinator_address', None,
                    'Multi-process: host:port of process 0 (else auto-detected on '
                    'SLURM, TPU pods and Open MPI).')
flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process: index of this process.')
flags.DEFINE_integer('distributed_timeout_s', 120,
                     'Multi-process: give up joining the job after this many seconds.')
flags.DEFINE_integer('peer_timeout_s', 120,
                     'Multi-process: a process silent this long (killed, out of memory, '
                     'host gone) is lost, and every process exits with code 1.')
flags.DEFINE_integer('collective_timeout_s', 300,
                     'Multi-process: the longest any process waits for the others at an '
                     'agreement point (stop checks, checkpoint saves) before it names '
                     'the ones missing and exits with code 1.')
# Inference.
flags.DEFINE_string('input', None, 'translate: file of source lines (default: stdin).')
flags.DEFINE_string('output', None, 'translate/score: write here (local or gs://) instead '
                    'of stdout: any number of processes each translate their share, '
                    'resumably (OUTPUT.parts holds the progress until the end).')
flags.DEFINE_string('target_lang', None, 'translate/score/eval/serve: the target language '
                    'of a multilingual model (its tag, e.g. <2es>, goes before each input '
                    'line that names none; serve: a request may name its own).')
flags.DEFINE_string('target_input', None, 'score: file of target lines matching --input '
                    'line by line (else --input is TSV source<TAB>target).')
flags.DEFINE_integer('commit_lines', 10_000, 'translate/score --input: lines per chunk, '
                     'the unit of work and of committed progress.')
flags.DEFINE_integer('batch_size', 64, 'translate/eval/serve: sentences decoded together '
                     '(at most).')
flags.DEFINE_integer('batch_tokens', 4096, 'translate/serve: source tokens (padding '
                     'included) decoded together (at most).')
flags.DEFINE_integer('nbest', 0, 'translate: 0 writes one translation per line; K >= 1 '
                     'writes the K best (K <= --beam_size) as TSV rows '
                     'line_index<TAB>rank<TAB>score<TAB>translation.')
flags.DEFINE_integer('serve_batch_size', 8, 'serve: rows of every decode batch (each '
                     'batch is padded to it: fewer rows answer a lone request sooner, more '
                     'serve more concurrent ones per batch; BUILD_NOTES.md, "Server").')
flags.DEFINE_string('host', '127.0.0.1', 'serve: address to listen on.')
flags.DEFINE_integer('port', 8080, 'serve: port to listen on (0: any free port).')
flags.DEFINE_integer('max_request_sentences', 64, 'serve: most sentences in one request.')
flags.DEFINE_integer('max_sentence_tokens', 256, 'serve: longest sentence accepted, in '
                     'tokens (and 8x that in characters).')
flags.DEFINE_integer('beam_size', 4, 'translate/eval/serve: beam size (1 = greedy).')
flags.DEFINE_float('length_penalty', 1.0, 'translate/eval/serve: GNMT length penalty alpha '
                   '(chosen by a sweep on validation: BUILD_NOTES.md, "Output length").')
flags.DEFINE_integer('min_length', 0, 'translate/eval/serve: no translation ends before '
                     'this many tokens (as fairseq --min-len; the output cap still wins).')
flags.DEFINE_float('temperature', 0.0, 'translate: > 0 samples at this temperature '
                   '(generate: 0 means 1.0).')
flags.DEFINE_integer('top_k', 0, 'translate: sample among the k most likely (0 = all).')
flags.DEFINE_float('top_p', 1.0, 'translate: sample from the nucleus of this mass.')
flags.DEFINE_integer('decode_seed', 0, 'translate: seed of sampling.')
flags.DEFINE_bool('decode_cache', True, 'translate/eval: decode with the KV cache (off: '
                  'recompute the decoder every step, for comparison).')
flags.DEFINE_string('prompt', '\n', 'generate: text to continue.')
flags.DEFINE_integer('num_tokens', 300, 'generate: tokens to sample.')
flags.DEFINE_integer('num_samples', 1, 'generate: independent samples.')
flags.DEFINE_string('weights', 'auto', 'translate/eval/serve/generate: which weights: auto (a '
                    "checkpoint's moving average when the run kept one, else its "
                    'parameters), raw, ema, or the name of averaged weights '
                    '(--mode=average).')
# Averaging.
flags.DEFINE_enum('format', 'ctranslate2', ['ctranslate2'], 'export: the format written.')
flags.DEFINE_string('quantization', 'float32', 'export: weight type of the CTranslate2 '
                    'model: float32, int8, int8_float32, int8_float16, int8_bfloat16, int16, '
                    'float16 or bfloat16.')
flags.DEFINE_enum('from', 'marian', ['marian'], 'import: the kind of model in --input (an '
                  'OPUS-MT / Marian model directory).')
flags.DEFINE_integer('average_last', 5, 'average: how many of the newest checkpoints.')
flags.DEFINE_string('average_name', None, 'average: name of the result (default '
                    'last<N>), for --weights=<name>.')
flags.DEFINE_enum('average_weights', 'raw', ['raw', 'ema'], 'average: average the '
                  'parameters (raw) or their moving averages (ema).')
# Eval worker.
flags.DEFINE_bool('follow', False, 'eval: keep following new checkpoints forever.')
flags.DEFINE_integer('checkpoint_step', None, 'eval: score this checkpoint only, then exit; '
                     'translate/serve: use this checkpoint (default: the latest).')
flags.DEFINE_float('poll_seconds', 10.0, 'eval: how often to look for new checkpoints.')
flags.DEFINE_integer('max_test_sentences', 0, 'eval: score only the first N test pairs.')
flags.DEFINE_integer('max_valid_sentences', 0, 'eval: validation BLEU (which picks the '
                     'best checkpoint) on the first N validation pairs (0 = all).')
# Bench.
flags.DEFINE_integer('bench_steps', 20, 'bench: timed training steps.')
flags.DEFINE_integer('bench_warmup', 3, 'bench: untimed steps first (>= 1).')
flags.DEFINE_integer('bench_decode_sentences', 128,
                     'bench: test sentences decoded greedily and with beam 4 (0 = skip).')
# Compile (ahead of time, for a slice this machine does not have).
flags.DEFINE_string('topology', '', "compile: the TPU slice, as Cloud TPU names it "
                    "('v5e-16' or 'v5litepod-16', 'v4-32', 'v5p-128', 'v6e-64') or as "
                    "libtpu does ('v5e:4x4'); empty: this job's own devices.")
flags.DEFINE_integer('num_slices', 1, 'compile: slices of --topology joined over the data '
                     'center network (multislice); the data axis spans them.')
flags.DEFINE_bool('plan', False, 'compile: rank the meshes that fit --topology (data x '
                  'fsdp x tensor, with remat where needed) by bytes communicated per step.')
flags.DEFINE_list('compile_functions', ['train_step', 'eval_step', 'decode_greedy',
                                        'decode_beam'],
                  'compile: which functions to compile (comma-separated).')
flags.DEFINE_bool('save_compiled', False, 'compile: also serialize the compiled train step '
                  'into WORKDIR/compile/, for train --compiled_step.')
flags.DEFINE_string('compiled_step', '', 'train: run this serialized train step (written by '
                    '--mode=compile --save_compiled) instead of compiling one; refused if it '
                    'was compiled for other devices, another config or jax/libtpu version.')
config_flags.DEFINE_config_file('config', None, 'Run config file (configs/*.py).',
                                lock_config=True)


def _workdir(multi_process: bool) -> str:
  """--workdir, or for train/bench on one process runs/<config file name>."""
  from jaxnmt.errors import UserError  # pylint: disable=g-import-not-at-top
  if FLAGS.workdir:
    from jaxnmt.runtime import files  # pylint: disable=g-import-not-at-top
    files.check_supported(FLAGS.workdir)  # local or gs://
    return FLAGS.workdir
  if not MODES[FLAGS.mode].needs_config or FLAGS.config is None:
    raise UserError(f'--workdir is required for --mode={FLAGS.mode}')
  if multi_process:
    raise UserError('--workdir is required with several processes: they must share one '
                    'path (e.g. on a shared filesystem)')
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
      FLAGS['config'])))[0]
  # bench writes splits and a tokenizer too: never into a training run's workdir.
  return os.path.join('runs', f'{name}_bench' if FLAGS.mode == 'bench' else name)


def _check_flags() -> None:
  from jaxnmt.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    config = FLAGS.config  # ml_collections loads the file on first use
  except OSError as error:
    raise UserError(f'--config: {error}') from None
  if MODES[FLAGS.mode].needs_config and config is None:
    raise UserError(f'--config is required for --mode={FLAGS.mode}')
  if FLAGS.num_samples < 1 or FLAGS.num_tokens < 1 or FLAGS.poll_seconds < 0:
    raise UserError('--num_samples and --num_tokens must be >= 1, --poll_seconds >= 0')
  if FLAGS.num_slices < 1:
    raise UserError(f'--num_slices must be >= 1, got {FLAGS.num_slices}')
  if FLAGS.bench_steps < 1 or FLAGS.bench_warmup < 1 or FLAGS.bench_decode_sentences < 0:
    raise UserError('--bench_steps and --bench_warmup must be >= 1, '
                    '--bench_decode_sentences >= 0')
  if FLAGS.beam_size < 1 or FLAGS.temperature < 0 or not 0 < FLAGS.top_p <= 1 or \
      FLAGS.top_k < 0 or FLAGS.batch_size < 1 or FLAGS.serve_batch_size < 1 or \
      FLAGS.min_length < 0:
    raise UserError('--beam_size, --batch_size and --serve_batch_size must be >= 1, '
                    '--temperature >= 0, --min_length >= 0, '
                    '--top_k >= 0 and --top_p in (0, 1]')


def _run(workdir: str, cluster: str | None) -> None:
  """Joins the job (one process or many) and runs the mode's command."""
  # pylint: disable=g-import-not-at-top
  import importlib
  import jax
  from jaxnmt import config_lib
  from jaxnmt.runtime import distributed
  mode = MODES[FLAGS.mode]
  command = importlib.import_module(mode.command)
  if not mode.joins_job:
    command.main(workdir, FLAGS)
    return
  if mode.needs_config:
    config_lib.validate(FLAGS.config)  # before joining the job: fail fast, alone
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.distributed_timeout_s, peer_timeout_s=FLAGS.peer_timeout_s,
                         collective_timeout_s=FLAGS.collective_timeout_s, cluster=cluster)
  logging.info('Process %d of %d: local devices %s', jax.process_index(),
               jax.process_count(), [str(d) for d in jax.local_devices()])
  if FLAGS.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  command.main(workdir, FLAGS)


def main(argv) -> None:
  # Everything jaxnmt logs goes to stderr, so translations on stdout stay clean.
  logging.getLogger().setLevel(logging.INFO)
  # Libraries that log through absl (Orbax logs every save step) speak only on warnings.
  logging.getLogger('absl').setLevel(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from jaxnmt import errors
  from jaxnmt.runtime import clusters
  from jaxnmt.runtime import host
  try:
    if len(argv) > 1:
      raise errors.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
    _check_flags()
    # The cluster JAX joins by itself (SLURM, Open MPI, TPU pods, ...), found once and
    # before `prepare`, which applies the CPU settings only to a single process.
    # Explicit multi-process flags win over the environment, as in `distributed`.
    explicit = any(value is not None for value in (
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id))
    cluster = None if explicit else clusters.detected_cluster()
    multi_process = (FLAGS.num_processes or 1) > 1 or cluster is not None
    workdir = _workdir(multi_process)
    if FLAGS.mode == 'compile' and FLAGS.topology:
      # Compiling for a slice needs only this machine's CPU (and the TPU or GPU
      # compiler as a library): no local accelerator is started or checked.
      os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    # First, before JAX starts a backend: may restart this command once.
    host.prepare(FLAGS.allocator, FLAGS.cpu_library_fusions, multi_process,
                         decoding=MODES[FLAGS.mode].decoding)
    logging.info('Host: %s', host.describe())
    _run(workdir, cluster)
  except errors.UserError as error:  # the user can fix it: one line, no traceback
    _exit(errors.EXIT_USER_ERROR, str(error))
  except errors.RuntimeFailure as error:
    _await_lost_peer(error)
    _exit(errors.EXIT_RUNTIME_FAILURE, str(error))
  except KeyboardInterrupt:  # training: a second Ctrl-C; other modes: the first
    _exit(130, 'interrupted')
  except Exception as error:  # a bug or a library failure: the traceback helps
    if not _joined_a_job():
      raise
    _await_lost_peer(error)  # a lost peer: the watch ends this process with its line
    traceback.print_exc()
    _exit(errors.EXIT_RUNTIME_FAILURE, f'{type(error).__name__}: {str(error)[:300]}')


# A collective failed because another process went away (gloo on CPUs, NCCL on GPUs).
_PEER_LOST_SIGNS = ('Gloo', 'gloo', 'NCCL', 'Connection reset', 'Connection closed',
                    'UNAVAILABLE')


def _await_lost_peer(error: Exception) -> None:
  """When `error` came from a collective that another process left (a save or a step
  failing with "connection reset by peer"), gives the peer watch the time to name that
  process: its message, not this symptom, is what every process then reports."""
  if _joined_a_job() and any(sign in str(error) for sign in _PEER_LOST_SIGNS):
    from jaxnmt.runtime import distributed  # pylint: disable=g-import-not-at-top
    distributed.await_lost_peer()


def _exit(code: int, message: str) -> None:
  """Prints the error and exits with `code`. In a multi-process job the other
  processes are told first (they exit with the same code within a heartbeat), and
  this one leaves at once: JAX's shutdown barrier would wait for processes that are
  not coming."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  if _joined_a_job():
    from jaxnmt.runtime import distributed  # pylint: disable=g-import-not-at-top
    distributed.report_failure(code, message)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _joined_a_job() -> bool:
  distributed = sys.modules.get('jaxnmt.runtime.distributed')
  return distributed is not None and distributed.joined()


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag a one-line user error (exit 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    print(f'error: {error}', file=sys.stderr)
  except (AttributeError, KeyError) as error:  # ml_collections: an unknown config field
    print(f'error: --config override names no config field: {error}', file=sys.stderr)
  except OSError as error:  # ml_collections: a config file it could not load
    print(f'error: --config: {error}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
