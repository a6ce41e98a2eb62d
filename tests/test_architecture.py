"""The package's shape: who imports whom. Only `main` imports the training loop, every
inference mode loads models through `inference`, and the imports have no cycles."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxnmt')


def imports_by_module() -> dict[str, set[str]]:
  """{module: the jaxnmt modules it imports}, read from the source."""
  graph = {}
  for name in sorted(os.listdir(PACKAGE)):
    if not name.endswith('.py') or name == '__init__.py':
      continue
    with open(os.path.join(PACKAGE, name), encoding='utf-8') as handle:
      tree = ast.parse(handle.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == 'jaxnmt':
        imported.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('jaxnmt.'):
        imported.add(node.module.split('.')[1])
      elif isinstance(node, ast.Import):
        imported.update(alias.name.split('.')[1] for alias in node.names
                        if alias.name.startswith('jaxnmt.'))
    graph[name[:-3]] = imported
  return graph


def test_only_main_imports_the_training_loop():
  importers = {module for module, imported in imports_by_module().items()
               if 'train' in imported}
  assert importers == {'main'}


def test_inference_modes_load_models_through_inference_only():
  graph = imports_by_module()
  for module in ('translate', 'translate_stream', 'serve', 'evaluate', 'generate', 'bench'):
    assert 'train' not in graph[module], module
  for module in ('translate', 'translate_stream', 'serve', 'evaluate', 'generate'):
    # bench also trains: it may
    assert 'optim' not in graph[module], module
  assert {'inference'} <= graph['translate'] & graph['evaluate'] & graph['generate']
  assert 'optim' not in graph['inference']  # no optimizer state to read a model


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
