"""Seed packs: seeds trained as one program (`train_lib.train_seeds`)."""

import os

from fake_data import tiny_config
import jax
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax import train_lib


def _config(data_dir, seed, **train):
  config = tiny_config(data_dir, num_epochs=0.4, **train)  # 2 steps
  config.seed = seed
  return config


def _leaves(workdir):
  _, variables = checkpointing.restore(workdir)
  return jax.tree.leaves(variables)


def test_a_pack_matches_its_seeds_trained_alone(data_dirs, tmp_path):
  """Each seed of a pack of 2 writes its own restorable workdir, with the
  parameters, statistics and test top-1 of that seed trained alone, bit for
  bit on the CPU fast path (its kernels run per seed under vmap; the dense
  stem conv runs once per seed rather than as one grouped conv)."""
  _, data_dir = data_dirs
  configs = [_config(data_dir, s) for s in (0, 1)]
  packed = [str(tmp_path / f'pack_seed-{s}') for s in (0, 1)]
  results = train_lib.train_seeds(configs, packed)
  assert [r['pack'] for r in results] == [2, 2]
  assert all(r['finished'] for r in results)
  for seed, workdir, result in zip((0, 1), packed, results, strict=True):
    alone = train_lib.train_and_evaluate(
      _config(data_dir, seed), str(tmp_path / f'alone_seed-{seed}')
    )
    assert 'pack' not in alone
    assert result['top1'] == alone['top1']
    a, b = _leaves(str(tmp_path / f'alone_seed-{seed}')), _leaves(workdir)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  # Seeds 0 and 1 differ (their own init and data), and a rerun of the
  # pack finds both finished.
  first, second = _leaves(packed[0]), _leaves(packed[1])
  assert any(not np.allclose(x, y) for x, y in zip(first, second, strict=True))
  again = train_lib.train_seeds(configs, packed)
  assert [r['completed_steps'] for r in again] == [2, 2]
  # A pack whose seed 0 finished alone before: seed 0 is left as it is,
  # seed 1 (the one seed left) trains as a plain run.
  mixed = [str(tmp_path / 'alone_seed-0'), str(tmp_path / 'mixed_seed-1')]
  before = os.path.getmtime(os.path.join(mixed[0], 'results.json'))
  results = train_lib.train_seeds(configs, mixed)
  assert 'pack' not in results[0] and 'pack' not in results[1]
  assert os.path.getmtime(os.path.join(mixed[0], 'results.json')) == before
  for x, y in zip(
    _leaves(mixed[1]), _leaves(str(tmp_path / 'alone_seed-1')), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_pack_refuses_configs_that_differ_beyond_the_seed(tmp_path):
  configs = [_config(None, 0), _config(None, 1)]
  configs[1].optim.learning_rate = 0.2
  with pytest.raises(ValueError, match='config.optim.learning_rate'):
    train_lib.train_seeds(configs, [str(tmp_path / 'a'), str(tmp_path / 'b')])
  with pytest.raises(ValueError, match='seeds of a pack must differ'):
    train_lib.train_seeds(
      [_config(None, 0)] * 2, [str(tmp_path / 'a'), str(tmp_path / 'b')]
    )
  assert not list(tmp_path.iterdir())  # nothing written
