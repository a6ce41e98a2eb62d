"""A compiled train step saved to a file, for a later run to load instead of compiling
(`--mode=compile --save_compiled`, then `--mode=train --compiled_step=PATH`). Unlike
`--compilation_cache_dir`, which helps only a machine that has compiled the step before,
this lets a pod start without compiling at all, the step having been compiled for it on
another machine (a CPU host compiling for a TPU slice).

The file: one line naming the format, one line of JSON metadata (`head -2 PATH` shows
it), then the executable as `jax.experimental.serialize_executable` pickles it with its
argument and result trees. The metadata pins what the executable is valid for, and
`load` refuses anything else with one line (`CompiledStepError`, exit 2):

- the devices: platform, device kinds, how many in how many processes, the mesh's axes
  and sizes, and the device ids in mesh order (the executable's device assignment);
- the versions of jax, jaxlib, flax and optax, plus libtpu for a TPU step and the CUDA
  plugin for a GPU step (a CPU step does not depend on libtpu);
- the jaxnmt sources that define the program (`PROGRAM_SOURCES`), so a step compiled
  before a change to the model or the update is not run after it;
- the config fields that change the compiled program (`program_fields`).

Its first call also checks the arguments (tree, shapes, dtypes, shardings) against
those it was compiled for: a tokenizer of another vocabulary size, say, which the
config does not show when `tokenizer.path` names one.

Loading unpickles the file: load only files you wrote (jax's own warning).
"""

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import time

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

from jaxnmt.errors import CompiledStepError
from jaxnmt.runtime import files

MAGIC = b'jaxnmt compiled train step'
# The file's layout; 1: magic line, JSON metadata line, pickled (executable, in/out trees).
FORMAT = 1
# Pinned on every platform ...
_VERSIONS = ('jax', 'jaxlib', 'flax', 'optax')
# ... and by the executable's platform.
_PLATFORM_VERSIONS = {'tpu': ('libtpu',),
                      'gpu': ('jax-cuda12-plugin', 'jax-cuda12-pjrt', 'jax-cuda13-plugin',
                              'jax-cuda13-pjrt')}
# The jaxnmt sources (below the package; folders: every .py in them) whose code is
# compiled into the train step. config_lib is left out: its part in the program is
# the model config and the dropout generator, both pinned as config fields.
PROGRAM_SOURCES = ('model', 'training/steps.py', 'training/optim.py',
                   'training/train_state.py', 'runtime/sharding.py')
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Config fields that leave the compiled train step unchanged: they steer the loop
# around it (how long, how often to log, validate and save, when to stop), what data
# fills the batches and how the tokenizer is trained, or decoding.
_LOOP_ONLY = frozenset({
    'train_time_limit_minutes', 'log_every_steps', 'eval_every_steps',
    'checkpoint_every_steps', 'keep_checkpoints', 'delete_unscored_checkpoints',
    'early_stopping_patience', 'num_text_samples', 'preemption_check_every_steps',
    'tokenizer.path', 'tokenizer.max_training_sentences'})
# mesh.* is pinned as the mesh built from it (data=-1 and data=8 can be one mesh).
_LOOP_ONLY_PREFIXES = ('decode.', 'mesh.')
# Of data.*, only these shape the batch the step takes; the others choose what fills it.
_DATA_FIELDS = ('data.batch_size', 'data.max_source_length', 'data.max_target_length')


def program_fields(config) -> dict:
  """{field: value} of the config fields that change the compiled train step: every
  field (model.*, optim.*, sharding_rules.*, seed, dropout_rng, ema_decay, task,
  tokenizer.vocab_size and model_type, and any field added later) except those that
  only steer the loop (`_LOOP_ONLY`), decode.*, mesh.* (pinned as the mesh built from
  it), and data.* other than batch_size and the row lengths. num_train_steps counts
  unless optim.schedule is 'rsqrt', the one schedule that does not read it.
  Values are as JSON gives them back, so saved and current compare equal."""
  flat = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = value
  walk(config.to_dict(), '')
  kept = {field: value for field, value in flat.items()
          if field not in _LOOP_ONLY and not field.startswith(_LOOP_ONLY_PREFIXES)
          and (not field.startswith('data.') or field in _DATA_FIELDS)}
  if flat.get('optim.schedule') == 'rsqrt':
    kept.pop('num_train_steps', None)
  return json.loads(json.dumps(kept, sort_keys=True))


