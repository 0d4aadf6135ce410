"""What loads when: TensorFlow only where data is read, nothing heavy before
a command line's flags and config are checked; old module names still
import (until 0.3.0).

Each case runs in a fresh Python whose `sitecustomize` makes the named
packages unimportable, as on an accelerator image that lacks them.
"""

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


# What reads data, and so loads TensorFlow: data/ and its four users. Every
# other module must import on a host with JAX, Flax and Optax alone.
READS_DATA = (
  'mnv2_flax.data',
  'mnv2_flax.train.train_lib',
  'mnv2_flax.train.resolutions',
  'mnv2_flax.export.lib',
  'mnv2_flax.benchmark.pipeline',
)


def _no_data_modules() -> list[str]:
  found = []
  for path in glob.glob(f'{PACKAGE}/**/*.py', recursive=True):
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    name = name.removesuffix('.__init__')
    if not any(name == m or name.startswith(m + '.') for m in READS_DATA):
      found.append(name)
  return sorted(found)


_BENCHMARK = """
import json, sys
{imports}
from mnv2_flax.benchmark import lib as benchmark_lib
r = benchmark_lib.run(width_multiplier=0.35, resolution=32, batch_size=4,
                      num_classes=10, steps=1, warmup=0)
print('RESULT' + json.dumps(dict(
    images_per_second=r['images_per_second'],
    loaded=sorted(m for m in ('tensorflow', 'tensorflow_datasets')
                  if m in sys.modules))))
"""


@pytest.mark.slow
def test_models_steps_and_the_benchmark_run_without_tensorflow(tmp_path):
  imports = '\n'.join(f'import {m}' for m in _no_data_modules())
  script = _BENCHMARK.format(imports=imports)
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
  (
    ['-m', 'mnv2_flax.benchmark', '--input_pipeline', '--resolutions=96,x'],
    '--resolutions=96,x',
  ),
  (
    [
      '-m',
      'mnv2_flax.prepare_data',
      '--config=configs/default.py',
      '--config.data.resized_short_side=200',
    ],
    'config.data.resized_short_side=200',
  ),
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


def test_old_module_names_import_with_a_warning_until_0_3():
  code = """
import pickle, warnings
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter('always')
  from mnv2_flax import train_lib, input_pipeline
  import mnv2_flax.sweep_submit
  # A submitit task pickled by a sweep queued before 0.2.0:
  task = pickle.loads(b'cmnv2_flax.sweep_submit\\nPointTask\\n.')
from mnv2_flax.data import prepare
from mnv2_flax.sweep import slurm
from mnv2_flax.train import train_lib as new
assert train_lib.train_and_evaluate is new.train_and_evaluate
assert input_pipeline.get_builder is prepare.get_builder
assert task is slurm.PointTask
old = [w for w in caught if w.category is DeprecationWarning]
print('|'.join(str(w.message) for w in old))
"""
  result = _python_plain(code)
  assert result.returncode == 0, result.stderr[-2000:]
  messages = result.stdout.strip().split('|')
  assert len(messages) == 3, messages
  assert messages[0] == (
    'mnv2_flax.train_lib moved to mnv2_flax.train.train_lib in 0.2.0; the old '
    'name goes in 0.3.0.'
  )


def _python_plain(code: str):
  return subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    timeout=300,
    check=False,
  )
