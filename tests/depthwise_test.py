"""The fast CPU convs equal XLA's convs (grouped, 1x1), values and grads."""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax import depthwise
from mnv2_flax import models


def _grouped(x, k, strides, padding, dilation=(1, 1)):
  return lax.conv_general_dilated(
    x,
    k,
    strides,
    padding,
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=x.shape[-1],
  )


@pytest.mark.parametrize(
  'size, strides, padding, kernel, dilation',
  [
    (8, 1, 'SAME', 3, 1),
    (8, 2, 'SAME', 3, 1),
    (9, 2, 'SAME', 3, 1),
    (7, 1, 'VALID', 3, 1),
    (8, 2, ((1, 1), (1, 1)), 3, 1),
    (9, 2, ((1, 1), (1, 1)), 3, 1),
    (6, 2, ((0, 1), (2, 0)), 3, 1),
    # The written-out gradient for other kernels, strides and paddings
    # (a padding beyond the kernel's reach included).
    (11, 3, 'SAME', 5, 1),
    (10, 2, 'VALID', 5, 1),
    (7, 1, ((4, 0), (0, 3)), 2, 1),
    # Atrous (kernel-dilated) convs, as `output_stride` uses them, including
    # a rate whose taps reach past a small map.
    (8, 1, 'SAME', 3, 2),
    (4, 1, 'SAME', 3, 4),
    (9, 1, ((2, 2), (2, 2)), 3, 2),
    (11, 2, 'VALID', 3, (2, 3)),
    # Maps so small that some taps read only padding (left out), or all.
    (1, 1, 'SAME', 3, 1),
    (2, 2, 'SAME', 3, 1),
    (3, 1, ((3, 3), (3, 3)), 3, 3),
    (1, 3, ((5, 0), (5, 0)), 2, 1),
  ],
)
def test_outputs_and_gradients_equal_grouped_conv(
  size, strides, padding, kernel, dilation
):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, size, size + 1, 5))
  k = jax.random.normal(kk, (kernel, kernel, 1, 5))
  strides = (strides, strides)
  dilation = dilation if isinstance(dilation, tuple) else (dilation,) * 2
  ref = _grouped(x, k, strides, padding, dilation)
  out = depthwise.shifted_depthwise_conv(
    x,
    k,
    strides,
    padding,
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=5,
  )
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kg, ref.shape)

  def loss(fn, x, k):
    return jnp.sum(fn(x, k) * cotangent)

  shifted = functools.partial(
    depthwise.shifted_depthwise_conv,
    window_strides=strides,
    padding=padding,
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=5,
  )
  grads = jax.grad(functools.partial(loss, shifted), argnums=(0, 1))(x, k)
  ref_grads = jax.grad(
    functools.partial(
      loss, lambda x, k: _grouped(x, k, strides, padding, dilation)
    ),
    argnums=(0, 1),
  )(x, k)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_non_depthwise_falls_back_to_lax():
  x = jnp.ones((1, 6, 6, 4))
  k = jnp.ones((3, 3, 2, 4))  # two input channels per group
  out = depthwise.shifted_depthwise_conv(
    x,
    k,
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=2,
  )
  np.testing.assert_allclose(
    out,
    lax.conv_general_dilated(
      x,
      k,
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=2,
    ),
  )


def test_resolve_auto_per_backend():
  assert depthwise.resolve('auto') == (
    'shift' if jax.default_backend() == 'cpu' else 'xla'
  )
  assert depthwise.resolve('xla') == 'xla'


