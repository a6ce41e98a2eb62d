"""The two ways jaxnmt stops on purpose, each one line on stderr and an exit code.

`UserError` (exit 2): the user can fix it — a bad config value or flag, a missing or
unreadable file, a mesh that does not fit the devices, a workdir in use. Its message
names the file, field or flag and says what to do.

`RuntimeFailure` (exit 1): the run could not go on although its input was fine — a
non-finite loss, a peer process that was lost, a coordinator that cannot be reached.

`main` catches both and prints `error: <message>`; anything else is a bug and keeps
its traceback. docs/checkpoints-and-faults.md has the table of every exit code.
"""

EXIT_USER_ERROR = 2
EXIT_RUNTIME_FAILURE = 1


class UserError(Exception):
  """Bad input: config, flags, files, mesh. Exit code 2."""


class RuntimeFailure(Exception):
  """The run cannot go on (numerics, lost peers). Exit code 1."""


class ConfigError(UserError, ValueError):
  """A config value is invalid; the message names the field and what is allowed."""


class DataError(UserError, ValueError):
  """The corpus is missing or holds no usable sentence pairs."""


class CheckpointError(UserError, RuntimeError):
  """No readable checkpoint where one was expected."""


class WorkdirError(UserError):
  """The workdir is missing a file it should hold, or is in use by another run."""


class MeshError(UserError, ValueError):
  """The mesh does not fit the devices or the model's dimensions."""


class DistributedError(UserError):
  """The multi-process flags are inconsistent."""


class TrainingError(RuntimeFailure):
  """Training cannot go on (e.g. the loss became NaN)."""


class CompiledStepError(UserError):
  """A saved compiled train step (--compiled_step) is missing, unreadable, or was
  compiled for other devices, another config or another jax/libtpu version."""
