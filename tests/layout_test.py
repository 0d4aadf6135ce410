"""The package's shape: the model is a leaf, no import cycles, no configs/."""

import ast
import os
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


def test_no_import_cycles_and_no_top_level_configs():
  modules = _modules()
  graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
  assert not any('configs' in deps for deps in graph.values()), graph

  def reachable(start):
    seen, todo = set(), [start]
    while todo:
      for dep in graph.get(todo.pop(), ()):
        if dep not in seen and dep in graph:
          seen.add(dep)
          todo.append(dep)
    return seen

  cycles = [m for m in graph if m in reachable(m)]
  assert not cycles, {m: graph[m] for m in cycles}
