"""Orbax checkpoints of the training state and the data-iterator position.

Layout: WORKDIR/checkpoints/<step>/{state, data_iterator}. Saves are asynchronous: the
train loop hands the arrays to Orbax and goes on; Orbax writes to a temporary folder and
renames it when complete, so a half-written step is never listed or read.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No readable checkpoint where one was expected."""


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator_state: dict | None = None) -> None:
    """Starts an asynchronous save of `state` (a pytree of jax arrays) at `step`."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator_state is not None:
      items['data_iterator'] = ocp.args.JsonSave(data_iterator_state)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state) -> tuple[object, dict | None]:
    """Restores the state at `step` onto the shardings of `abstract_state` (a pytree of
    jax.ShapeDtypeStruct with .sharding). Returns (state, data-iterator state or None)."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    available = set(self._manager.item_metadata(step).keys())
    if 'data_iterator' in available:
      items['data_iterator'] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax raises many types for unreadable files.
      raise CheckpointError(f'checkpoint {self.directory}/{step} could not be read: '
                            f'{type(error).__name__}: {str(error)[:300]}') from error
    return restored['state'], restored.get('data_iterator')

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), with its shardings."""
  def to_abstract(leaf, sharding=None):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=sharding if sharding is not None else
                                getattr(leaf, 'sharding', None))
  if shardings is None:
    return jax.tree.map(to_abstract, tree)
  return jax.tree.map(to_abstract, tree, shardings)


