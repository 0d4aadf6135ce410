"""Building the C++ kernel: cached, and a failed build falls back cleanly."""

import json
import os
import subprocess
import sys

import pytest

from mnv2_flax import native

_PROBE = """
import json, os
import jax, jax.numpy as jnp
from mnv2_flax import depthwise, native
conv = depthwise.conv_fn('auto')
out, grads = jax.value_and_grad(
  lambda x, k: jnp.sum(conv(
    x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=4)),
  (0, 1),
)(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 1, 4)))
print(json.dumps(dict(
  available=native.available(),
  auto=depthwise.resolve('auto'),
  sum=float(out),
  built=sorted(os.listdir(native.cache_dir())),
)))
"""


def _probe(tmp_path, **env):
  result = subprocess.run(
    [sys.executable, '-c', _PROBE],
    env={
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'MNV2_FLAX_NATIVE_DIR': str(tmp_path / 'native'),
      **env,
    },
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.parametrize(
  'env, warning',
  [
    # A compiler that fails: one warning, the pure-JAX path, a working model.
    ({'CXX': '/bin/false'}, 'Building the native CPU kernels failed'),
    # Switched off by the user: no build, no warning.
    ({'MNV2_FLAX_NATIVE': '0'}, None),
  ],
)
def test_without_the_kernel_auto_is_the_pure_jax_path(tmp_path, env, warning):
  os.makedirs(tmp_path / 'native')
  result, stderr = _probe(tmp_path, **env)
  # The conv of ones with ones: 9 taps inside, 6 on an edge, 4 in a corner.
  total = 4 * (9 * 9 + 6 * 12 + 4 * 4)
  assert result == dict(available=False, auto='shift', sum=total, built=[])
  if warning:
    assert stderr.count(warning) == 1
  else:
    assert 'native CPU kernels' not in stderr


def test_the_built_library_is_cached_and_named_by_its_inputs(tmp_path):
  result, _ = _probe(tmp_path)
  assert result['available'] and result['auto'] == 'native'
  assert result['sum'] == 4 * (9 * 9 + 6 * 12 + 4 * 4)
  # One finished library (no temporary files left), the name this process
  # computes for the same source, flags, compiler, jaxlib and CPU.
  compiler = native._compiler()
  expected = os.path.basename(native.library_path(compiler))
  assert result['built'] == [expected]
  # A second process loads it instead of compiling again.
  path = tmp_path / 'native' / expected
  built_at = path.stat().st_mtime_ns
  again, _ = _probe(tmp_path)
  assert again == result and path.stat().st_mtime_ns == built_at
