"""The fast CPU convs equal XLA's convs (grouped, 1x1), values and grads."""

import functools
import re

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax import models
from mnv2_flax.cpu import depthwise
from mnv2_flax.cpu import fast_path
from mnv2_flax.cpu import kernels

needs_kernels = pytest.mark.skipif(
  not kernels.available(),
  reason='the C++ kernels did not build here (no C++ compiler on PATH?)',
)

# Each fast path with lax.conv_general_dilated's signature.
FAST_CONVS = {
  'shift': depthwise.shifted_depthwise_conv,
  'native': depthwise.native_depthwise_conv,
}


def _custom_calls(fn, *args):
  """The names of the XLA FFI targets that `fn(*args)` lowers to."""
  text = jax.jit(fn).lower(*args).as_text()
  return set(re.findall(r'custom_call @(\w+)', text))


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
  'impl', ['shift', pytest.param('native', marks=needs_kernels)]
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
@pytest.mark.slow
def test_outputs_and_gradients_equal_grouped_conv(
  size, strides, padding, kernel, dilation, impl
):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, size, size + 1, 5))
  k = jax.random.normal(kk, (kernel, kernel, 1, 5))
  strides = (strides, strides)
  dilation = dilation if isinstance(dilation, tuple) else (dilation,) * 2
  ref = _grouped(x, k, strides, padding, dilation)
  fast = functools.partial(
    FAST_CONVS[impl],
    window_strides=strides,
    padding=padding,
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=5,
  )
  out = fast(x, k)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kg, ref.shape)

  def loss(fn, x, k):
    return jnp.sum(fn(x, k) * cotangent)

  grads = jax.grad(functools.partial(loss, fast), argnums=(0, 1))(x, k)
  ref_grads = jax.grad(
    functools.partial(
      loss, lambda x, k: _grouped(x, k, strides, padding, dilation)
    ),
    argnums=(0, 1),
  )(x, k)
  for g, r in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def _depthwise_fn(impl, strides=(1, 1), dilation=(1, 1)):
  return functools.partial(
    FAST_CONVS[impl],
    window_strides=strides,
    padding='SAME',
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=24,
  )


@needs_kernels
def test_native_kernel_runs_forward_and_backward():
  conv = _depthwise_fn('native')
  x, k = jnp.ones((1, 5, 5, 24)), jnp.ones((3, 3, 1, 24))
  assert _custom_calls(conv, x, k) == {'mnv2_depthwise_forward'}
  grad = jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), (0, 1))
  assert _custom_calls(grad, x, k) == {
    'mnv2_depthwise_forward',
    'mnv2_depthwise_backward',
  }


@needs_kernels
@pytest.mark.parametrize('strides, dilation', [(1, 1), (2, 1), (1, 2)])
def test_native_kernel_on_maps_split_across_threads(strides, dilation):
  """Rows come in several chunks, the kernel gradient in 16 partial sums."""
  kx, kk, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (4, 33, 34, 24))
  k = jax.random.normal(kk, (3, 3, 1, 24))
  conv = _depthwise_fn('native', (strides,) * 2, (dilation,) * 2)

  def ref(x, k):
    return _grouped(x, k, (strides,) * 2, 'SAME', (dilation,) * 2)

  np.testing.assert_allclose(conv(x, k), ref(x, k), rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kg, ref(x, k).shape)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) * cotangent), (0, 1)))
  ref_grad = jax.grad(lambda x, k: jnp.sum(ref(x, k) * cotangent), (0, 1))
  grads = grad(x, k)
  for g, r in zip(grads, ref_grad(x, k), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3)
  # The partial sums are added in a fixed order: bitwise reproducible.
  for g, again in zip(grads, grad(x, k), strict=True):
    np.testing.assert_array_equal(g, again)


@needs_kernels
def test_native_is_float32_only_and_vmaps():
  conv = _depthwise_fn('native')
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 24))
  k = jax.random.normal(jax.random.key(1), (3, 3, 1, 24))
  # bfloat16 takes the 'shift' path: no custom call, the same values.
  x16, k16 = x[0].astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  assert not _custom_calls(conv, x16, k16)
  np.testing.assert_array_equal(
    conv(x16, k16).astype(jnp.float32),
    _depthwise_fn('shift')(x16, k16).astype(jnp.float32),
  )
  # A vmapped call runs the kernel once per entry.
  np.testing.assert_allclose(
    jax.vmap(conv, (0, None))(x, k),
    jnp.stack([_grouped(xi, k, (1, 1), 'SAME') for xi in x]),
    rtol=1e-5,
    atol=1e-5,
  )


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