def config_sha256(fields: dict) -> str:
  """The sha256 of `program_fields`' result, as the metadata keeps it."""
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _devices_of(mesh) -> dict:
  devices = list(mesh.devices.flat)
  return {'platform': devices[0].platform,
          'device_kinds': sorted({device.device_kind for device in devices}),
          'num_devices': len(devices),
          'num_processes': len({device.process_index for device in devices}),
          'mesh': {axis: int(size) for axis, size in mesh.shape.items()},
          'device_ids': [int(device.id) for device in devices]}


def versions() -> dict:
  names = _VERSIONS + tuple(name for names in _PLATFORM_VERSIONS.values() for name in names)
  found = {}
  for name in names:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def sources() -> dict:
  """{path below the package's parent: sha256 (16 hex digits)} of PROGRAM_SOURCES."""
  paths = []
  for source in PROGRAM_SOURCES:
    full = os.path.join(_PACKAGE, source)
    if os.path.isdir(full):
      paths += [os.path.join(full, name) for name in sorted(os.listdir(full))
                if name.endswith('.py')]
    else:
      paths.append(full)
  digests = {}
  for path in paths:
    with open(path, 'rb') as handle:
      digests[os.path.relpath(path, os.path.dirname(_PACKAGE))] = hashlib.sha256(
          handle.read()).hexdigest()[:16]
  return digests


