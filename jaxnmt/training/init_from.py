"""Fine-tuning: a new run that starts from the weights of another run
(`config.init_from`), at step 0, with that run's tokenizer.

  python -m jaxnmt.main --config=configs/tiny.py --workdir=runs/tiny-questions \\
      --config.init_from=runs/tiny --config.data.path=questions.tsv

`config.init_from` names a workdir (its latest checkpoint), one of its checkpoints
(WORKDIR/checkpoints/<step>) or averaged weights (WORKDIR/averaged/<name>).
`resolve` checks it before any data is prepared: the model fields must match
(config_lib.init_from_differences), the checkpoint must have been trained with that
workdir's tokenizer (as a resume checks), and the new run's tokenizer must be that one
(config.tokenizer.path is set to it, so the new corpus is tokenized into the same token
ids). `start_state` then fills the freshly built train state: the parameters from the
source, the optimizer fresh (zero moments, count 0) unless
`config.init_from_optimizer`, which keeps Adam's moments and count but restarts the
learning-rate schedule; a moving average starts from the parameters.

Which weights (`config.init_from_weights`): 'auto' takes what translate takes by
default, the moving average when the run kept one, except with init_from_optimizer
(the optimizer state belongs to the raw parameters); 'raw', 'ema', or a name of
averaged weights in that workdir.

Once the new run has checkpoints of its own it resumes from them and never reads
init_from again (the tokenizer path is taken from its saved config).
"""

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import optax

from jaxnmt import config_lib
from jaxnmt.data import prepare as prepare_lib
from jaxnmt.decoding import averaging
from jaxnmt.model import initialize
from jaxnmt.runtime import checkpointing
from jaxnmt.runtime import files
from jaxnmt.errors import CheckpointError, ConfigError, UserError, WorkdirError

# Written by process 0 into the new workdir: where its first parameters came from.
RECORD = 'init_from.json'


@dataclasses.dataclass(frozen=True)
class Source:
  """The weights a fine-tuning run starts from."""
  workdir: str
  step: int | None  # the checkpoint; None: averaged weights
  weights: str  # 'raw', 'ema' or the averaged weights' name
  keep_optimizer: bool
  has_ema: bool  # the checkpoint's state holds a moving average
  tokenizer_sha256: str

  def describe(self) -> str:
    if self.step is None:
      return f'the averaged weights {self.weights!r} of {self.workdir}'
    return f'the {self.weights} weights of checkpoint {self.step} of {self.workdir}'


def _locate(path: str) -> tuple[str, int | None, str | None]:
  """(workdir, step or None, averaged weights' name or None) that `path` names."""
  path = path.rstrip('/')
  parent, leaf = files.dirname(path), os.path.basename(path)
  kind = os.path.basename(parent.rstrip('/'))
  if kind == files.CHECKPOINTS and leaf.isdigit():
    return files.dirname(parent), int(leaf), None
  if kind == files.AVERAGED and leaf:
    return files.dirname(parent), None, leaf
  return path, None, None