def test_conv_general_dilated_routes_each_conv_of_the_model():
  """Depthwise to the C++ kernel (or shift), 1x1 to a matmul, rest to lax."""
  dn = ('NHWC', 'HWIO', 'NHWC')
  x = jnp.ones((1, 6, 6, 4))

  def primitives(k, groups, strides=(1, 1)):
    jaxpr = jax.make_jaxpr(
      lambda x, k: depthwise.conv_general_dilated(
        x, k, strides, 'SAME', dimension_numbers=dn, feature_group_count=groups
      )
    )(x, k)
    return {e.primitive.name for e in jaxpr.eqns}

  depthwise_call = primitives(jnp.ones((3, 3, 1, 4)), 4)
  assert 'custom_vjp_call' in depthwise_call, depthwise_call
  assert 'conv_general_dilated' not in depthwise_call
  assert 'custom_vjp_call' in primitives(jnp.ones((1, 1, 4, 8)), 1)
  # The stem's dense 3x3 conv: XLA's, once per kernel under vmap.
  assert 'custom_vjp_call' in primitives(jnp.ones((3, 3, 4, 8)), 1, (2, 2))
  # A strided 1x1 conv.
  assert primitives(jnp.ones((1, 1, 4, 8)), 1, (2, 2)) == {
    'conv_general_dilated'
  }


@pytest.mark.parametrize(
  'kernel_shape, groups, strides, dilation',
  [
    pytest.param((3, 3, 1, 24), 24, (2, 2), (1, 1), marks=needs_kernels),
    pytest.param((3, 3, 1, 24), 24, (1, 1), (2, 2), marks=needs_kernels),
    ((3, 3, 5, 24), 1, (2, 2), (1, 1)),  # dense: the stem
    ((1, 1, 5, 24), 1, (1, 1), (1, 1)),  # pointwise: a matmul
  ],
)
def test_vmapped_kernels_give_each_kernels_own_bits(
  kernel_shape, groups, strides, dilation
):
  """A pack of seeds (`jax.vmap` over stacked kernels and inputs) computes
  each seed's output and gradients bit for bit as that seed alone: the
  C++ kernels loop over the stacked axis, dense convs run once per kernel
  (not as one grouped conv), 1x1 convs become batched matmuls."""
  conv = functools.partial(
    depthwise.conv_general_dilated,
    window_strides=strides,
    padding='SAME',
    rhs_dilation=dilation,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )
  channels = kernel_shape[2] * groups
  x = jax.random.normal(jax.random.key(0), (3, 2, 9, 9, channels))
  k = jax.random.normal(jax.random.key(1), (3, *kernel_shape))
  dy = jax.random.normal(jax.random.key(2), jax.vmap(conv)(x, k).shape)

  def value_and_grads(x, k, dy):
    y, vjp = jax.vjp(conv, x, k)
    return y, *vjp(dy)

  packed = jax.jit(jax.vmap(value_and_grads))(x, k, dy)
  alone = jax.jit(value_and_grads)
  for i in range(3):
    for a, b in zip(alone(x[i], k[i], dy[i]), packed, strict=True):
      np.testing.assert_array_equal(a, b[i])


def test_layers_only_on_the_cpu_backend_and_switched_off_by_env(monkeypatch):
  layers = fast_path.layers()
  assert set(layers) == {'conv', 'norm_act', 'dense'}
  # The same objects every call: two models built alike compare equal.
  assert fast_path.layers() == layers
  monkeypatch.setenv(fast_path.ENV_VAR, '0')
  assert fast_path.layers() == {}
  monkeypatch.delenv(fast_path.ENV_VAR)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert fast_path.layers() == {}


@pytest.mark.parametrize(
  'padding, kernels_built', [('tf', True), ('torch', True), ('tf', False)]
)
@pytest.mark.slow
def test_models_agree_with_flax_layers(padding, kernels_built, monkeypatch):
  if kernels_built and not kernels.available():
    pytest.skip('the C++ kernels did not build here')
  if not kernels_built:
    monkeypatch.setattr(kernels, 'available', lambda: False)
  model = models.MobileNetV2(
    num_classes=10, width_multiplier=0.35, padding=padding, dropout_rate=0.0
  )
  x = jax.random.uniform(jax.random.key(0), (2, 35, 40, 3), minval=-1)
  variables = jax.jit(model.init)(jax.random.key(1), x)

  cotangent = jax.random.normal(jax.random.key(2), (2, 10))

  def loss(model, params):
    # Eval-mode BN keeps the function well conditioned for comparing grads;
    # the op-level tests cover the gradients of the layers themselves.
    logits = model.apply({**variables, 'params': params}, x, train=False)
    return jnp.sum(logits * cotangent), logits

  (_, ref), ref_grads = jax.jit(
    jax.value_and_grad(functools.partial(loss, model), has_aux=True)
  )(variables['params'])
  # Float32 rounding relative to the gradients' scale: some gradients are
  # analytically zero (a BN bias followed, through a conv, by another BN)
  # and only rounding noise remains in them.
  scale = max(float(np.abs(r).max()) for r in jax.tree.leaves(ref_grads))
  fast = model.clone(**fast_path.layers())
  (_, out), grads = jax.jit(
    jax.value_and_grad(functools.partial(loss, fast), has_aux=True)
  )(variables['params'])
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  for g, r in zip(
    jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
  ):
    np.testing.assert_allclose(
      g, r, rtol=1e-3, atol=1e-4 * float(np.abs(r).max()) + 1e-5 * scale
    )
  # The same variables (names, shapes) whichever layers run.
  assert jax.tree.structure(
    jax.eval_shape(fast.init, jax.random.key(1), x)
  ) == jax.tree.structure(variables)
  calls = _custom_calls(lambda p: loss(fast, p)[1], variables['params'])
  assert bool(calls) == kernels_built, calls


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