@contextlib.contextmanager
def uncached():
  """A context whose compiles skip JAX's persistent compilation cache
  (--compilation_cache_dir, $JAX_COMPILATION_CACHE_DIR): compile the step to `save` in
  it. An XLA:CPU executable read back from that cache serializes without its kernels
  (jaxlib 0.10.2: the loaded step then fails with 'Function ... not found'), and a TPU
  step compiled from a topology description cannot be read back from it (jax warns,
  then compiles)."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()  # jax remembers whether the cache is in use
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()


def save(compiled, path: str, *, config, mesh, extra: dict | None = None) -> dict:
  """Writes `compiled` (the train step compiled ahead of time for `mesh` and `config`,
  as `fit.compile_train_step` gives it, inside `uncached()`) to `path` (local or
  gs://); returns the metadata written with it. `extra`: more JSON-able facts to keep
  in the metadata (e.g. the topology's name), not checked by `load`."""
  try:
    serialized, in_tree, out_tree = serialize_executable.serialize(compiled)
  except (ValueError, NotImplementedError) as error:
    raise CompiledStepError(f'the compiled train step cannot be saved: {error}') from error
  payload = pickle.dumps((serialized, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
  fields = program_fields(config)
  metadata = {
      'format': FORMAT, **_devices_of(mesh), 'versions': versions(),
      'sources': sources(), 'config': fields,
      'config_sha256': config_sha256(fields),
      'payload_bytes': len(payload), 'payload_sha256': hashlib.sha256(payload).hexdigest(),
      'saved_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'extra': extra or {}}
  files.makedirs(files.dirname(path))
  files.write_bytes(path, b'\n'.join([MAGIC, json.dumps(metadata).encode('utf-8'), payload]))
  logging.info('Saved the compiled train step (%.1f MiB) to %s', len(payload) / 2**20, path)
  return metadata


def _read(path: str) -> tuple[dict, bytes]:
  """(metadata, payload) of the file at `path`, its payload checked against the
  metadata's hash."""
  again = 'write it again with --mode=compile --save_compiled'
  try:
    data = files.read_bytes(path)
  except FileNotFoundError as error:
    raise CompiledStepError(f'no compiled train step at {path} (--compiled_step)') from error
  except OSError as error:
    raise CompiledStepError(f'cannot read the compiled train step {path}: '
                            f'{error.strerror or error}') from error
  magic, _, rest = data.partition(b'\n')
  if magic != MAGIC:
    raise CompiledStepError(f'{path} is not a compiled train step written by jaxnmt '
                            f'(--compiled_step wants a file of --mode=compile --save_compiled)')
  line, _, payload = rest.partition(b'\n')
  try:
    metadata = json.loads(line)
  except ValueError as error:
    raise CompiledStepError(f'{path} is corrupt (its metadata line does not parse); '
                            f'{again}') from error
  if metadata.get('format') != FORMAT:
    raise CompiledStepError(f'{path} has format {metadata.get("format")!r}, this jaxnmt reads '
                            f'{FORMAT}; {again}')
  if (len(payload) != metadata.get('payload_bytes') or
      hashlib.sha256(payload).hexdigest() != metadata.get('payload_sha256')):
    raise CompiledStepError(f'{path} is corrupt (the executable has {len(payload)} bytes, '
                            f'{metadata.get("payload_bytes")} were written, or its hash '
                            f'differs); {again}')
  return metadata, payload


def read_metadata(path: str) -> dict:
  """The metadata saved with the compiled step at `path` (the file checked whole)."""
  return _read(path)[0]


def _describe(devices: dict) -> str:
  processes = devices['num_processes']
  mesh = ' x '.join(f'{axis}={size}' for axis, size in devices['mesh'].items())
  return (f'{devices["num_devices"]} {"/".join(devices["device_kinds"])} devices in '
          f'{processes} process{"es" if processes != 1 else ""}, mesh {mesh}')


def _first_difference(saved: dict, current: dict) -> str | None:
  """The first key (sorted) whose value differs between the two, or None."""
  for key in sorted(set(saved) | set(current)):
    if saved.get(key, '(absent)') != current.get(key, '(absent)'):
      return key
  return None


def check(metadata: dict, path: str, config, mesh) -> None:
  """Refuses (one line naming what differs) a step whose metadata does not match this
  job's devices and mesh, installed versions, program sources or `config`."""
  remedy = ('compile it again for this job (--mode=compile --save_compiled) or drop '
            '--compiled_step')
  now = _devices_of(mesh)
  saved_devices = {key: metadata.get(key) for key in now}
  if saved_devices != now:
    if all(saved_devices[key] == now[key] for key in now if key != 'device_ids'):
      index = next(index for index, (old, new) in enumerate(zip(
          saved_devices['device_ids'], now['device_ids'])) if old != new)
      raise CompiledStepError(
          f'{path} was compiled for other devices in the mesh: place {index} (in mesh '
          f'order) holds device id {saved_devices["device_ids"][index]} there, '
          f'{now["device_ids"][index]} here; {remedy}')
    raise CompiledStepError(f'{path} was compiled for {_describe(saved_devices)}; this job '
                            f'has {_describe(now)}; {remedy}')
  saved_versions, installed = metadata.get('versions', {}), versions()
  pinned = _VERSIONS + _PLATFORM_VERSIONS.get(now['platform'], ())
  for name in pinned:
    if saved_versions.get(name) != installed[name]:
      raise CompiledStepError(f'{path} was compiled with {name} {saved_versions.get(name)}, '
                              f'this job has {name} {installed[name]}; {remedy}')
  source = _first_difference(metadata.get('sources', {}), sources())
  if source is not None:
    raise CompiledStepError(f'{path} was compiled from other jaxnmt code ({source} '
                            f'differs); {remedy}')
  saved_fields, fields = metadata.get('config', {}), program_fields(config)
  field = _first_difference(saved_fields, fields)
  if field is not None:
    raise CompiledStepError(
        f'{path} was compiled for another config: {field}='
        f'{saved_fields.get(field, "(absent)")!r} there, '
        f'{fields.get(field, "(absent)")!r} here; {remedy}')


def load(path: str, *, config, mesh) -> 'CompiledStep':
  """The train step saved at `path` by `save`, ready on `mesh`'s devices: called like
  the jitted step (`steps.compile_steps`). Refuses (CompiledStepError, one line) a
  missing or corrupt file, and one compiled for other devices, another mesh, other
  jax/jaxlib/flax/optax/libtpu versions, other jaxnmt program sources or another
  config (naming the first field that differs)."""
  started = time.perf_counter()
  metadata, payload = _read(path)
  check(metadata, path, config, mesh)
  devices = list(mesh.devices.flat)
  try:
    serialized, in_tree, out_tree = pickle.loads(payload)
    compiled = serialize_executable.deserialize_and_load(
        serialized, in_tree, out_tree, backend=devices[0].client, execution_devices=devices)
  except Exception as error:  # pylint: disable=broad-except
    # The runtime refused what passed every check: say so in one line, keep the chain.
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise CompiledStepError(f'{path} could not be loaded on these devices: {first}') from error
  logging.info('Loaded the compiled train step from %s (%s, saved %s) in %.1fs', path,
               _describe(metadata), metadata.get('saved_at'), time.perf_counter() - started)
  return CompiledStep(compiled, path, metadata)


class CompiledStep:
  """A loaded train step, called like the jitted one: (state, rest, batch) ->
  (state, metric sums), the state donated. Its first call checks the arguments
  against those it was compiled for and refuses (one line) the first that differs."""

  def __init__(self, compiled: jax.stages.Compiled, path: str, metadata: dict):
    self.compiled = compiled
    self.path = path
    self.metadata = metadata
    self._checked = False

  def __call__(self, state, rest, batch):
    if not self._checked:
      self.check_arguments(state, rest, batch)
      self._checked = True
    return self.compiled(state, rest, batch)

  def check_arguments(self, state, rest, batch) -> None:
    """Raises CompiledStepError naming the first argument (by its path, e.g.
    state['params']...) whose presence, shape, dtype or sharding differs from the
    compiled step's."""
    names = ('state', 'rest', 'batch')

    def label(key_path) -> str:
      return names[key_path[0].idx] + jax.tree_util.keystr(tuple(key_path[1:]))

    expected, _ = jax.tree_util.tree_flatten_with_path(self.compiled.args_info[0])
    given, _ = jax.tree_util.tree_flatten_with_path((state, rest, batch))
    shardings = jax.tree_util.tree_leaves(
        self.compiled.input_shardings[0],
        is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))
    expected_labels = [label(key_path) for key_path, _ in expected]
    given_labels = [label(key_path) for key_path, _ in given]
    if expected_labels != given_labels or (jax.tree.structure(self.compiled.args_info[0])
                                           != jax.tree.structure((state, rest, batch))):
      only_expected = [name for name in expected_labels if name not in set(given_labels)]
      only_given = [name for name in given_labels if name not in set(expected_labels)]
      what = (f'{only_expected[0]} is missing here' if only_expected else
              f'{only_given[0]} is not in it' if only_given else
              'their tree has other node types or metadata')
      raise CompiledStepError(f'{self.path} was compiled for other arguments: {what}; '
                              f'compile it again for this run or drop --compiled_step')
    for name, (_, info), (_, value), where in zip(expected_labels, expected, given,
                                                 shardings):
      problem = None
      if tuple(value.shape) != tuple(info.shape):
        problem = f'shape {tuple(value.shape)} here, {tuple(info.shape)} in the step'
      elif value.dtype != info.dtype:
        problem = f'dtype {value.dtype} here, {info.dtype} in the step'
      elif (where is not None and isinstance(value, jax.Array) and
            not value.sharding.is_equivalent_to(where, value.ndim)):
        problem = (f'sharding {getattr(value.sharding, "spec", value.sharding)} here, '
                   f'{getattr(where, "spec", where)} in the step')
      if problem:
        raise CompiledStepError(f'{self.path} was compiled for other arguments: {name} has '
                                f'{problem}; compile it again for this run or drop '
                                f'--compiled_step')
