"""Depthwise and 1x1 convolutions for XLA's CPU backend, `nn.Conv`'s API.

XLA's grouped convolution (`feature_group_count == channels`) is slow on CPU:
a 3x3 depthwise conv forward and backward costs about as much as a dense conv
with 144 times its FLOPs (jax-ml/jax#23713, google/flax#4207). Three paths
replace XLA's convs here, each with `lax.conv_general_dilated`'s signature:

- `native_depthwise_conv`: the conv and both gradients in C++ loops
  (csrc/depthwise_cpu.cc, an XLA FFI custom call built by `kernels`) that read
  each tensor once; float32 where the kernels were built, else:
- `shifted_depthwise_conv`: kh * kw shifted, strided slices of the padded
  input times one kernel tap each, fused by XLA into one loop, with the
  gradients written out the same way (a custom VJP).
- `pointwise_conv`: a 1x1 stride-1 conv as a matrix multiply, its backward
  too.

Quickstart train step (w0.5/32 px/b128/output stride 16, medians of 3
alternating runs, 2026-11-30): C++ 78.5 ms, shifted 111.3 ms, XLA's grouped
conv 919.6 ms; without the 1x1 matmul 102.5 ms. Both depthwise paths are
custom VJPs without a forward-mode derivative: `jax.jvp` needs Flax's
`nn.Conv`. Outputs and gradients equal XLA's convs up to float rounding
(tests/cpu/depthwise_test.py).
"""

from collections.abc import Sequence
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mnv2_flax.cpu import kernels
from mnv2_flax.runtime import per_seed


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  **kwargs: Any,
) -> jax.Array:
  """`nn.Conv(conv_general_dilated=...)` for the CPU: every conv of the model.

  Plain NHWC depthwise convs run `native_depthwise_conv`, 1x1 stride-1 convs
  `pointwise_conv`, anything else `lax.conv_general_dilated`.
  """
  kernels.require_cpu('mnv2_flax.cpu.depthwise.conv_general_dilated')
  if kwargs.get('feature_group_count', 1) > 1:
    return native_depthwise_conv(lhs, rhs, window_strides, padding, **kwargs)
  if rhs.shape[:2] == (1, 1):
    return pointwise_conv(lhs, rhs, window_strides, padding, **kwargs)
  return dense_conv(lhs, rhs, window_strides, padding, **kwargs)


def dense_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  **kwargs: Any,
) -> jax.Array:
  """`lax.conv_general_dilated`, run once per kernel under `jax.vmap`.

  Alone it is XLA's conv. Vmapped over stacked kernels (a pack of seeds,
  `steps._train_fn`) JAX would make one grouped convolution of it, which
  XLA's CPU backend runs several times slower than the separate convs (the
  stem conv of a pack of 2: 5.7 ms against 2 x 0.3 ms, profiled); here the
  forward and both gradients run as one conv per kernel, each the program
  of a single run.
  """
  conv = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    **kwargs,
  )

  @jax.custom_vjp
  def forward(x, kernel):
    return per_seed.each_in_turn(conv)(x, kernel)

  def forward_fwd(x, kernel):
    return forward(x, kernel), (x, kernel)

  def forward_bwd(residuals, dy):
    return per_seed.each_in_turn(lambda x, k, g: jax.vjp(conv, x, k)[1](g))(
      *residuals, dy
    )

  forward.defvjp(forward_fwd, forward_bwd)
  return forward(lhs, rhs)


def shifted_depthwise_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  **kwargs: Any,
) -> jax.Array:
  """A depthwise conv of NHWC `lhs` with an HWIO `rhs` of shape (kh, kw, 1, C).

  Arguments follow `lax.conv_general_dilated`; anything other than a plain
  NHWC depthwise conv (input dilation, channel multiplier) goes to it
  unchanged. Kernel dilation (atrous convolution) is supported.
  """
  return _plain_depthwise(_depthwise, lhs, rhs, window_strides, padding, kwargs)


