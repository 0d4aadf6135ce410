"""The CPU classifier equals `nn.Dense`; a pack gives each seed's own bits."""

import flax.linen as nn
import jax
import numpy as np

from mnv2_flax.cpu import dense


def _value_and_grads(module, variables, x, dy):
  y, vjp = jax.vjp(lambda v, x: module.apply(v, x), variables, x)
  return y, *vjp(dy)


def _inputs(seeds=(), batch=6, features=40, classes=7):
  key = jax.random.key(0)
  kx, kd = jax.random.split(key)
  x = jax.random.normal(kx, (*seeds, batch, features))
  dy = jax.random.normal(kd, (*seeds, batch, classes))
  return x, dy


def test_same_variables_outputs_and_gradients_as_nn_dense():
  x, dy = _inputs()
  ours, flax_dense = dense.Dense(7), nn.Dense(7)
  variables = ours.init(jax.random.key(1), x)
  reference = flax_dense.init(jax.random.key(1), x)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, reference)
  for a, b in zip(
    jax.tree.leaves(variables), jax.tree.leaves(reference), strict=True
  ):
    np.testing.assert_array_equal(a, b)  # the same initialisers
  got = jax.jit(lambda v: _value_and_grads(ours, v, x, dy))(variables)
  want = jax.jit(lambda v: _value_and_grads(flax_dense, v, x, dy))(variables)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_no_bias():
  x, _ = _inputs()
  variables = dense.Dense(7, use_bias=False).init(jax.random.key(1), x)
  assert set(variables['params']) == {'kernel'}
  y = dense.Dense(7, use_bias=False).apply(variables, x)
  np.testing.assert_allclose(y, x @ variables['params']['kernel'], rtol=1e-6)


def test_vmapped_over_seeds_each_seed_has_its_bits_alone():
  x, dy = _inputs(seeds=(3,), batch=256, features=1280, classes=10)
  module = dense.Dense(10)
  variables = jax.vmap(lambda k: module.init(k, x[0]))(
    jax.random.split(jax.random.key(1), 3)
  )

  def fn(v, x, dy):
    return _value_and_grads(module, v, x, dy)

  packed = jax.jit(jax.vmap(fn))(variables, x, dy)
  alone = jax.jit(fn)
  for i in range(3):
    mine = jax.tree.map(lambda a, i=i: a[i], variables)
    for a, b in zip(
      jax.tree.leaves(alone(mine, x[i], dy[i])),
      jax.tree.leaves(packed),
      strict=True,
    ):
      np.testing.assert_array_equal(a, b[i])
