"""The decoder cache: the contract between the models' cached step (`transformer.py`)
and the searches (`decoding/search.py`), which know nothing else of the model.

A cached step `step_fn(cache, tokens [R], index) -> (logits [R, V], cache)` takes and
returns a `DecoderCache`: one `LayerCache` per decoder layer, the source's segment ids
(translation) and, under beam search, the slots' `history`. Shapes: R token rows,
B cache rows (R = B, or B * G for G beams a sentence), N heads, T slots, H head width,
S source positions. Axis orders are written as einsum letters (`SLOTS`, `BEAM_KEYS`).

* Slots. A layer's `keys` and `values` hold one slot per output position, slot t written
  at step t, on their axis 'T'. The step reads the number of slots from the cache it is
  given, so a search may hand it the first W slots only while decoding positions < W.
* Shared arrays. `cross_keys` and `cross_values` may have B rows for R = B * G token
  rows, row b serving token rows b*G ... b*G + G - 1; the step returns them as given.
* Beam slots (`history` set; `BEAMS` axis orders). G slots per position: slot t*G + g
  of cache row b is beam g's position t. `history` int32 [R, >= T / G] names, for token
  row b*G + g, the beam whose slot holds each of its positions (g at the step's own).
  Row b*G + g writes slot index*G + g and attends to the slots its history names, so a
  change of beams moves the history, never the slots. The step returns it as given.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Every key and value array: rows, heads, slots, head width. Heads before slots make
# both attention products batched matmuls over (B, N) that read the cache where it lies.
SLOTS = 'BNTH'
# Beam slots' keys only, slots last: the scores of a sentence's G queries are then a
# plain [G, H] x [H, T] matmul (faster, see BUILD_NOTES.md, 'Decoding'; for one query a
# row, as greedy's, writing one position into it is slower).
BEAM_KEYS = 'BNHT'


class Layout(NamedTuple):
  """The axis orders of a layer's self-attention slots."""
  keys: str
  values: str


ROWS = Layout(keys=SLOTS, values=SLOTS)  # one slot per position and row
BEAMS = Layout(keys=BEAM_KEYS, values=SLOTS)  # G slots per position (beam slots)


class LayerCache(NamedTuple):
  """One decoder layer's cache."""
  keys: jax.Array  # self-attention keys, in the layout's `keys` order
  values: jax.Array  # [B, N, T, H]
  cross_keys: jax.Array | None = None  # [B, N, S, H]: cross-attention's, computed once
  cross_values: jax.Array | None = None  # [B, N, S, H]

  @classmethod
  def empty(cls, batch: int, heads: int, positions: int, head_dim: int, dtype,
            cross_keys=None, cross_values=None) -> 'LayerCache':
    """Zeroed slots for `positions` positions of `batch` rows (`ROWS`)."""
    sizes = {'B': batch, 'N': heads, 'T': positions, 'H': head_dim}
    zeros = jnp.zeros([sizes[axis] for axis in SLOTS], dtype)
    return cls(zeros, zeros, cross_keys, cross_values)

  def write(self, keys, values, index, layout: Layout) -> 'LayerCache':
    """This cache with a step's keys and values [R, 1, N, H] written: token row b*G + g
    at slot index*G + g of cache row b (G = R / B; 1 under `ROWS`)."""
    sizes = dict(zip(SLOTS, self.values.shape))
    if self.keys.shape != tuple(sizes[axis] for axis in layout.keys):
      raise ValueError(f'keys {self.keys.shape} are not in the {layout.keys} order of '
                       f'values {self.values.shape} ({SLOTS})')
    batch, heads, head_dim = sizes['B'], sizes['N'], sizes['H']
    group = keys.shape[0] // batch

    def put(slots, new, axes):
      new = new.reshape(batch, group, heads, head_dim)  # [B, G, N, H]: 'BTNH', T = G
      new = jnp.transpose(new, ['BTNH'.index(axis) for axis in axes])
      return jax.lax.dynamic_update_slice_in_dim(slots, new.astype(slots.dtype),
                                                 index * group, axis=axes.index('T'))
    return self._replace(keys=put(self.keys, keys, layout.keys),
                         values=put(self.values, values, layout.values))


