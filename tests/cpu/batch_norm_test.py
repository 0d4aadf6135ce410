"""The fused BatchNorm (+ ReLU6) equals nn.BatchNorm (+ nn.relu6)."""

import os

from fake_data import run_on_fake_devices
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax.cpu import batch_norm
from mnv2_flax.cpu import kernels

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = dict(momentum=0.9, epsilon=1e-3, use_running_average=False)


def _reference(activation, dtype=None, **kwargs):
  norm = nn.BatchNorm(use_fast_variance=False, dtype=dtype, **OPTIONS, **kwargs)
  if activation is None:
    return norm
  return nn.Sequential([norm, activation])


def _apply(module, variables, x):
  """(output, updated batch_stats) in train mode."""
  return module.apply(variables, x, mutable=['batch_stats'])


NATIVE_TARGETS = ('mnv2_batch_norm_stats', 'mnv2_batch_norm_grad_sums')


@pytest.mark.parametrize('activation', [None, nn.relu6])
@pytest.mark.parametrize(
  'dtype, sums',
  [
    (jnp.float32, 'native'),
    (jnp.float32, 'jax.numpy'),
    (jnp.bfloat16, 'native'),  # on the float32 copy of x
    (jnp.bfloat16, 'jax.numpy'),
  ],
)
@pytest.mark.slow
def test_equals_flax_batch_norm(activation, dtype, sums, monkeypatch):
  if sums == 'native' and not kernels.available():
    pytest.skip('the C++ kernels did not build here (no C++ compiler?)')
  if sums == 'jax.numpy':
    monkeypatch.setattr(kernels, 'available', lambda: False)
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 5, 6, 7)) + 1.0
  x = x.astype(dtype)
  fused = batch_norm.BatchNorm(activation=activation, dtype=dtype, **OPTIONS)
  ref = _reference(activation, dtype)
  variables = fused.init(jax.random.key(1), x)
  # Same variables; random scale and bias and non-trivial running stats.
  keys = iter(jax.random.split(jax.random.key(2), 4))
  variables = jax.tree.map(
    lambda v: v + jax.random.uniform(next(keys), v.shape), variables
  )
  ref_variables = (
    variables
    if activation is None
    else {k: {'layers_0': v} for k, v in variables.items()}
  )
  assert jax.tree.structure(
    jax.eval_shape(ref.init, jax.random.key(1), x)
  ) == jax.tree.structure(ref_variables)

  out, stats = _apply(fused, variables, x)
  ref_out, ref_stats = _apply(ref, ref_variables, x)
  assert out.dtype == ref_out.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=tol
  )
  for a, b in zip(
    jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # Eval mode, with the running statistics.
  eval_out = fused.clone(use_running_average=True).apply(variables, x)
  plain = _reference(None, dtype).clone(use_running_average=True)
  ref_eval = plain.apply(
    {k: v['layers_0'] for k, v in ref_variables.items()}
    if activation
    else ref_variables,
    x,
  )
  if activation:
    ref_eval = nn.relu6(ref_eval)
  np.testing.assert_allclose(
    np.asarray(eval_out, np.float32),
    np.asarray(ref_eval, np.float32),
    atol=tol,
  )

  # Gradients of x, scale and bias under a random cotangent.
  cotangent = jax.random.normal(jax.random.key(3), x.shape)

  def loss(module, variables, x):
    out, _ = _apply(module, variables, x)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  grads = jax.grad(loss, (1, 2))(fused, variables, x)
  hlo = jax.jit(jax.grad(loss, (1, 2)), static_argnums=0).lower(
    fused, variables, x
  )
  for target in NATIVE_TARGETS:
    assert (target in hlo.as_text()) == (sums == 'native')
  ref_grads = jax.grad(loss, (1, 2))(ref, ref_variables, x)
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  for a, b in zip(
    jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
  ):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


_PMAP_SCRIPT = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from mnv2_flax.cpu import batch_norm
opts = dict(momentum=0.9, epsilon=1e-3, use_running_average=False,
            axis_name='batch')
fused = batch_norm.BatchNorm(activation=nn.relu6, **opts)
ref = nn.Sequential([nn.BatchNorm(use_fast_variance=False, **opts), nn.relu6])
x = 3.0 * jax.random.normal(jax.random.key(0), (4, 2, 5, 6, 7)) + 1.0
cot = jax.random.normal(jax.random.key(3), x.shape)
single = batch_norm.BatchNorm(activation=nn.relu6,
                              **dict(opts, axis_name=None))
variables = single.init(jax.random.key(1), x[0])
variables = jax.tree.map(lambda v: v + 0.5, variables)
ref_vars = {{k: {{'layers_0': v}} for k, v in variables.items()}}

def step(module, variables, x, cot):
  def loss(variables, x):
    out, stats = module.apply(variables, x, mutable=['batch_stats'])
    return jnp.sum(out * cot), stats
  grad = jax.value_and_grad(loss, (0, 1), has_aux=True)
  (_, stats), grads = grad(variables, x)
  return stats, grads

out = {{}}
for name, module, v in (('fused', fused, variables), ('ref', ref, ref_vars)):
  stats, grads = jax.pmap(lambda x, c: step(module, v, x, c),
                          axis_name='batch')(x, cot)
  out[name] = [np.asarray(a).tolist() for a in jax.tree.leaves((stats, grads))]
print('RESULT' + json.dumps(out))
"""


@pytest.mark.slow
def test_cross_device_statistics_and_gradients_on_4_devices():
  """Under pmap the statistics and the input gradient span all devices."""
  out = run_on_fake_devices(_PMAP_SCRIPT.format(root=ROOT, tests=TESTS), 4)
  # Updated mean and var; gradients of the 4 variables and of x.
  assert len(out['fused']) == len(out['ref']) == 7
  for a, b in zip(out['fused'], out['ref'], strict=True):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.skipif(not kernels.available(), reason='no C++ kernels here')
def test_native_statistics_are_two_pass_accurate_far_from_zero():
  """A large mean and a small spread: mean((x - mean)^2), not E[x^2] - mean^2
  (which loses the variance entirely in float32 here)."""
  noise = jax.random.normal(jax.random.key(0), (8, 16, 16, 5))
  x = 1000.0 + 0.01 * noise
  _, mean, var = batch_norm.batch_norm_train(
    x, jnp.ones(5), jnp.zeros(5), 1e-3, None, None, jnp.float32
  )
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-7)
  np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=1e-3)


def test_unknown_activation_is_refused_by_name():
  with pytest.raises(ValueError, match='activation=<.*gelu.*not valid'):
    batch_norm.BatchNorm(use_running_average=False, activation=nn.gelu).init(
      jax.random.key(0), jnp.ones((1, 2, 2, 3))
    )


@pytest.mark.skipif(not kernels.available(), reason='no C++ kernels here')
@pytest.mark.parametrize('activation', [None, 'relu6'])
def test_vmapped_over_seeds_gives_each_seeds_own_bits(activation):
  """Under `jax.vmap` (a pack of seeds) the C++ sums run per seed: outputs,
  statistics and gradients are those of each seed alone, bit for bit."""
  x = 3 + jax.random.normal(jax.random.key(0), (3, 4, 5, 5, 16))
  scale = 1 + jax.random.normal(jax.random.key(1), (3, 16))
  bias = jax.random.normal(jax.random.key(2), (3, 16))
  dy = jax.random.normal(jax.random.key(3), x.shape)

  def run(x, scale, bias, dy):
    def output(x, scale, bias):
      return batch_norm.batch_norm_train(
        x, scale, bias, 1e-3, None, activation, jnp.float32
      )

    (y, mean, var), vjp = jax.vjp(output, x, scale, bias)
    zeros = jnp.zeros_like(mean)
    return y, mean, var, *vjp((dy, zeros, zeros))

  packed = jax.jit(jax.vmap(run))(x, scale, bias, dy)
  alone = jax.jit(run)
  for i in range(3):
    for a, b in zip(alone(x[i], scale[i], bias[i], dy[i]), packed, strict=True):
      np.testing.assert_array_equal(a, b[i])