def native_depthwise_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  **kwargs: Any,
) -> jax.Array:
  """`shifted_depthwise_conv`'s contract, run by the C++ kernel in csrc/.

  float32 only, and only where the kernel was built (`kernels.available()`):
  anything else takes the 'shift' path. Forward and both gradients read each
  tensor once (no padded copies, one pass for all nine kernel-gradient taps).
  """
  core = _depthwise
  if kernels.available() and jnp.result_type(lhs, rhs) == jnp.float32:
    core = _native_depthwise
  return _plain_depthwise(core, lhs, rhs, window_strides, padding, kwargs)


def _plain_depthwise(core, lhs, rhs, window_strides, padding, kwargs):
  """core(x, kernel[:, :, 0], strides, padding, dilation) for a plain NHWC
  depthwise conv; lax.conv_general_dilated for anything else."""
  kh, kw, per_group, channels = rhs.shape
  lhs_dilation = kwargs.get('lhs_dilation')
  rhs_dilation = kwargs.get('rhs_dilation')
  plain = (
    per_group == 1
    and kwargs.get('feature_group_count', 1) == channels == lhs.shape[-1]
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and kwargs.get('preferred_element_type') is None
    and lhs.ndim == 4
    and _is_nhwc(kwargs.get('dimension_numbers'))
  )
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(
      lhs.shape[1:3], _extent((kh, kw), dilation), window_strides, padding
    )
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  strides = tuple(int(s) for s in window_strides)
  return core(lhs, rhs[:, :, 0], strides, padding, dilation)


def _extent(kernel_hw, dilation):
  """The window a dilated kernel spans: (k - 1) * d + 1 per axis."""
  return tuple(
    (k - 1) * d + 1 for k, d in zip(kernel_hw, dilation, strict=True)
  )


def _out_hw(x_hw, kernel_hw, strides, padding, dilation):
  """Output height and width of a conv of x_hw with explicit padding."""
  extent = _extent(kernel_hw, dilation)
  return tuple(
    (size + lo + hi - e) // s + 1
    for size, (lo, hi), e, s in zip(x_hw, padding, extent, strides, strict=True)
  )


def _tap(x, i, j, strides, out_hw):
  """x[:, i::sh, j::sw] cut to out_hw: what the tap at offset (i, j) sees."""
  (sh, sw), (out_h, out_w) = strides, out_hw
  end = (x.shape[0], i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1)
  return lax.slice(x, (0, i, j, 0), end + x.shape[3:], (1, sh, sw, 1))


def _reaches(offset, stride, count, data):
  """Whether rows offset + stride * o (o < count) meet the span `data`.

  `data` is (first row, number of rows) of `x` that are not zero padding. A
  tap whose rows all lie in the padding adds zeros and is left out: on small
  feature maps (1x1 or 2x2 at 32 pixels, or atrous rates past the map) most
  of the 9 taps are such.
  """
  first, size = data
  return any(first <= offset + stride * o < first + size for o in range(count))


def _tap_reaches(i, j, strides, out_hw, data):
  """Whether the tap at offset (i, j) reads any real (unpadded) entry."""
  (sh, sw), (out_h, out_w) = strides, out_hw
  return _reaches(i, sh, out_h, data[0]) and _reaches(j, sw, out_w, data[1])


def _taps(x, kernel, strides, dilation, out_hw, data):
  """The sum over taps of `_tap * kernel[i, j]`: one fused loop on CPU.

  `data`: ((first row, rows), (first column, columns)) of `x` that are not
  zero padding.
  """
  kh, kw, _ = kernel.shape
  (dh, dw), (out_h, out_w) = dilation, out_hw
  dtype = jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  shape = (x.shape[0], out_h, out_w, x.shape[3])
  # lax ops, not jnp's: this runs for every tap of every layer while tracing.
  taps = [
    lax.mul(
      _tap(x, i * dh, j * dw, strides, out_hw),
      lax.broadcast_in_dim(_entry(kernel, i, j), shape, (3,)),
    )
    for i in range(kh)
    for j in range(kw)
    if _tap_reaches(i * dh, j * dw, strides, out_hw, data)
  ]
  if not taps:
    return jnp.zeros(shape, dtype)
  return functools.reduce(lax.add, taps)


