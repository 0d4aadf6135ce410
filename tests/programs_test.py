"""A run's programs: lowered once, compiled by a child only on a cache miss,
reused by the next seed in the same process."""

from fake_data import count_compiles
from fake_data import logged
from fake_data import tiny_config
import jax
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax.runtime import compilation_cache
from mnv2_flax.train import programs
from mnv2_flax.train import train_lib


def _train(config, workdir):
  return logged(lambda: train_lib.train_and_evaluate(config, str(workdir)))


@pytest.mark.slow
def test_a_child_compiles_on_a_miss_only_and_seeds_reuse_programs(
  data_dirs, tmp_path
):
  config = tiny_config(data_dirs[1], num_epochs=0.4)  # 2 steps
  config.train.compilation_cache_dir = str(tmp_path / 'cache')
  previous = jax.config.jax_compilation_cache_dir
  programs.forget()
  try:
    # Seed 0 on an empty cache: a child compiles the programs.
    _, miss_log = _train(config, tmp_path / 'seed0')
    # Seed 1 in a process that kept nothing: the cache has them, no child.
    programs.forget()
    config.seed = 1
    _, hit_log = _train(config, tmp_path / 'seed1')
    # Seed 1 again, right after: this process's programs, nothing compiled.
    (_, reuse_log), compiled = count_compiles(
      lambda: _train(config, tmp_path / 'again'), clear=False
    )
  finally:
    compilation_cache.enable_dir(previous)
  assert 'Programs compiled in a child process' in miss_log
  assert 'are in the compilation cache' in hit_log
  assert 'child process' not in hit_log
  assert 'Programs reused from an earlier run' in reuse_log
  assert compiled.total == 0, compiled.names  # nor the initialiser
  # Reused programs give the bits of freshly built ones.
  a = checkpointing.restore(str(tmp_path / 'seed1'))[1]
  b = checkpointing.restore(str(tmp_path / 'again'))[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