def resolve(config, workdir: str, checkpointer) -> Source | None:
  """The source of `config.init_from`, checked against `config` (whose
  tokenizer.path it sets to the source's tokenizer); None when there is none or when
  the run in `workdir` already has checkpoints (`checkpointer`'s), which it resumes."""
  if not config.init_from:
    return None
  latest = checkpointer.latest_step()
  if latest is not None:
    saved = (checkpointer.read_metadata(latest) or {}).get('config') or {}
    if saved and not saved.get('init_from'):
      raise WorkdirError(f'config.init_from: {workdir} already holds a run that did not '
                         f'start from other weights (checkpoint {latest}): fine-tune into '
                         f'a new --workdir, or drop init_from to resume that run')
    if saved.get('init_from') != config.init_from:
      logging.warning('config.init_from=%s, the run in %s started from %s: resuming it',
                      config.init_from, workdir, saved.get('init_from'))
    if not config.tokenizer.path:  # as the run was prepared with
      config.tokenizer.path = (saved.get('tokenizer') or {}).get('path', '')
    logging.info('Fine-tuning run: resuming from its own checkpoint %d (config.init_from '
                 'is not read again)', latest)
    return None
  source_dir, step, averaged = _locate(config.init_from)
  if files.absolute(source_dir) == files.absolute(workdir):
    raise ConfigError(f'config.init_from={config.init_from} is this run\'s own --workdir: '
                      f'fine-tune into a new --workdir (to continue a run, rerun it)')
  weights = config.init_from_weights
  if averaged is not None:
    if weights not in ('auto', averaged):
      raise ConfigError(f'config.init_from_weights={weights!r}: config.init_from names the '
                        f'averaged weights {averaged!r}')
    weights = averaged
  try:
    source_config = files.load_config(source_dir).to_dict()
  except WorkdirError as error:
    raise WorkdirError(f'config.init_from={config.init_from}: {error}') from None
  tokenizer = files.tokenizer_path(source_dir)
  if not files.exists(tokenizer):
    raise WorkdirError(f'config.init_from={config.init_from}: {tokenizer} not found: the '
                       f'run fine-tuned must have its tokenizer')
  sha = files.sha256(tokenizer)
  if weights in averaging.RESERVED:
    step, has_ema, which, source_config = _checkpoint(config, source_dir, step, weights,
                                                      tokenizer, sha, source_config)
  else:
    which, has_ema = weights, False
    _averaged(config, source_dir, step, weights, tokenizer, sha)
  differences = config_lib.init_from_differences(source_config, config.to_dict())
  if differences:
    more = f' (and {len(differences) - 1} more)' if len(differences) > 1 else ''
    raise ConfigError(f'config.init_from: {source_dir} has another model than this '
                      f'config: {differences[0]}{more}; fine-tuning needs the same model '
                      f'and tokenizer fields')
  _use_tokenizer(config, workdir, tokenizer, sha)
  source = Source(workdir=source_dir, step=step, weights=which,
                  keep_optimizer=config.init_from_optimizer, has_ema=has_ema,
                  tokenizer_sha256=sha)
  logging.info('Fine-tuning from %s%s', source.describe(),
               ', keeping its optimizer state' if source.keep_optimizer else '')
  return source


def _checkpoint(config, source_dir: str, step: int | None, weights: str, tokenizer: str,
                sha: str, source_config: dict):
  """(step, has_ema, 'raw' or 'ema', its config) of the source checkpoint, checked."""
  reader = checkpointing.Checkpointer(source_dir, read_only=True)
  try:
    steps = reader.all_steps()
  finally:
    reader.close()
  if not steps:
    raise CheckpointError(f'config.init_from={config.init_from}: no checkpoint in '
                          f'{files.checkpoints_dir(source_dir)}')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise CheckpointError(f'config.init_from={config.init_from}: no checkpoint {step} in '
                          f'{files.checkpoints_dir(source_dir)} (there are {steps})')
  metadata = files.read_json(files.join(files.checkpoints_dir(source_dir), str(step),
                                        'metadata', 'metadata')) or {}
  checkpointing.check_compatible(metadata, files.checkpoints_dir(source_dir), tokenizer, sha)
  source_config = metadata.get('config') or source_config
  has_ema = source_config.get('ema_decay', 0.0) > 0
  if weights == 'ema' and not has_ema:
    raise ConfigError(f'config.init_from_weights=ema: checkpoint {step} of {source_dir} '
                      f'holds no moving average (that run had ema_decay=0): use raw')
  keep = config.init_from_optimizer
  which = 'ema' if weights == 'ema' or (weights == 'auto' and has_ema and not keep) else 'raw'
  if keep:
    clipped = (source_config.get('optim') or {}).get('grad_clip_norm', 0) > 0
    if clipped != (config.optim.grad_clip_norm > 0):
      raise ConfigError(f'config.init_from_optimizer: {source_dir} was trained with '
                        f'gradient clipping {"on" if clipped else "off"}, this config has '
                        f'it {"off" if clipped else "on"}: the optimizer states differ; '
                        f'match config.optim.grad_clip_norm or drop init_from_optimizer')
  return step, has_ema, which, source_config


def _averaged(config, source_dir: str, step: int | None, name: str, tokenizer: str,
              sha: str) -> None:
  if config.init_from_optimizer:
    raise ConfigError(f'config.init_from_optimizer: the averaged weights {name!r} hold no '
                      f'optimizer state; start from a checkpoint or drop the option')
  if step is not None:
    raise ConfigError(f'config.init_from_weights={name!r} names averaged weights, which '
                      f'belong to no single checkpoint: set init_from to the workdir')
  try:
    averaging.check_name(name)
  except UserError:
    raise ConfigError(f'config.init_from_weights={name!r}: auto, raw, ema, or the name of '
                      f'averaged weights (letters, digits, - and _)') from None
  info = averaging.restore_info(source_dir, name)
  if info is None:
    raise CheckpointError(f'config.init_from: no averaged weights {name!r} in '
                          f'{files.averaged_dir(source_dir)} (there are: '
                          f'{", ".join(averaging.available(source_dir)) or "none"})')
  checkpointing.check_compatible(info, files.averaged_dir(source_dir, name), tokenizer, sha)