def _entry(kernel, i, j):
  """kernel[i, j] of a (kh, kw, C) kernel, as lax slices."""
  row = lax.index_in_dim(kernel, i, axis=0, keepdims=False)
  return lax.index_in_dim(row, j, axis=0, keepdims=False)


def _padded(x, padding):
  """x zero-padded, and the span of its real rows and columns."""
  (top, bottom), (left, right) = padding
  data = ((top, x.shape[1]), (left, x.shape[2]))
  config = ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
  return lax.pad(x, jnp.zeros((), x.dtype), config), data


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x, kernel, strides, padding, dilation):
  out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, padding, dilation)
  x, data = _padded(x, padding)
  return _taps(x, kernel, strides, dilation, out_hw, data)


def _depthwise_fwd(x, kernel, strides, padding, dilation):
  return _depthwise(x, kernel, strides, padding, dilation), (x, kernel)


def _depthwise_bwd(strides, padding, dilation, residuals, dy):
  """Both gradients as shifted multiply-adds, like the forward pass.

  Autodiff of the forward's slices gives one padded copy of `dy` per tap
  (9 pads of full tensors summed); written out, the input gradient is the
  stride-1 depthwise correlation of `dy` (dilated by the stride, padded) with
  the flipped kernel, and the kernel gradient one product-sum per tap.
  """
  x, kernel = residuals
  kh, kw, _ = kernel.shape
  eh, ew = _extent((kh, kw), dilation)
  (top, _), (left, _) = padding
  (sh, sw), (h, w) = strides, x.shape[1:3]
  out_h, out_w = dy.shape[1:3]
  zero = jnp.zeros((), dy.dtype)
  front = (eh - 1 - top, ew - 1 - left)
  dilated = lax.pad(
    dy,
    zero,
    (
      (0, 0, 0),
      (front[0], h + top - sh * (out_h - 1) - 1, sh - 1),
      (front[1], w + left - sw * (out_w - 1) - 1, sw - 1),
      (0, 0, 0),
    ),
  )
  # The span of `dy` in `dilated` (a negative front padding crops it).
  dy_data = tuple(
    (max(lo, 0), lo + s * (n - 1) + 1 - max(lo, 0))
    for lo, s, n in zip(front, strides, dy.shape[1:3], strict=True)
  )
  flipped = lax.rev(kernel, (0, 1))
  dx = _taps(dilated, flipped, (1, 1), dilation, (h, w), dy_data)
  dx = dx.astype(x.dtype)
  x, data = _padded(x.astype(dy.dtype), padding)

  def tap_gradient(i, j):
    i, j = i * dilation[0], j * dilation[1]
    if not _tap_reaches(i, j, strides, (out_h, out_w), data):
      return jnp.zeros(kernel.shape[2:], jnp.float32)
    product = lax.mul(_tap(x, i, j, strides, (out_h, out_w)), dy)
    return lax.reduce_sum(
      lax.convert_element_type(product, jnp.float32), (0, 1, 2)
    )

  dkernel = jnp.stack(
    [tap_gradient(i, j) for i in range(kh) for j in range(kw)]
  )
  return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _native_attrs(strides, padding, dilation):
  (sh, sw), (dh, dw), ((top, _), (left, _)) = strides, dilation, padding
  return dict(
    stride_h=np.int64(sh),
    stride_w=np.int64(sw),
    dilation_h=np.int64(dh),
    dilation_w=np.int64(dw),
    pad_top=np.int64(top),
    pad_left=np.int64(left),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _native_depthwise(x, kernel, strides, padding, dilation):
  out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, padding, dilation)
  out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, x.shape[3]), x.dtype)
  call = jax.ffi.ffi_call(
    'mnv2_depthwise_forward', out, vmap_method='broadcast_all'
  )
  return call(x, kernel, **_native_attrs(strides, padding, dilation))


def _native_depthwise_fwd(x, kernel, strides, padding, dilation):
  y = _native_depthwise(x, kernel, strides, padding, dilation)
  return y, (x, kernel)