@pytest.mark.parametrize('padding', ['tf', 'torch'])
def test_models_agree_across_impls(padding):
  model = models.MobileNetV2(
    num_classes=10,
    width_multiplier=0.35,
    padding=padding,
    depthwise_impl='xla',
    dropout_rate=0.0,
  )
  x = jax.random.uniform(jax.random.key(0), (2, 35, 40, 3), minval=-1)
  variables = jax.jit(model.init)(jax.random.key(1), x)

  cotangent = jax.random.normal(jax.random.key(2), (2, 10))

  def loss(model, params):
    # Eval-mode BN keeps the function well conditioned for comparing grads;
    # the op-level test above covers the gradient of the conv itself.
    logits = model.apply({**variables, 'params': params}, x, train=False)
    return jnp.sum(logits * cotangent), logits

  (_, ref), ref_grads = jax.jit(
    jax.value_and_grad(functools.partial(loss, model), has_aux=True)
  )(variables['params'])
  shift = model.clone(depthwise_impl='shift')
  (_, out), grads = jax.jit(
    jax.value_and_grad(functools.partial(loss, shift), has_aux=True)
  )(variables['params'])
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  # Float32 rounding relative to the gradients' scale: some gradients are
  # analytically zero (a BN bias followed, through a conv, by another BN)
  # and only rounding noise remains in them.
  scale = max(float(np.abs(r).max()) for r in jax.tree.leaves(ref_grads))
  for g, r in zip(
    jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
  ):
    np.testing.assert_allclose(
      g, r, rtol=1e-3, atol=1e-4 * float(np.abs(r).max()) + 1e-5 * scale
    )
  # Same parameter tree whichever implementation runs.
  assert jax.tree.structure(
    jax.eval_shape(shift.init, jax.random.key(1), x)
  ) == jax.tree.structure(variables)


@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((0, 0), (0, 0))])
def test_pointwise_matmul_equals_1x1_conv(padding):
  kx, kk, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (2, 5, 6, 7))
  k = jax.random.normal(kk, (1, 1, 7, 4))
  dn = ('NHWC', 'HWIO', 'NHWC')

  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn)

  def matmul(x, k):
    return depthwise.pointwise_conv(x, k, (1, 1), padding, dimension_numbers=dn)

  np.testing.assert_allclose(matmul(x, k), conv(x, k), rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kg, (2, 5, 6, 4))
  grads = jax.grad(lambda x, k: jnp.sum(matmul(x, k) * cotangent), (0, 1))
  ref = jax.grad(lambda x, k: jnp.sum(conv(x, k) * cotangent), (0, 1))
  for g, r in zip(grads(x, k), ref(x, k), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  # Anything but a plain 1x1 stride-1 conv goes to lax unchanged.
  k3 = jax.random.normal(kk, (3, 3, 7, 4))
  np.testing.assert_array_equal(
    depthwise.pointwise_conv(x, k3, (1, 1), 'SAME', dimension_numbers=dn),
    lax.conv_general_dilated(x, k3, (1, 1), 'SAME', dimension_numbers=dn),
  )
  np.testing.assert_array_equal(
    depthwise.pointwise_conv(x, k, (2, 2), 'SAME', dimension_numbers=dn),
    lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=dn),
  )


@pytest.mark.parametrize(
  'size, strides, dilation, taps',
  [(1, 1, 1, 1), (2, 2, 1, 4), (4, 1, 4, 1), (8, 1, 1, 9)],
)
def test_taps_that_read_only_padding_are_left_out(
  size, strides, dilation, taps
):
  """1x1 maps, stride 2 on 2x2 maps and rates past the map use fewer taps."""
  x = jnp.ones((1, size, size, 4))
  k = jnp.ones((3, 3, 1, 4))
  jaxpr = jax.make_jaxpr(
    lambda x, k: depthwise.shifted_depthwise_conv(
      x,
      k,
      (strides, strides),
      'SAME',
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=4,
    )
  )(x, k)
  (call,) = [e for e in jaxpr.eqns if e.primitive.name == 'custom_vjp_call']
  image_slices = [
    e
    for e in call.params['call_jaxpr'].eqns
    if e.primitive.name == 'slice' and len(e.params['start_indices']) == 4
  ]
  assert len(image_slices) == taps
