"""What loads when: TensorFlow only where data is read, nothing heavy before
a command line's flags and config are checked, no import cycles.

Each case runs in a fresh Python whose `sitecustomize` makes the named
packages unimportable, as on an accelerator image that lacks them.
"""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'mnv2_flax')
DATA_PACKAGES = 'tensorflow,tensorflow_datasets'
# Everything a command line must not load before it has checked its input.
HEAVY = 'jax,jaxlib,flax,optax,orbax,tensorflow,tensorflow_datasets,scipy,clu'

_BLOCKER = """
import os, sys

class _Blocked:
  def find_spec(self, name, path=None, target=None):
    for blocked in os.environ.get('BLOCKED_PACKAGES', '').split(','):
      if blocked and (name == blocked or name.startswith(blocked + '.')):
        raise ImportError(f'{name} is not installed here (blocked)')
    return None

sys.meta_path.insert(0, _Blocked())
"""


def _python(tmp_path, blocked: str, *args: str, timeout: int = 600):
  (tmp_path / 'sitecustomize.py').write_text(_BLOCKER)
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]),
    BLOCKED_PACKAGES=blocked,
    JAX_PLATFORMS='cpu',
    JAX_DISABLE_MOST_OPTIMIZATIONS='1',
  )
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=timeout,
    check=False,
  )


def test_the_blocker_blocks(tmp_path):
  result = _python(tmp_path, 'tensorflow', '-c', 'import tensorflow')
  assert result.returncode != 0 and 'blocked' in result.stderr


# The modules a host with JAX, Flax and Optax alone must import.
NO_DATA_MODULES = (
  'models',
  'training_state',
  'steps',
  'placement',
  'programs',
  'benchmark',
  'benchmark_lib',
  'aot',
  'stats',
  'checkpointing',
  'convert',
  'finetune',
  'hardware',
  'cli',
  'defaults',
  'divergence',
  'reporting',
  'files',
  'summary',
  'sweep',
  'sweep_points',
  'sweep_workers',
  'sweep_submit',
  'evaluate',
  'export',
)

_BENCHMARK = """
import json, sys
from mnv2_flax import {modules}
from mnv2_flax import benchmark_lib
r = benchmark_lib.run(width_multiplier=0.35, resolution=32, batch_size=4,
                      num_classes=10, steps=1, warmup=0)
print('RESULT' + json.dumps(dict(
    images_per_second=r['images_per_second'],
    loaded=sorted(m for m in ('tensorflow', 'tensorflow_datasets')
                  if m in sys.modules))))
"""


@pytest.mark.slow
def test_models_steps_and_the_benchmark_run_without_tensorflow(tmp_path):
  script = _BENCHMARK.format(modules=', '.join(NO_DATA_MODULES))
  result = _python(tmp_path, DATA_PACKAGES, '-c', script)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split('RESULT')[-1])
  assert out['images_per_second'] > 0 and out['loaded'] == []


# (command line, what its one error line must say); run with JAX, Flax,
# Optax, Orbax, TensorFlow, tfds, SciPy and clu unimportable.
BAD_INPUT = (
  (['train.py', '--nosuch=1'], "Unknown command line flag 'nosuch'"),
  (
    [
      'train.py',
      '--config=configs/quickstart.py',
      '--workdir=w',
      '--config.optim.optimizer=adam2',
    ],
    "config.optim.optimizer='adam2'",
  ),
  (
    [
      '-m',
      'mnv2_flax.sweep',
      '--config=configs/ablation.py',
      '--root=r',
      '--parallel=0',
    ],
    '--parallel=0',
  ),
  (
    [
      '-m',
      'mnv2_flax.sweep',
      '--config=configs/ablation.py:fashion_mnist',
      '--root=r',
      '--set=train.nosuch=1',
    ],
    'no field train.nosuch',
  ),
  (['-m', 'mnv2_flax.evaluate', '--workdir=nowhere'], 'nowhere'),
  (
    ['-m', 'mnv2_flax.export', '--workdir=w', '--output=o', '--format=x'],
    "--format='x'",
  ),
  (['-m', 'mnv2_flax.benchmark', '--resolution=0'], '--resolution=0'),
  (['-m', 'mnv2_flax.benchmark', '--nosuch'], "flag 'nosuch'"),
  (['-m', 'mnv2_flax.benchmark', '--input_pipeline'], '--config='),
  (['-m', 'mnv2_flax.stats', '--width_multiplier=0'], '--width_multiplier'),
)


@pytest.mark.parametrize(
  'args,message', BAD_INPUT, ids=[' '.join(a[:2]) for a, _ in BAD_INPUT]
)
def test_command_lines_refuse_bad_input_before_anything_heavy_loads(
  tmp_path, args, message
):
  result = _python(tmp_path, HEAVY, *args, timeout=60)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr[-2000:]
  assert lines[-1].startswith('error: ') and message in lines[-1], lines[-3:]
  assert 'blocked' not in result.stderr


def _imports(path: str) -> set[str]:
  """The mnv2_flax modules `path` imports at its top level."""
  package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, '.')
  found = set()
  for node in ast.parse(open(path).read()).body:
    if isinstance(node, ast.ImportFrom) and node.module:
      module = node.module
      if node.level:  # relative
        module = f'{package}.{module}'
      if module.startswith('mnv2_flax'):
        for alias in node.names:
          candidate = f'{module}.{alias.name}'
          is_module = os.path.exists(
            os.path.join(ROOT, *candidate.split('.')) + '.py'
          ) or os.path.isdir(os.path.join(ROOT, *candidate.split('.')))
          found.add(candidate if is_module else module)
    elif isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith('mnv2_flax')}
  return found


def test_no_import_cycles_package_inits_included():
  graph = {}
  for path in glob.glob(f'{PACKAGE}/**/*.py', recursive=True):
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    name = name.removesuffix('.__init__')
    deps = _imports(path)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: a package's
    # __init__ that imports its own modules is a cycle too.
    for dep in [*deps, name]:
      parts = dep.split('.')
      deps |= {'.'.join(parts[:i]) for i in range(1, len(parts))}
    graph[name] = deps - {name}
  cycles = []

  def visit(node, path):
    for dep in graph.get(node, ()):
      if dep in path:
        cycles.append(path[path.index(dep) :] + [dep])
      elif dep not in done:
        visit(dep, path + [dep])
    done.add(node)

  done = set()
  for node in graph:
    visit(node, [node])
  assert not cycles, cycles[:5]
