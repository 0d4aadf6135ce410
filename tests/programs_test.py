"""A run's programs: lowered once, compiled by a child only on a cache miss."""

from fake_data import count_compiles
from fake_data import logged
from fake_data import tiny_config
import jax
import numpy as np

from mnv2_flax import checkpointing
from mnv2_flax import compilation_cache
from mnv2_flax import programs
from mnv2_flax import train_lib


def test_the_child_compiles_only_on_a_cache_miss(data_dirs, tmp_path):
  config = tiny_config(data_dirs[1], num_epochs=0.4)  # 2 steps
  config.train.compilation_cache_dir = str(tmp_path / 'cache')
  previous = jax.config.jax_compilation_cache_dir
  programs.forget()
  try:
    first, first_log = logged(
      lambda: train_lib.train_and_evaluate(config, str(tmp_path / 'a'))
    )
    programs.forget()  # as a new process would: only the disk cache left
    second, second_log = logged(
      lambda: train_lib.train_and_evaluate(config, str(tmp_path / 'b'))
    )
  finally:
    compilation_cache.enable_dir(previous)
  assert 'Programs compiled in a child process' in first_log
  assert 'are in the compilation cache' in second_log
  assert 'child process' not in second_log
  # The same programs: the same result, to the bit.
  assert first['top1'] == second['top1'] and first['finished']
  a = checkpointing.restore(str(tmp_path / 'a'))[1]
  b = checkpointing.restore(str(tmp_path / 'b'))[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_another_seed_reuses_the_programs_to_the_same_bits(data_dirs, tmp_path):
  config = tiny_config(data_dirs[1], num_epochs=0.4)  # 2 steps
  programs.forget()
  train_lib.train_and_evaluate(config, str(tmp_path / 'seed0'))
  config.seed = 1
  (_, log), compiled = count_compiles(
    lambda: logged(
      lambda: train_lib.train_and_evaluate(config, str(tmp_path / 'seed1'))
    ),
    clear=False,
  )
  assert 'Programs reused from an earlier run' in log
  assert 'jit(_fun)' not in compiled and 'jit(init)' not in compiled
  # Built afresh instead: the same bits.
  programs.forget()
  fresh = train_lib.train_and_evaluate(config, str(tmp_path / 'fresh'))
  assert fresh['top1'] >= 0
  a = checkpointing.restore(str(tmp_path / 'seed1'))[1]
  b = checkpointing.restore(str(tmp_path / 'fresh'))[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
