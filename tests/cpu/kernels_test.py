"""Building the C++ kernels: cached, and no compiler falls back cleanly."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mnv2_flax.cpu import kernels

# The model with the CPU layers: a train-mode value and gradient, and whether
# its program calls the kernels.
_PROBE = """
import json, os, re
import jax, jax.numpy as jnp
jax.config.update('jax_disable_most_optimizations', True)
from mnv2_flax import models
from mnv2_flax.cpu import fast_path
from mnv2_flax.cpu import kernels
model = models.MobileNetV2(num_classes=4, width_multiplier=0.35,
                           **fast_path.layers())
x = jnp.ones((2, 32, 32, 3))
variables = jax.jit(model.init)(jax.random.key(0), x)
def loss(params):
  logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                          mutable=['batch_stats'],
                          rngs={'dropout': jax.random.key(1)})
  return jnp.sum(logits ** 2)
grad = jax.jit(jax.grad(loss))
text = grad.lower(variables['params']).as_text()
grads = jax.tree.leaves(grad(variables['params']))
finite = all(bool(jnp.isfinite(g).all()) for g in grads)
print(json.dumps(dict(
  available=kernels.available(),
  calls=sorted(set(re.findall(r'custom_call @(mnv2_\\w+)', text))),
  finite=finite,
  built=sorted(os.listdir(kernels.cache_dir())),
)))
"""
_ALL_TARGETS = sorted(kernels.TARGETS)


def _probe(tmp_path, **env):
  os.makedirs(tmp_path / 'mnv2_flax' / 'kernels', exist_ok=True)
  result = subprocess.run(
    [sys.executable, '-c', _PROBE],
    env={
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'XDG_CACHE_HOME': str(tmp_path),
      **env,
    },
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _path_without_compilers(tmp_path) -> str:
  """PATH with the Python interpreter's folder only: no c++, g++, clang++."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  os.symlink(sys.executable, bin_dir / 'python')
  return str(bin_dir)


@pytest.mark.parametrize('no_compiler', ['failing CXX', 'none on PATH'])
@pytest.mark.slow
def test_without_a_compiler_the_layers_are_pure_jax(tmp_path, no_compiler):
  if no_compiler == 'failing CXX':
    env, warning = {'CXX': '/bin/false'}, 'Building the native CPU kernels'
  else:
    env = {'PATH': _path_without_compilers(tmp_path), 'CXX': ''}
    warning = 'No C++ compiler'
  result, stderr = _probe(tmp_path, **env)
  assert result == dict(available=False, calls=[], finite=True, built=[])
  assert stderr.count(warning) == 1, stderr[-3000:]


@pytest.mark.skipif(
  not any(shutil.which(c) for c in ('c++', 'g++', 'clang++')),
  reason='no C++ compiler on PATH',
)
@pytest.mark.slow
def test_the_built_library_is_cached_and_named_by_its_inputs(tmp_path):
  result, _ = _probe(tmp_path)
  assert result['available'] and result['finite']
  assert result['calls'] == _ALL_TARGETS
  # One finished library (no temporary files left), the name this process
  # computes for the same source, flags, compiler, jaxlib and CPU.
  expected = os.path.basename(kernels.library_path(kernels._compiler()))
  assert result['built'] == [expected]
  # A second process loads it instead of compiling again.
  path = tmp_path / 'mnv2_flax' / 'kernels' / expected
  built_at = path.stat().st_mtime_ns
  again, _ = _probe(tmp_path)
  assert again == result and path.stat().st_mtime_ns == built_at
