"""What a compiled program holds, read from the compiler's own output: its memory per
device (`memory`), its FLOPs (`flops`) and every collective in its optimized HLO
(`collectives`), with the bytes each moves per call and the mesh axes it runs over.

The collectives are read from `compiled.as_text()`: each all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute (synchronous or `-start`), counted once
per execution (between the slices of a multislice job, the `send`s of the multislice
runtime, by the transfer they make); an op inside a loop whose trip count the condition states (`i < 8`)
counts that many times; one in a loop of data-dependent length (a decode loop) counts
once, per iteration, and is marked so. Its replica groups (explicit `{{0,1},{2,3}}`,
iota `[4,2]<=[2,4]T(1,0)` or `mesh['axis_0'=4,...] {'axis_0'}`) index the program's
devices, which are the mesh's in row-major order; the mesh axes whose groups they
equal are the axes it runs over.
"""

import collections
import dataclasses
import itertools
import math
import re

import numpy as np

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_OPS = {**{kind: kind for kind in KINDS}, **{f'{kind}-start': kind for kind in KINDS}}
_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
          'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4, 'u32': 4,
          'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = ')
_CALLED = re.compile(r'\b(body|condition|calls|to_apply|true_computation|false_computation)'
                     r'=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')


def memory(compiled) -> dict[str, int]:
  """Bytes per device of a compiled program: arguments, outputs, the outputs that reuse
  donated arguments (alias), temporaries, generated code, and `peak`, what it needs at
  once (arguments + outputs - alias + temporaries + code)."""
  stats = compiled.memory_analysis()
  figures = {'arguments': stats.argument_size_in_bytes, 'outputs': stats.output_size_in_bytes,
             'alias': stats.alias_size_in_bytes, 'temporaries': stats.temp_size_in_bytes,
             'code': stats.generated_code_size_in_bytes}
  figures['peak'] = (figures['arguments'] + figures['outputs'] - figures['alias']
                     + figures['temporaries'] + figures['code'])
  return figures


