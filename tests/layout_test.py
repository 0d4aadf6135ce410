"""The package's shape: the model is a leaf; no import cycle between modules
or kinds (subpackages); no configs/; the README lists every module."""

import ast
import os
import re
import subprocess
import sys

PACKAGE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'mnv2_flax'
)


def _modules() -> dict[str, str]:
  """Module name -> path, for every module of the package."""
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        relative = os.path.relpath(path, os.path.dirname(PACKAGE))
        module = relative[:-3].replace(os.sep, '.').removesuffix('.__init__')
        modules[module] = path
  return modules


def _imports(path: str, modules) -> set[str]:
  """The package's modules that `path` imports, at any level of its code.

  `from package import module` depends on the module, not on the package's
  `__init__` (as pylint's cyclic-import counts it).
  """
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        name = f'{node.module}.{alias.name}'
        names.append(name if name in modules else node.module)
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    found |= {n for n in names if n in modules}
    if any(n == 'configs' or n.startswith('configs.') for n in names):
      found.add('configs')
  return found


def test_models_imports_only_flax_jax_numpy():
  code = (
    'import mnv2_flax.models, sys; '
    "print(sorted(m for m in sys.modules if m.startswith('mnv2_flax')))"
  )
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "['mnv2_flax', 'mnv2_flax.models']"


def _graph(modules) -> dict[str, set[str]]:
  """Module -> the package's modules it imports, at any level of its code,
  and the `__init__` of each package above it (importing a.b.c runs them)."""
  graph = {}
  for module, path in modules.items():
    parts = module.split('.')
    inits = {'.'.join(parts[:i]) for i in range(1, len(parts))}
    graph[module] = (_imports(path, modules) | inits) - {module}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One import path per cycle found (depth-first)."""
  cycles, done = [], set()

  def visit(node, path):
    for dep in sorted(graph.get(node, ())):
      if dep in path:
        cycles.append(path[path.index(dep) :] + [dep])
      elif dep not in done and dep in graph:
        visit(dep, [*path, dep])
    done.add(node)

  for node in sorted(graph):
    visit(node, [node])
  return cycles


def _kind(module: str) -> str:
  """A subpackage is one kind; each module at the top is its own."""
  return '.'.join(module.split('.')[:2])


def test_no_import_cycles_between_modules_or_kinds_and_no_configs():
  graph = _graph(_modules())
  assert not any('configs' in deps for deps in graph.values()), graph
  assert not _cycles(graph), _cycles(graph)[:5]
  # Kinds: no subpackage imports one that imports it back, lazily or not;
  # what two kinds share sits below both (runtime/, or a top module).
  kinds = {}
  for module, deps in graph.items():
    if module != 'mnv2_flax':  # the package's own __init__ is below all
      kinds.setdefault(_kind(module), set()).update(
        _kind(d) for d in deps if d != 'mnv2_flax' and _kind(d) != _kind(module)
      )
  assert not _cycles(kinds), _cycles(kinds)[:5]
  # runtime/ is the floor: of the package it reads the config schema only.
  assert kinds['mnv2_flax.runtime'] <= {'mnv2_flax.defaults'}, kinds[
    'mnv2_flax.runtime'
  ]
  assert kinds['mnv2_flax.cpu'] <= {'mnv2_flax.runtime'}, kinds['mnv2_flax.cpu']


def test_the_layout_the_readme_lists_is_the_package():
  readme = open(os.path.join(os.path.dirname(PACKAGE), 'README.md')).read()
  layout = readme.split('## Layout', 1)[1]
  for module in _modules():
    name = module.split('.')[-1]
    if module != 'mnv2_flax' and name != '__init__':
      listed = re.search(rf'(?<!\w){re.escape(name)}(?!\w)', layout)
      assert listed, f'README "Layout" does not list {module}'
