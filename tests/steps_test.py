"""Several train steps per pmap call (`config.train.steps_per_call`)."""

from fake_data import count_compiles
from fake_data import tiny_config
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax.train import programs
from mnv2_flax.train import steps
from mnv2_flax.train import train_lib
from mnv2_flax.train import training_state


@pytest.mark.slow
def test_a_program_of_3_steps_equals_3_single_steps():
  config = tiny_config()
  # A small step size: at 0.1 this tiny model on random data turns the two
  # programs' different float rounding into 1e-4 differences within 3 steps.
  config.optim.learning_rate = 1e-3
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=10)
  model = training_state.create_model(config, 10)
  state = training_state.create_train_state(
    config, model, lr, jax.random.key(0)
  )
  rng = np.random.default_rng(0)
  batches = [
    {
      'image': rng.integers(0, 256, (1, 8, 32, 32, 3), np.uint8),
      'label': rng.integers(0, 10, (1, 8), np.int32),
    }
    for _ in range(3)
  ]
  hparams = training_state.hyperparameters(config)
  single = steps.make_p_train_step(config, lr)
  # Copies: the steps donate (free) the state they are given.
  one_by_one, losses = jax.tree.map(jnp.copy, state), []
  for batch in batches:
    one_by_one, metrics = single(one_by_one, batch, jax.random.key(1), hparams)
    losses.append(float(metrics['loss']))
  three = steps.make_p_train_step(config, lr, steps=3)
  together, metrics = three(state, tuple(batches), jax.random.key(1), hparams)
  assert metrics['loss'].shape == (3,)
  np.testing.assert_allclose(metrics['loss'], losses, rtol=1e-4)
  assert int(together.step) == int(one_by_one.step) == 3
  # Each leaf to 1e-3 of its largest value, plus 1e-4: the two programs sum
  # the gradients in different orders (BN bias gradients, sums over every
  # pixel, differ by up to 5e-4 of their scale; those near 0 by 2e-5); a
  # wrong batch, step or rng moves them by their whole scale.
  flat = jax.tree_util.tree_flatten_with_path(one_by_one)[0]
  for (path, x), y in zip(flat, jax.tree.leaves(together), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    diff, scale = np.abs(x - y).max(), np.abs(x).max()
    assert diff <= 1e-3 * scale + 1e-4, (jax.tree_util.keystr(path), diff)


@pytest.mark.slow
def test_a_run_with_steps_per_call_stops_at_every_eval_and_save(
  data_dirs, tmp_path
):
  # Calls of 3 steps take the run to steps 3 and 8; single steps reach the
  # eval and save steps 5 and 10.
  config = tiny_config(data_dirs[1], num_epochs=2.0, eval_every_steps=5)
  config.checkpoint.every_steps = 5
  config.train.log_every_steps = 5
  config.train.steps_per_call = 3
  result, compiled = count_compiles(
    lambda: train_lib.train_and_evaluate(config, str(tmp_path))
  )
  assert result['completed_steps'] == 10 and result['finished']
  # The 3-step program and the eval step ahead of time; the single step
  # once, at its first use (step 4).
  assert compiled.steps == 3 and compiled.steps_in_loop == 1, compiled.names
  steps = [p.name for p in (tmp_path / 'checkpoints').iterdir()]
  assert sorted(int(s) for s in steps if s.isdigit()) == [5, 10]


@pytest.mark.slow
def test_batchnorm_statistics_re_estimated_over_batches_are_pooled():
  """Two batches of 4 pooled give, at the stem, the statistics of the 8
  images as one batch: the variance includes the spread of the batches'
  means. Deeper layers see each batch normalised by its own statistics
  (training mode, as precise-BN has them), so theirs differ from one batch
  of 8 as much as the batches differ. A pack's members get their own."""
  config = tiny_config()
  config.model.bn_momentum = 0.0
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=10)
  still = training_state.create_model(config, 10)
  states = [
    training_state.create_train_state(config, still, lr, jax.random.key(s))
    for s in (0, 1)
  ]
  # Dark and bright halves: batches whose means differ.
  rng = np.random.default_rng(0)
  images = np.concatenate(
    [rng.integers(lo, lo + 128, (1, 4, 32, 32, 3)) for lo in (0, 128)], 1
  )
  batch = lambda lo, hi: {'image': images[:, lo:hi].astype(np.uint8)}
  alone = steps.make_p_batch_moments(still.apply, 'inception')
  whole = steps.pooled_statistics([alone(states[0], batch(0, 8))])
  halves = [alone(states[0], batch(lo, lo + 4)) for lo in (0, 4)]
  pooled = steps.pooled_statistics(halves)
  for name in ('mean', 'var'):
    np.testing.assert_allclose(
      pooled['stem_bn'][name], whole['stem_bn'][name], rtol=1e-5, atol=1e-6
    )
  # Not the average of the halves' variances: that misses the spread of
  # their means.
  averaged = (halves[0]['stem_bn']['var'] + halves[1]['stem_bn']['var']) / 2
  assert np.abs(averaged - whole['stem_bn']['var']).max() > 1e-3
  # Not the running averages (init: mean 0, var 1).
  assert np.abs(whole['stem_bn']['mean']).max() > 1e-3
  assert np.abs(whole['head_bn']['var'] - 1).max() > 1e-3

  packed = steps.make_p_batch_moments(still.apply, 'inception', pack=2)
  per_member = steps.pooled_statistics(
    [packed(programs.stack(states), batch(0, 8))]
  )
  second = steps.pooled_statistics([alone(states[1], batch(0, 8))])
  for member, got in ((0, whole), (1, second)):
    for a, b in zip(
      jax.tree.leaves(programs.unstack(per_member, member)),
      jax.tree.leaves(got),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pooled_statistics_keep_a_small_spread_under_a_large_mean():
  """Mean 10, std 0.01 in float32 batches: E[x^2] - E[x]^2 would lose it;
  pooled in float64 from each batch's mean and variance it is kept."""
  values = 10 + 0.01 * np.random.default_rng(0).standard_normal((4, 256, 3))
  values = values.astype(np.float32)
  per_batch = [
    {
      'bn': {
        'mean': b.mean(0),
        'var': b.var(0, dtype=np.float64).astype(np.float32),
      }
    }
    for b in values
  ]
  pooled = steps.pooled_statistics(per_batch)['bn']
  everything = values.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(pooled['mean'], everything.mean(0), rtol=1e-6)
  np.testing.assert_allclose(pooled['var'], everything.var(0), rtol=1e-3)
