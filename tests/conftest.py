"""Test-wide JAX settings: fast CPU compiles.

XLA's CPU optimisation passes dominate this suite's time (jitting `init` of a
width-0.35 model: 17 s with them, 3.5 s without, on 2 cores); the tiny
programs under test run fast enough unoptimised.
"""

import atexit
import shutil
import tempfile

from fake_data import make_idx_dir
import jax
import pytest

from mnv2_flax import fashion_mnist

jax.config.update('jax_disable_most_optimizations', True)
# Tests that train the same shapes several times (resume) compile once.
# Removed at exit: each pytest worker otherwise leaves ~10 MB in /tmp.
_CACHE_DIR = tempfile.mkdtemp(prefix='mnv2_flax_test_jax_cache_')
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def data_dirs(tmp_path_factory):
  """(idx dir, tfds data_dir) with a 40 + 23 image Fashion-MNIST prepared."""
  idx_dir = make_idx_dir(str(tmp_path_factory.mktemp('idx')))
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  fashion_mnist.prepare(data_dir, idx_dir)
  return idx_dir, data_dir
