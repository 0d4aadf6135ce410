"""A run is its config and seed: the same bits on one core or two, alone or
in a pack (the CPU; docs/reproducibility.md)."""

import json
import os
import shutil
import subprocess
import sys

from fake_data import make_idx_dir
from fake_data import tiny_config
import jax
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax.cpu import kernels
from mnv2_flax.data import fashion_mnist
from mnv2_flax.train import train_lib

# Its tests share a trained module fixture: under `--dist loadgroup` one
# xdist worker runs them all (`make test`'s loadfile keeps a file together).
pytestmark = pytest.mark.xdist_group(__name__)

TESTS = os.path.dirname(os.path.abspath(__file__))
NUM_TRAIN = 256


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Fashion-MNIST-format data with 256 training images: batches large
  enough that a matrix product's sum over rows is split by threads."""
  idx_dir = make_idx_dir(str(tmp_path_factory.mktemp('idx')), NUM_TRAIN)
  directory = str(tmp_path_factory.mktemp('tfds'))
  fashion_mnist.prepare(directory, idx_dir)
  return directory


def _config(data_dir, batch_size, steps, seed=0):
  config = tiny_config(data_dir, num_epochs=steps * batch_size / NUM_TRAIN)
  config.data.update(batch_size=batch_size, eval_batch_size=23)
  config.seed = seed
  return config


def _leaves(workdir):
  _, variables = checkpointing.restore(workdir)
  return jax.tree_util.tree_leaves_with_path(variables)


def _assert_same_bits(a, b):
  a, b = _leaves(a), _leaves(b)
  assert len(a) == len(b)
  differ = [
    jax.tree_util.keystr(path)
    for (path, x), (_, y) in zip(a, b, strict=True)
    if not np.array_equal(np.asarray(x), np.asarray(y))
  ]
  assert not differ, f'{len(differ)} of {len(a)} arrays differ: {differ[:5]}'


_TRAIN = """
import sys
sys.path.insert(0, {tests!r})
import jax
jax.config.update('jax_disable_most_optimizations', True)
from reproducibility_test import _config
from mnv2_flax.train import train_lib

train_lib.train_and_evaluate(_config({data_dir!r}, 128, 3), {workdir!r})
"""


@pytest.mark.skipif(
  shutil.which('taskset') is None or len(os.sched_getaffinity(0)) < 2,
  reason='needs taskset and two cores',
)
@pytest.mark.slow
def test_a_run_has_the_same_bits_on_one_core_and_on_two(data_dir, tmp_path):
  """XLA's CPU thread pool has one thread under `taskset -c 0`, two on two
  cores: the restored parameters, statistics, optimizer state and EMA are
  equal bit for bit. (Before, the 1x1 convs' weight gradients were Eigen
  contractions cut by thread count: every array differed.)"""
  cores = sorted(os.sched_getaffinity(0))
  workdirs = {}
  for name, cpus in (('one', cores[:1]), ('two', cores[:2])):
    workdirs[name] = str(tmp_path / name)
    script = _TRAIN.format(
      tests=TESTS, data_dir=data_dir, workdir=workdirs[name]
    )
    done = subprocess.run(
      ['taskset', '-c', ','.join(map(str, cpus)), sys.executable, '-c', script],
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
  _assert_same_bits(workdirs['one'], workdirs['two'])
  results = [
    json.load(open(os.path.join(w, 'results.json'))) for w in workdirs.values()
  ]
  assert results[0]['top1'] == results[1]['top1']


@pytest.mark.skipif(
  not kernels.available(), reason='no C++ compiler: the CPU kernels are off'
)
@pytest.mark.slow
def test_a_pack_of_three_is_its_seeds_alone_at_the_sweeps_batch(
  data_dir, tmp_path
):
  """Batch 256, the sweep's: each seed of a pack of 3 ends with the bits of
  its run alone. Needs the C++ kernels: the pure-JAX fallback layers are
  batched by XLA under vmap, equal to rounding only."""
  configs = [_config(data_dir, 256, 2, seed) for seed in (0, 1, 2)]
  packed = [str(tmp_path / f'pack-{c.seed}') for c in configs]
  results = train_lib.train_seeds(configs, packed)
  assert [r['pack'] for r in results] == [3, 3, 3]
  for config, workdir, result in zip(configs, packed, results, strict=True):
    alone = str(tmp_path / f'alone-{config.seed}')
    assert train_lib.train_and_evaluate(config, alone)['top1'] == result['top1']
    _assert_same_bits(alone, workdir)