def _native_depthwise_bwd(strides, padding, dilation, residuals, dy):
  x, kernel = residuals
  shapes = (
    jax.ShapeDtypeStruct(x.shape, x.dtype),
    jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
  )
  call = jax.ffi.ffi_call(
    'mnv2_depthwise_backward', shapes, vmap_method='broadcast_all'
  )
  dx, dkernel = call(x, kernel, dy, **_native_attrs(strides, padding, dilation))
  return dx, dkernel


_native_depthwise.defvjp(_native_depthwise_fwd, _native_depthwise_bwd)


def pointwise_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  **kwargs: Any,
) -> jax.Array:
  """A 1x1, stride-1 NHWC conv as a matrix multiply (its backward too).

  Arguments follow `lax.conv_general_dilated`; any other conv goes to it
  unchanged. XLA's CPU backend runs the weight-gradient convolutions of 1x1
  convs far below its matrix-multiply speed; as a `dot_general` all three
  products (forward, input and weight gradients) are matrix multiplies.
  """
  dilations = (kwargs.get('lhs_dilation'), kwargs.get('rhs_dilation'))
  no_padding = isinstance(padding, str) or all(
    tuple(p) == (0, 0) for p in padding
  )
  plain = (
    rhs.shape[:2] == (1, 1)
    and kwargs.get('feature_group_count', 1) == 1
    and all(s == 1 for s in window_strides)
    and all(d == 1 for dilation in dilations for d in (dilation or (1, 1)))
    and no_padding
    and kwargs.get('preferred_element_type') is None
    and lhs.ndim == 4
    and _is_nhwc(kwargs.get('dimension_numbers'))
  )
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return _matmul(lhs, rhs[0, 0], kwargs.get('precision'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, kernel, precision):
  return lax.dot_general(x, kernel, (((3,), (0,)), ((), ())), precision)


def _matmul_fwd(x, kernel, precision):
  return _matmul(x, kernel, precision), (x, kernel)


def _matmul_bwd(precision, residuals, dy):
  """dx = dy W^T and dW = X^T dy over all N*H*W rows.

  The barrier keeps `dy` (the BatchNorm backward's output) a plain row-major
  buffer: without it XLA fuses that elementwise computation into a transposed
  copy for the weight gradient, the costliest op of a 224-pixel train step
  (340 of ~3,400 ms at width 1.0, batch 32).
  """
  x, kernel = residuals
  dy = lax.optimization_barrier(dy)
  dx = lax.dot_general(dy, kernel, (((3,), (1,)), ((), ())), precision)
  dkernel = per_seed.each_in_turn(_kernel_gradient)(x, dy)
  return dx, dkernel.astype(kernel.dtype)


def _kernel_gradient(x, dy):
  """X^T dy over all N*H*W rows, summed in an order the shapes fix.

  As a `dot_general` (Eigen's contraction on XLA:CPU) a sum over tens of
  thousands of rows is cut into pieces by the number of threads, so its
  bits depended on the thread count (up to 3e-4 apart between 1 and 2
  threads at the sweep's shapes, and every weight after a few steps). As
  XLA's reduction of the broadcast product (fused: no rows x Cin x Cout
  temporary) each entry is one loop over the rows, whatever the threads,
  at 0.8-1.3x the dot's time (docs/reproducibility.md). Under `jax.vmap`
  (a pack) it runs once per seed, each the program of a run alone.
  """
  rows = dy.shape[0] * dy.shape[1] * dy.shape[2]
  x = x.reshape(rows, x.shape[3]).astype(jnp.float32)
  dy = dy.reshape(rows, dy.shape[3]).astype(jnp.float32)
  return jnp.sum(x[:, :, None] * dy[:, None, :], axis=0)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _is_nhwc(dimension_numbers: Any) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return (
      dimension_numbers.lhs_spec == (0, 3, 1, 2)
      and dimension_numbers.rhs_spec == (3, 2, 0, 1)
      and dimension_numbers.out_spec == (0, 3, 1, 2)
    )
  return tuple(dimension_numbers) == ('NHWC', 'HWIO', 'NHWC')