class DecoderCache(NamedTuple):
  """A decoder's cache: what a cached step takes and returns."""
  layers: tuple[LayerCache, ...]
  source_segment_ids: jax.Array | None = None  # int32 [B or R, S] (0 = pad), or None
  history: jax.Array | None = None  # beam slots: int32 [R, >= T / G]; None: `ROWS`

  @property
  def layout(self) -> Layout:
    return ROWS if self.history is None else BEAMS

  @property
  def group(self) -> int:
    """G: token rows per cache row (beams a sentence under beam slots, else 1)."""
    return 1 if self.history is None else self.history.shape[0] // self._batch

  @property
  def _batch(self) -> int:
    return self.layers[0].values.shape[0]

  def visible(self, index) -> jax.Array:
    """bool [R, 1, 1, T]: the slots each token row attends at step `index`: those of
    positions <= index (under beam slots, of the beams its history names)."""
    slots = self.layers[0].values.shape[SLOTS.index('T')]
    if self.history is None:
      return jnp.broadcast_to(jnp.arange(slots) <= index, (self._batch, 1, 1, slots))
    rows, group = self.history.shape[0], self.group
    history = self.history[:, :slots // group]                          # [R, T / G]
    mask = ((history[:, :, None] == jnp.arange(group)) &
            (jnp.arange(slots // group) <= index)[:, None])             # [R, T / G, G]
    return mask.reshape(rows, 1, 1, slots)

  def resized(self, positions: int) -> 'DecoderCache':
    """This cache with every layer's slots cut, or zero-padded, to `positions`
    positions (G slots each)."""
    slots = positions * self.group

    def resize(array, axes):
      axis = axes.index('T')
      if array.shape[axis] > slots:
        return jax.lax.slice_in_dim(array, 0, slots, axis=axis)
      if array.shape[axis] < slots:
        padding = [(0, 0)] * array.ndim
        padding[axis] = (0, slots - array.shape[axis])
        return jnp.pad(array, padding)
      return array
    return self._map_slots(lambda array, axes, _: resize(array, axes))

  def for_beams(self, k: int, max_length: int) -> 'DecoderCache':
    """This cache of B rows (the first step done, `ROWS`) for K beams a row: slots as
    beam slots with the B rows' as beam 0's, and a zero history [B*K, max_length]
    (every beam starts there); cross arrays kept, source ids repeated K times."""
    assert self.history is None, 'already beam slots'

    def to_beams(array, beam_axes, row_axes):  # [..., W, ...] -> [..., W * K, ...]
      array = jnp.transpose(array, [row_axes.index(axis) for axis in beam_axes])
      axis = beam_axes.index('T')
      padding = [(0, 0)] * (array.ndim + 1)
      padding[axis + 1] = (0, k - 1)
      array = jnp.pad(jnp.expand_dims(array, axis + 1), padding)        # [..., W, K, ...]
      return array.reshape(*array.shape[:axis], -1, *array.shape[axis + 2:])
    source = self.source_segment_ids
    return self._map_slots(to_beams, BEAMS)._replace(
        source_segment_ids=None if source is None else jnp.repeat(source, k, axis=0),
        history=jnp.zeros((self._batch * k, max_length), jnp.int32))

  def _map_slots(self, function, layout: Layout | None = None) -> 'DecoderCache':
    """Every layer's keys and values through `function(array, new axes, old axes)`."""
    old, new = self.layout, layout or self.layout
    return self._replace(layers=tuple(
        layer._replace(keys=function(layer.keys, new.keys, old.keys),
                       values=function(layer.values, new.values, old.values))
        for layer in self.layers))