def flops(compiled) -> float:
  """FLOPs of one execution per device, as the compiler's cost model counts them."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  if not analysis:  # the CUDA compiler offers none: XLA's HLO cost analysis instead
    try:
      # pylint: disable-next=g-import-not-at-top
      from jax._src import xla_bridge
      from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
      module = compiled._executable.xla_extension_executable().hlo_modules()[0]  # pylint: disable=protected-access
      analysis = _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), module)
    except Exception:  # pylint: disable=broad-except
      analysis = {}
  return float((analysis or {}).get('flops', 0.0))


@dataclasses.dataclass
class Collective:
  """The collectives of one kind over the same mesh axes in one program."""
  kind: str
  # The mesh axes it runs over; ('part of tensor',) for groups within part of the
  # axes named; ('?',) for groups XLA spells in a way not read here.
  axes: tuple[str, ...]
  count: int = 0         # executions per call of the program
  bytes: int = 0         # per device per call: the whole buffer (gathered / before scatter)
  largest: int = 0       # bytes of the largest single op
  crosses_slices: bool = False  # between slices, over the data-center network (DCN)
  in_unbounded_loop: bool = False  # inside a loop of data-dependent length: per iteration


def _shape_bytes(shape: str) -> list[int]:
  """Bytes of each array in an HLO shape ('f32[8,128]{1,0}' or a tuple of them)."""
  return [_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(',') if d)
          for dtype, dims in _ARRAY.findall(re.sub(r'\{[^{}]*\}', '', shape))]


def _split_shape(rest: str) -> tuple[str, str]:
  """'(f32[2], s32[]) all-reduce-start(...)' -> (shape text, 'all-reduce-start(...)')."""
  rest = re.sub(r'/\*.*?\*/', '', rest)
  if not rest.startswith('('):
    shape, _, tail = rest.partition(' ')
    return shape, tail
  depth = 0
  for index, char in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      return rest[:index + 1], rest[index + 1:].lstrip()
  return rest, ''


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """({computation name: its instruction lines}, name of the entry computation)."""
  computations, entry, current = {}, '', None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      words = line.split()
      is_entry = words[0] == 'ENTRY'
      current = (words[1] if is_entry else words[0]).lstrip('%')
      computations[current] = []
      entry = current if is_entry else entry
    elif line.startswith('}'):
      current = None
    elif current is not None and _INSTRUCTION.match(line):
      computations[current].append(line)
  return computations, entry


def _trip_count(condition: list[str]) -> int | None:
  """N of a loop condition `i < N` with a constant N, else None."""
  constants = re.findall(r's32\[\][^ ]* constant\((\d+)\)', '\n'.join(condition))
  compares = [line for line in condition if 'compare(' in line]
  if len(constants) == 1 and len(compares) == 1 and 'direction=LT' in compares[0]:
    return int(constants[0])
  return None


def _multipliers(computations: dict[str, list[str]], entry: str) -> dict[str, tuple]:
  """{computation: (executions per call of the entry, inside an unbounded loop)}."""
  found = {}

  def visit(name: str, times: int, unbounded: bool) -> None:
    if name not in computations:
      return
    old_times, old_unbounded = found.get(name, (0, False))
    found[name] = (old_times + times, old_unbounded or unbounded)
    for line in computations[name]:
      called = _CALLED.findall(line)
      branches = _BRANCHES.search(line)
      if branches:
        called += [('branch', item.strip().lstrip('%')) for item in branches.group(1).split(',')]
      names = dict(called)
      for role, target in called:
        if (role == 'to_apply' and ' call(' not in line) or (
            role == 'body' and 'condition' in names):
          continue
        visit(target, times, unbounded)
      if 'body' in names and 'condition' in names:
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        trips = (int(known.group(1)) if known else
                 _trip_count(computations.get(names['condition'], [])))
        visit(names['body'], times * (trips or 1), unbounded or trips is None)

  visit(entry, 1, False)
  return found


def _groups(attributes: str, num_devices: int) -> list[list[int]] | None:
  """The replica groups of a collective, as lists of device indices."""
  if 'source_target_pairs=' in attributes:
    pairs = re.search(r'source_target_pairs=\{(.*?)\}\}', attributes)
    if not pairs:
      return []
    return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)', pairs.group(1) + '}')]
  match = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(([^)]*\)?)\))? "
                    r"\{([^}]*)\}", attributes)
  if match:
    axes = re.findall(r"'(\w+)'=(\d+)", match.group(1))
    names, sizes = [name for name, _ in axes], [int(size) for _, size in axes]
    grouped = [names.index(name) for name in re.findall(r"'(\w+)'", match.group(3))]
    ids = (_iota(match.group(2)) if match.group(2) else np.arange(math.prod(sizes)))
    ids = ids.reshape(sizes)
    kept = [axis for axis in range(len(sizes)) if axis not in grouped]
    return ids.transpose(kept + grouped).reshape(-1, math.prod(
        sizes[axis] for axis in grouped)).tolist()
  match = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?',
                    attributes)
  if match:
    count, size = int(match.group(1)), int(match.group(2))
    dims = [int(d) for d in match.group(3).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match.group(4):
      ids = ids.transpose([int(d) for d in match.group(4).split(',')])
    return ids.reshape(count, size).tolist()
  match = re.search(r'replica_groups=\{(\{[\d,{}]*\})\}', attributes)
  if match:
    return [[int(i) for i in group.split(',') if i]
            for group in re.findall(r'\{([\d,]*)\}', match.group(1))]
  if re.search(r'replica_groups=\{\}', attributes):
    return [list(range(num_devices))]
  return None


def _iota(text: str) -> np.ndarray:
  """Device ids of an iota list '[2,4]T(1,0)' (arange reshaped, transposed), flat."""
  dims = [int(d) for d in re.match(r'\[([\d,]+)\]', text).group(1).split(',')]
  ids = np.arange(math.prod(dims)).reshape(dims)
  permutation = re.search(r'T\(([\d,]+)\)', text)
  if permutation:
    ids = ids.transpose([int(d) for d in permutation.group(1).split(',')])
  return ids.reshape(-1)


def _axes_of(groups: list[list[int]], shape: tuple[int, ...], names: tuple[str, ...],
             permute: bool) -> tuple[str, ...]:
  """The axes of a device mesh of `shape` whose groups `groups` are (for a permute: the
  axes its pairs move along)."""
  size = math.prod(shape)
  coords = np.stack(np.unravel_index(np.arange(size), shape), axis=1)
  if permute:
    moved = set()
    for source, target in groups:
      moved.update(np.nonzero(coords[source] != coords[target])[0].tolist())
    return tuple(names[axis] for axis in sorted(moved)) or ('?',)
  wanted = {frozenset(group) for group in groups if len(group) > 1}
  if not wanted:
    return ()
  active = [axis for axis, length in enumerate(shape) if length > 1]
  for count in range(1, len(active) + 1):
    for axes in itertools.combinations(active, count):
      kept = [axis for axis in range(len(shape)) if axis not in axes]
      partition = collections.defaultdict(set)
      for index in range(size):
        partition[tuple(coords[index][kept])].add(index)
      if {frozenset(group) for group in partition.values()} == wanted:
        return tuple(names[axis] for axis in axes)
  # Groups smaller than any set of whole axes (the partitioner splits a dimension over
  # part of an axis): named by the axes their members differ along.
  varied = sorted({axis for group in wanted for member in group
                   for axis in np.nonzero(coords[member] != coords[next(iter(group))])[0]})
  if varied:
    return (f'part of {"+".join(names[axis] for axis in varied)}',)
  return ('?',)


def collectives(compiled, mesh) -> list[Collective]:
  """The collectives of a program compiled for `mesh`, one entry per (kind, mesh
  axes), largest bytes first."""
  computations, entry = _computations(compiled.as_text())
  multipliers = _multipliers(computations, entry)
  slices = [getattr(device, 'slice_index', 0) or 0 for device in mesh.devices.flat]
  by_slice = np.asarray(slices).reshape(mesh.devices.shape)
  slice_axes = tuple(name for axis, name in enumerate(mesh.axis_names)
                     if (np.diff(by_slice, axis=axis) != 0).any())
  # A multislice program is one slice's: its groups index that slice's devices, a mesh
  # whose slice-spanning axis (data, in `sharding.make_mesh`) holds one slice's share.
  num_slices = len(set(slices))
  local_shape = tuple(length // num_slices if name in slice_axes[:1] else length
                      for name, length in zip(mesh.axis_names, mesh.devices.shape))
  # One op per channel: the TPU compiler splits an async collective into several fused
  # computations that each hold a copy of it under the same channel id.
  found = {}  # channel (or a unique key) -> (kind, axes, dcn, size, times, unbounded)
  for name, lines in computations.items():
    times, unbounded = multipliers.get(name, (0, False))
    if not times:
      continue
    for number, line in enumerate(lines):
      shape, tail = _split_shape(line[_INSTRUCTION.match(line).end():])
      op = tail.split('(', 1)[0]
      channel = re.search(r'channel_id=(\d+)', tail)
      key = channel.group(1) if channel else (name, number)
      dcn = re.search(r'_xla_megascale_transfer_type="(\w+)"', tail) if op == 'send' else None
      if dcn:  # between slices: a transfer of the multislice runtime, over DCN
        record = (dcn.group(1).lower().replace('_', '-'), slice_axes, True,
                  _shape_bytes(shape)[0])
      elif op in _OPS:
        kind = _OPS[op]
        if kind == 'all-reduce' and name.startswith('all-reduce-scatter'):
          kind = 'reduce-scatter'  # TPU's reduce-scatter: an all-reduce, then a slice
        sizes = _shape_bytes(shape)
        groups = _groups(tail, math.prod(local_shape))
        if op == 'all-gather-start' and len(sizes) > 1:
          sizes = sizes[len(sizes) // 2:]  # ((inputs), (gathered outputs))
        elif op == 'collective-permute-start':
          sizes = sizes[1:2]  # (input, output, contexts)
        size = sum(sizes)
        if op.startswith('reduce-scatter') and groups:
          size *= len(groups[0])  # the whole buffer before the scatter
        axes = ('?',) if groups is None else _axes_of(groups, local_shape, mesh.axis_names,
                                                      kind == 'collective-permute')
        record = (kind, axes, False, size)
      else:
        continue
      if key not in found or found[key][4] < times:
        found[key] = (*record, times, unbounded)
  table = {}
  for kind, axes, dcn, size, times, unbounded in found.values():
    entry = table.setdefault((kind, axes, dcn), Collective(kind, axes, crosses_slices=dcn))
    entry.count += times
    entry.bytes += times * size
    entry.largest = max(entry.largest, size)
    entry.in_unbounded_loop |= unbounded
  return sorted(table.values(), key=lambda item: -item.bytes)


def largest_buffer(compiled) -> str:
  """The largest array the program holds at some point: its HLO shape, and the JAX
  operation that made it."""
  best, found = -1, ''
  for line in compiled.as_text().splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shape, tail = _split_shape(line[match.end():])
    sizes = _shape_bytes(shape)
    if len(sizes) != 1 or sizes[0] <= best:
      continue
    best = sizes[0]
    source = re.search(r'op_name="([^"]*)"', tail)
    operation = tail.split('(', 1)[0]
    found = (f'{re.sub(r"{[^{}]*}", "", shape)} {best / 2**20:.1f} MiB ({operation}'
             f'{": " + source.group(1)[-80:] if source else ""})')
  return found


def argument_bytes(compiled) -> int:
  """Bytes per device of the program's arguments as their shapes give them (the
  per-device shards of the inputs), without the padding of the device's memory tiles
  that `memory()['arguments']` includes."""
  computations, entry = _computations(compiled.as_text())
  total = 0
  for line in computations.get(entry, []):
    shape, tail = _split_shape(line[_INSTRUCTION.match(line).end():])
    if tail.startswith('parameter('):
      total += sum(_shape_bytes(shape))
  return total
