"""jaxnmt command line: one entry point for every mode.

  python -m jaxnmt.main --config=configs/tiny.py --workdir=runs/tiny
  python -m jaxnmt.main --mode=translate --workdir=runs/tiny < english.txt
"""

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_enum('mode', 'train', ['train', 'translate'], 'What to run.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, tokenizer and logs.')
flags.DEFINE_string('input', None, 'translate: file of source lines (default: stdin).')
flags.DEFINE_integer('batch_size', 64, 'translate: sentences decoded together.')
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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Everything jaxnmt logs goes to stderr, so translations on stdout stay clean.
  logging.getLogger().setLevel(logging.INFO)
  # Libraries that log through absl (Orbax logs every save step) speak only on warnings.
  logging.getLogger('absl').setLevel(logging.WARNING)
  from jaxnmt import config_lib  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.mode == 'train':
      if FLAGS.config is None:
        raise app.UsageError('--config is required for --mode=train')
      config_lib.validate(FLAGS.config)
      _setup_compilation_cache()
      from jaxnmt import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'translate':
      _setup_compilation_cache()
      from jaxnmt import translate  # pylint: disable=g-import-not-at-top
      translate.run(FLAGS.workdir, FLAGS.input, batch_size=FLAGS.batch_size)
  except (config_lib.ConfigError, FileNotFoundError) as error:
    sys.exit(f'error: {error}')
  except Exception as error:  # Known user-facing errors get one line, not a traceback.
    from jaxnmt import checkpoint, data, train as train_lib  # pylint: disable=g-import-not-at-top
    if isinstance(error, (data.DataError, checkpoint.CheckpointError,
                          train_lib.TrainingError)):
      sys.exit(f'error: {error}')
    raise


if __name__ == '__main__':
  app.run(main)
