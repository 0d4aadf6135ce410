"""Seed packs: seeds trained as one program (`train_lib.train_seeds`)."""

import functools
import os
import shutil

from fake_data import logged
from fake_data import tiny_config
import jax
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax.cpu import kernels
from mnv2_flax.train import divergence
from mnv2_flax.train import train_lib
from mnv2_flax.train import training_state


def _config(data_dir, seed, **train):
  config = tiny_config(data_dir, num_epochs=0.4, **train)  # 2 steps
  config.seed = seed
  return config


def _leaves(workdir):
  _, variables = checkpointing.restore(workdir)
  return jax.tree.leaves(variables)


@pytest.mark.skipif(
  not kernels.available(),
  reason='no C++ compiler: the pure-JAX layers are batched by XLA in a pack',
)
@pytest.mark.slow
def test_a_pack_matches_its_seeds_trained_alone(data_dirs, tmp_path):
  """Each seed of a pack of 2 writes its own restorable workdir, with the
  parameters, statistics and test top-1 of that seed trained alone, bit for
  bit on the CPU fast path (its kernels run per seed under vmap; the stem
  conv, the loss and the reductions XLA would batch run once per seed)."""
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


def test_a_pack_refuses_configs_that_differ_beyond_its_member_fields(
  tmp_path,
):
  workdirs = [str(tmp_path / 'a'), str(tmp_path / 'b')]
  configs = [_config(None, 0), _config(None, 1)]
  configs[1].optim.momentum = 0.8
  with pytest.raises(ValueError, match='config.optim.momentum'):
    train_lib.train_seeds(configs, workdirs)
  with pytest.raises(ValueError, match='members of a pack must differ'):
    train_lib.train_seeds([_config(None, 0)] * 2, workdirs)
  configs = [_config(None, 0), _config(None, 0)]
  configs[1].optim.weight_decay = 0.0
  with pytest.raises(ValueError, match=r'weight_decay is \[0.002, 0.0\]'):
    train_lib.train_seeds(configs, workdirs)
  assert not list(tmp_path.iterdir())  # nothing written


def _member(data_dir, seed, lr, wd, ls, ema):
  config = _config(data_dir, seed)
  config.optim.update(
    learning_rate=lr, weight_decay=wd, label_smoothing=ls, ema_decay=ema
  )
  return config


@pytest.mark.skipif(
  not kernels.available(),
  reason='no C++ compiler: the pure-JAX layers are batched by XLA in a pack',
)
@pytest.mark.slow
def test_a_hyperparameter_pack_matches_its_members_trained_alone(
  data_dirs, tmp_path
):
  """Two members of one seed that differ in the learning rate, weight
  decay, label smoothing and EMA decay: each ends with the bits of its run
  alone (the four are the train step's arguments, elementwise per member),
  and the runs alone share one compiled program."""
  _, data_dir = data_dirs
  configs = [
    _member(data_dir, 0, 0.1, 2e-3, 0.0, 0.99),
    _member(data_dir, 0, 0.4, 4e-5, 0.1, 0.9),
  ]
  packed = [str(tmp_path / f'pack-{i}') for i in (0, 1)]
  results = train_lib.train_seeds(configs, packed)
  assert [r['pack'] for r in results] == [2, 2]
  logs = []
  for i, (config, result) in enumerate(zip(configs, results, strict=True)):
    alone = str(tmp_path / f'alone-{i}')
    mine, log = logged(
      functools.partial(train_lib.train_and_evaluate, config, alone)
    )
    logs.append(log)
    assert mine['top1'] == result['top1']
    for x, y in zip(_leaves(alone), _leaves(packed[i]), strict=True):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert 'Programs reused from an earlier run' in logs[1]
  first, second = _leaves(packed[0]), _leaves(packed[1])
  assert any(not np.allclose(x, y) for x, y in zip(first, second, strict=True))


@pytest.mark.slow
def test_a_diverging_seed_stops_alone_and_the_others_go_on(data_dirs, tmp_path):
  """Seed 1 resumes from a checkpoint whose weights were scaled by 1e30
  (finite, but its loss is not): it stops alone at its next step, its last
  finite checkpoint kept and the divergence returned; seed 0 finishes."""
  _, data_dir = data_dirs
  configs = []
  for seed in (0, 1):
    config = tiny_config(data_dir, num_epochs=0.8)  # 4 steps
    config.seed = seed
    config.checkpoint.every_steps = 1
    configs.append(config)
  workdirs = [str(tmp_path / f'seed-{s}') for s in (0, 1)]
  first = [c.copy_and_resolve_references() for c in configs]
  for config in first:
    config.train.stop_after_step = 1
  train_lib.train_seeds(first, workdirs)

  # Seed 1's step 1, its weights scaled by 1e30, saved again in its place.
  config = configs[1]
  model = training_state.create_model(config, 10)
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=5)
  manager = checkpointing.create_manager(workdirs[1], config)
  state, step = checkpointing.restore_latest(
    manager, training_state.abstract_train_state(config, model, lr), config
  )
  assert step == 1
  shutil.rmtree(os.path.join(workdirs[1], 'checkpoints', '1'))
  manager.reload()
  state = state.replace(params=jax.tree.map(lambda x: x * 1e30, state.params))
  checkpointing.save(manager, 1, state, config)
  checkpointing.wait_until_finished(manager)

  results = train_lib.train_seeds(configs, workdirs)
  assert isinstance(results[1], divergence.TrainingDivergedError)
  assert 'diverged at step 2' in str(results[1])
  assert sorted(os.listdir(os.path.join(workdirs[1], 'checkpoints'))) == ['1']
  assert results[0]['finished'] and results[0]['completed_steps'] == 4
  assert results[0]['pack'] == 2
