"""The package's shape: which wing may import which, read from the source.

Wings, top to bottom; a module may import its own wing and the wings below it:

  main.py      flags and the table of modes
  commands/    one module per mode
  training/    train state, steps, the loop, batch fit, feeding, stops, metrics
  decoding/    search, selection, translation, inference, averaged weights, BLEU
  config_lib   every config check                     (imports model/, runtime/)
  data/        corpora, tokenizer, prepared shards, the Grain stream
  model/       layers, the Transformer, losses, the cache contract, initialisation
  runtime/     host settings, processes, files and the workdir, locks, mesh, checkpoints
  errors       the user-error family
"""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxnmt')

# What each part of the package may import (besides itself).
ALLOWED = {
    'errors': set(),
    'runtime': {'errors'},
    'model': {'runtime', 'errors'},
    'data': {'runtime', 'errors'},
    'config_lib': {'model', 'runtime', 'errors'},
    'decoding': {'config_lib', 'data', 'model', 'runtime', 'errors'},
    'training': {'decoding', 'config_lib', 'data', 'model', 'runtime', 'errors'},
    'interop': {'training', 'decoding', 'config_lib', 'data', 'model', 'runtime', 'errors'},
    'commands': {'interop', 'training', 'decoding', 'config_lib', 'data', 'model', 'runtime',
                 'errors'},
    'main': {'commands', 'interop', 'training', 'decoding', 'config_lib', 'data', 'model',
             'runtime', 'errors'},
}
WINGS = ('runtime', 'model', 'data', 'decoding', 'training', 'interop', 'commands')


def _modules() -> dict[str, str]:
  """{dotted module name below jaxnmt: its file}."""
  found = {}
  for directory, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        relative = os.path.relpath(os.path.join(directory, name), PACKAGE)[:-3]
        dotted = relative.replace(os.sep, '.')
        dotted = '' if dotted == '__init__' else dotted.removesuffix('.__init__')
        found[dotted] = os.path.join(directory, name)
  return found


def imports_by_module() -> dict[str, set[str]]:
  """{module: the jaxnmt modules it imports (dotted, below jaxnmt)}, including imports
  inside functions and the module paths of main's table of modes."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    with open(path, encoding='utf-8') as handle:
      tree = ast.parse(handle.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module == 'jaxnmt' or node.module.startswith('jaxnmt.')):
        base = node.module.removeprefix('jaxnmt').lstrip('.')
        for alias in node.names:
          full = f'{base}.{alias.name}' if base else alias.name
          imported.add(full if full in modules else base)
      elif isinstance(node, ast.Import):
        imported.update(alias.name.removeprefix('jaxnmt.') for alias in node.names
                        if alias.name.startswith('jaxnmt.'))
      elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith('jaxnmt.') and node.value[7:] in modules):
        imported.add(node.value[7:])  # importlib.import_module('jaxnmt.commands.x')
    graph[module] = {name for name in imported if name and name != module}
  return graph


def part(module: str) -> str:
  return module.split('.')[0]


def test_every_module_belongs_to_a_wing_or_is_named_at_the_top():
  for module in imports_by_module():
    assert part(module) in ALLOWED or module == '', module


def violations(graph: dict[str, set[str]]) -> list[str]:
  """Every import in `graph` that points up or across the wings."""
  return [f'{module} imports {name}: {part(module)} may import only '
          f'{sorted(ALLOWED[part(module)])}'
          for module, imported in sorted(graph.items()) for name in sorted(imported)
          if part(name) != part(module) and part(name) not in ALLOWED[part(module)]]


def test_imports_point_down_the_wings():
  assert violations(imports_by_module()) == []


def test_an_import_up_or_across_the_wings_is_a_violation():
  graph = imports_by_module()
  for module, name in (('model.layers', 'data.tokenizer'), ('model.cache', 'decoding.search'),
                       ('runtime.files', 'model.layers'), ('training.loop', 'commands.train'),
                       ('data.pipeline', 'config_lib')):
    planted = {**graph, module: graph[module] | {name}}
    assert violations(planted) == [
        f'{module} imports {name}: {part(module)} may import only '
        f'{sorted(ALLOWED[part(module)])}'], (module, name)


def test_every_mode_is_a_command_module_and_only_main_imports_commands():
  graph = imports_by_module()
  commands = {module for module in graph if part(module) == 'commands' and '.' in module}
  assert {name for name in graph['main'] if part(name) == 'commands'} == commands
  for module, imported in graph.items():
    if part(module) not in ('commands', 'main'):
      assert not any(part(name) == 'commands' for name in imported), module


def test_only_the_train_and_bench_commands_import_the_training_loop():
  importers = {module for module, imported in imports_by_module().items()
               if 'training.loop' in imported}
  assert importers <= {'commands.train', 'commands.bench'}
  assert 'commands.train' in importers


def test_inference_modes_load_models_through_inference_only():
  graph = imports_by_module()
  for module in ('commands.translate', 'commands.serve', 'commands.evaluate',
                 'commands.generate'):
    assert not any(name in graph[module] for name in
                   ('training.loop', 'training.optim', 'training.train_state')), module
  assert 'training.optim' not in graph['decoding.inference']  # no optimizer to read a model
  for module in ('decoding.translation', 'commands.evaluate', 'commands.generate'):
    assert 'decoding.inference' in graph[module], module


def test_imports_have_no_cycles():
  graph = imports_by_module()
  done, path = set(), []

  def visit(module):
    assert module not in path, ' -> '.join(path[path.index(module):] + [module])
    if module in done:
      return
    path.append(module)
    for imported in graph.get(module, ()):
      visit(imported)
    path.pop()
    done.add(module)

  for module in graph:
    visit(module)
