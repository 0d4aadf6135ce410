"""Depthwise convolution implementations with `lax.conv_general_dilated`'s API.

XLA's grouped convolution (`feature_group_count == channels`) is slow on CPU:
a 3x3 depthwise conv forward and backward costs about as much as a dense conv
with 144 times its FLOPs (jax-ml/jax#23713, google/flax#4207). Written as
kh * kw shifted, strided slices of the padded input times one kernel tap each,
it becomes a chain of elementwise multiply-adds that XLA fuses into one loop
on CPU; its gradient (slices, pads and reductions) is derived by autodiff.
Outputs and gradients equal the grouped convolution's up to float rounding
(tests/depthwise_test.py).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

IMPLS = ('auto', 'xla', 'shift')


def shifted_depthwise_conv(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: Any,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  precision: Any = None,
  **kwargs: Any,
) -> jax.Array:
  """A depthwise conv of NHWC `lhs` with an HWIO `rhs` of shape (kh, kw, 1, C).

  Arguments follow `lax.conv_general_dilated`; anything other than a plain
  NHWC depthwise conv (dilation, channel multiplier) goes to it unchanged.
  """
  kh, kw, per_group, channels = rhs.shape
  plain = (
    per_group == 1
    and feature_group_count == channels == lhs.shape[-1]
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and lhs.ndim == 4
    and _is_nhwc(dimension_numbers)
  )
  if not plain:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kwargs,
    )
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(
      lhs.shape[1:3], (kh, kw), window_strides, padding
    )
  (top, bottom), (left, right) = padding
  x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  sh, sw = window_strides
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = (
        lax.slice(
          x,
          (0, i, j, 0),
          (
            x.shape[0],
            i + sh * (out_h - 1) + 1,
            j + sw * (out_w - 1) + 1,
            channels,
          ),
          (1, sh, sw, 1),
        )
        * rhs[i, j, 0]
      )
      out = tap if out is None else out + tap
  return out


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
    and lhs.ndim == 4
    and _is_nhwc(kwargs.get('dimension_numbers'))
  )
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return lax.dot_general(
    lhs,
    rhs[0, 0],
    (((3,), (0,)), ((), ())),
    precision=kwargs.get('precision'),
    preferred_element_type=kwargs.get('preferred_element_type'),
  )


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


def resolve(impl: str) -> str:
  """'auto' is 'shift' on CPU and XLA's grouped conv elsewhere."""
  if impl == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def conv_fn(impl: str) -> Callable[..., jax.Array] | None:
  """The depthwise `nn.Conv(conv_general_dilated=...)` of an impl name."""
  return shifted_depthwise_conv if resolve(impl) == 'shift' else None


def pointwise_fn(impl: str) -> Callable[..., jax.Array] | None:
  """The 1x1 `nn.Conv(conv_general_dilated=...)`: a matmul with 'shift'."""
  return pointwise_conv if resolve(impl) == 'shift' else None
