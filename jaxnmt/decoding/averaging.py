"""`--mode=average`: the mean of the parameters of the last N checkpoints, stored under
a name of its own.

  python -m jaxnmt.main --mode=average --workdir=runs/tiny --average_last=5   # 'last5'
  python -m jaxnmt.main --mode=translate --workdir=runs/tiny --weights=last5

Averaging the weights of the last few checkpoints of a run smooths out the noise of
the final updates, and usually scores a little better than the last checkpoint alone.
The result lives in WORKDIR/averaged/<name>/ (an Orbax tree of the parameters, and
info.json, written last, naming the steps): the trainer never resumes from it and
retention never deletes it. Each checkpoint is read in turn and added to a running
sum, so at most two copies of the parameters are in memory.
"""

import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxnmt.runtime import checkpointing
from jaxnmt import config_lib
from jaxnmt.data import tokenizer as tokenizer_lib
from jaxnmt.runtime import files
from jaxnmt.model import initialize
from jaxnmt.errors import CheckpointError, UserError

INFO = 'info.json'
PARAMS = 'params'
# Names the weights of a checkpoint already have (inference.load's `weights`).
RESERVED = ('auto', 'raw', 'ema')


def average(workdir: str, last: int = 5, name: str | None = None,
            which: str = 'raw') -> dict:
  """Averages `which` weights ('raw' parameters or 'ema') of the newest `last`
  checkpoints of `workdir` into WORKDIR/averaged/<name> (default 'last<N>', replaced
  if it exists). Returns its info."""
  if jax.process_count() > 1:
    raise UserError('--mode=average runs on one process')
  if last < 1:
    raise UserError(f'--average_last={last}: must be at least 1')
  name = name or f'last{last}'
  check_name(name)
  config = files.load_config(workdir)
  tokenizer = tokenizer_lib.from_workdir(workdir, config.tokenizer.model_type)
  model_cfg = config_lib.model_config(config, tokenizer.vocab_size)
  where = NamedSharding(jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ('data',)),
                        PartitionSpec())
  abstract = initialize.with_shardings(initialize.abstract_params(model_cfg), where)
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.all_steps()[-last:]
    if len(steps) < last:
      raise CheckpointError(f'{checkpointer.directory} holds {len(steps)} checkpoint(s) '
                            f'{steps}, fewer than --average_last={last}')
    total = None
    for step in steps:
      metadata = checkpointer.read_metadata(step) or {}
      checkpointing.check_compatible(metadata, checkpointer.directory,
                                      tokenizer.model_path,
                                      files.sha256(tokenizer.model_path))
      params = checkpointer.restore_params(step, abstract,
                                           'ema' if which == 'ema' else 'params')
      total = params if total is None else jax.tree.map(np.add, total, params)
      logging.info('Added the %s weights of checkpoint %d', which, step)
  finally:
    checkpointer.close()
  mean = jax.tree.map(lambda leaf: (leaf / len(steps)).astype(leaf.dtype), total)
  target = files.averaged_dir(workdir, name)
  if files.exists(target):
    files.rmtree(target)
  with ocp.StandardCheckpointer() as saver:
    saver.save(files.join(target, PARAMS), mean)
    saver.wait_until_finished()
  info = {'name': name, 'steps': steps, 'weights': which, 'format': checkpointing.FORMAT,
          'tokenizer_sha256': files.sha256(tokenizer.model_path)}
  files.write_text(files.join(target, INFO), json.dumps(info, indent=2) + '\n')
  logging.info('Wrote the average of the %s weights of checkpoints %s to %s', which, steps,
               target)
  return info


def check_name(name: str) -> None:
  if name in RESERVED or not name.replace('-', '').replace('_', '').isalnum():
    raise UserError(f'--average_name={name!r}: use letters, digits, - and _, and not '
                    f'{"/".join(RESERVED)}')


def available(workdir: str) -> list[str]:
  """Names of the complete averaged weights in `workdir`."""
  folder = files.averaged_dir(workdir)
  return sorted(name for name in files.listdir(folder)
                if files.exists(files.join(folder, name, INFO)))


def restore_info(workdir: str, name: str) -> dict | None:
  """The info.json of the averaged weights `name` (None: there are none)."""
  target = files.join(files.averaged_dir(workdir, name), INFO)
  return files.read_json(target) if files.exists(target) else None


def restore(workdir: str, name: str, abstract_params, tokenizer_path: str,
            tokenizer_sha256: str) -> tuple[dict, object]:
  """(info, parameters) of the averaged weights `name`, onto the shardings of
  `abstract_params`."""
  folder = files.averaged_dir(workdir, name)
  info = restore_info(workdir, name)
  if info is None:
    raise CheckpointError(f'no weights named {name!r} in {files.averaged_dir(workdir)} '
                          f'(there are: {", ".join(available(workdir)) or "none"}; '
                          f'auto, raw and ema name the weights of a checkpoint); write '
                          f'them with --mode=average')
  checkpointing.check_compatible(info, folder, tokenizer_path, tokenizer_sha256)
  try:
    with ocp.StandardCheckpointer() as reader:
      params = reader.restore(files.join(folder, PARAMS), abstract_params)
  except Exception as error:  # Orbax raises many types for unreadable files.
    raise CheckpointError(f'{folder} could not be read: {type(error).__name__}: '
                          f'{str(error)[:300]}') from error
  return info, params