def _use_tokenizer(config, workdir: str, tokenizer: str, sha: str) -> None:
  """Makes the source's tokenizer the new run's, refusing any other one already chosen:
  config.tokenizer.path, the workdir's own, or that of already prepared data."""
  def refuse(what: str, found: str) -> None:
    raise WorkdirError(f'{what} (sha256 {found[:12]}) is not the tokenizer of '
                       f'config.init_from={config.init_from} ({sha[:12]}): fine-tuning '
                       f'keeps the token ids of the model it starts from')
  if config.tokenizer.path:
    if not files.exists(config.tokenizer.path):
      raise ConfigError(f'config.tokenizer.path: no such file: {config.tokenizer.path}')
    found = files.sha256(config.tokenizer.path)
    if found != sha:
      refuse(f'config.tokenizer.path={config.tokenizer.path}', found)
  own = files.tokenizer_path(workdir)
  if files.exists(own) and files.sha256(own) != sha:
    refuse(f'{own}', files.sha256(own))
  if config.task == 'lm':  # the language model's inputs use the workdir's tokenizer
    if jax.process_index() == 0 and not files.exists(own):
      files.copy_file(tokenizer, own)
    return
  prepared = prepare_lib.prepared_dir(config, workdir)
  manifest = prepare_lib.load_manifest(prepared)
  if manifest is not None and manifest['tokenizer_sha256'] != sha:
    refuse(f'the tokenizer of the data prepared in {prepared}',
           manifest['tokenizer_sha256'])
  if not config.tokenizer.path:
    if files.is_remote(tokenizer):  # data preparation reads a local file
      local = os.path.join(prepared, 'init_from.' + files.TOKENIZER)
      if jax.process_index() == 0 and not os.path.exists(local):
        os.makedirs(prepared, exist_ok=True)
        files.copy_file(tokenizer, local)
      tokenizer = local
    config.tokenizer.path = files.absolute(tokenizer)


def start_state(source: Source, state: dict, shardings: dict) -> dict:
  """The train state at step 0 of a run starting from `source`: `state` (freshly
  built, on `shardings`) with the source's parameters, and with keep_optimizer its
  optimizer state (the schedule's count set back to 0)."""
  params_target = initialize.with_shardings(state['params'], shardings['params'])
  opt_state = state['opt_state']
  if source.step is None:
    _, params = averaging.restore(source.workdir, source.weights, params_target,
                                  files.tokenizer_path(source.workdir),
                                  source.tokenizer_sha256)
  elif not source.keep_optimizer:
    reader = checkpointing.Checkpointer(source.workdir, read_only=True)
    try:
      params = reader.restore_params(source.step, params_target,
                                     'ema' if source.weights == 'ema' else 'params')
    finally:
      reader.close()
  else:
    parts = {'params': state['params'], 'opt_state': state['opt_state'],
             'step': state['step']}
    where = {'params': shardings['params'], 'opt_state': shardings['opt_state'],
             'step': shardings['step']}
    if source.has_ema:
      parts['ema'], where['ema'] = state['params'], shardings['params']
    reader = checkpointing.Checkpointer(source.workdir, read_only=True)
    try:
      restored, _, _ = reader.restore(source.step, initialize.with_shardings(parts, where))
    finally:
      reader.close()
    params = restored['ema' if source.weights == 'ema' else 'params']
    opt_state = restart_schedule(restored['opt_state'])
  started = {'params': params, 'opt_state': opt_state, 'step': state['step']}
  if 'ema' in state:  # the new run's average starts from its first parameters
    started['ema'] = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree),
                             out_shardings=shardings['ema'])(params)
  if jax.process_index() == 0:
    logging.info('Starting at step 0 from %s', source.describe())
  return started


def restart_schedule(opt_state):
  """`opt_state` with every learning-rate schedule's step count at 0 (Adam's own count,
  which its bias correction reads, is kept with its moments)."""
  def restart(node):
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=node.count * 0)
    return node
  return jax.tree.map(restart, opt_state,
                      is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState))


def write_record(workdir: str, source: Source) -> None:
  """WORKDIR/init_from.json: where the run's first parameters came from."""
  if jax.process_index() == 0:
    files.write_text(files.join(workdir, RECORD), json.dumps(
        {**dataclasses.asdict(source), 'description': source.describe()}, indent=2) + '\n')
