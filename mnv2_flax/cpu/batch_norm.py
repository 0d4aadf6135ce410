"""BatchNorm (+ ReLU6) with a hand-written backward, for the CPU path.

`nn.BatchNorm`'s variables (params `scale`, `bias`; batch_stats `mean`,
`var`), statistics (float32, two-pass variance as with
`use_fast_variance=False`, averaged over `axis_name`) and running-average
update, with an optional ReLU6 inside one custom VJP. Autodiff of
`nn.BatchNorm` + `nn.relu6` keeps the centred input and the activation as
residuals and runs its backward as several passes over the full tensor (on
XLA's CPU backend about half of a 224-pixel train step is such elementwise
work); here the backward keeps only the input, recomputes the normalised
value and the ReLU6 mask, and is two reductions and one elementwise pass:

  g = dy * [0 < z < 6]
  dx = scale / sigma * (g - mean(g) - x_hat * mean(g * x_hat))

with the means over the whole (cross-device) batch. Where `kernels` built
csrc/batch_norm_cpu.cc, the batch statistics and the backward's two sums are
C++ custom calls that only read their inputs (XLA wrote x - mean and the
masked gradient as full-size temporaries). Quickstart train step (medians of
3 alternating runs, 2026-11-30): 78.5 ms with it, 96.0 ms with `nn.BatchNorm`
+ `nn.relu6`. Equal to `nn.BatchNorm` in outputs, updated statistics and
gradients up to float rounding (tests/cpu/batch_norm_test.py).
"""

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mnv2_flax.cpu import kernels

_AXES = (0, 1, 2)


def _apply_act(z, activation):
  return jax.nn.relu6(z) if activation == 'relu6' else z


def _device_sum(x, axis_name):
  """Sum over `axis_name`'s devices, added in device order.

  `lax.psum` adds in whatever order the all-reduce takes, which differs
  between 1 process x 4 devices and 2 processes x 2 devices; here every
  layout gives the same bits. It matters at ReLU6's kink: a channel whose
  input is often exactly 0 (a depthwise window of ReLU6 zeros) has z =
  bias - mean * mul there, and with near-zero bias and mean the last bit of
  the mean decides the mask for all of them.
  """
  return jnp.sum(lax.all_gather(x, axis_name), axis=0)


def _device_mean(x, axis_name):
  return _device_sum(x, axis_name) / lax.psum(1, axis_name)


def _mean(x, axis_name):
  mean = jnp.mean(x, _AXES)
  return mean if axis_name is None else _device_mean(mean, axis_name)


def _channel_shapes(x, count):
  return tuple(
    jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32) for _ in range(count)
  )


def _stats(x, axis_name):
  """Mean and two-pass variance over N, H, W (and `axis_name`), as
  `nn.BatchNorm(use_fast_variance=False)`.

  Native: this device's mean and variance from the C++ sums (two reads of x,
  no temporary), combined across devices exactly for equal per-device counts:
  var = mean_d(var_d + (mean_d - mean)^2).
  """
  # The C++ sums (csrc/batch_norm_cpu.cc) where they were built. They read
  # the float32 copy of x, so bfloat16 inputs take them too.
  if not kernels.available():
    mean = _mean(x, axis_name)
    return mean, _mean(jnp.square(x - mean), axis_name)
  call = jax.ffi.ffi_call(
    'mnv2_batch_norm_stats', _channel_shapes(x, 2), vmap_method='broadcast_all'
  )
  mean, var = call(x)
  if axis_name is None:
    return mean, var
  total_mean = _device_mean(mean, axis_name)
  var = _device_mean(var + jnp.square(mean - total_mean), axis_name)
  return total_mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x, scale, bias, epsilon, axis_name, activation, dtype):
  """(activation(BN(x)) in `dtype`, batch mean, batch variance)."""
  return _forward(x, scale, bias, epsilon, axis_name, activation, dtype)[0]


def _forward(x, scale, bias, epsilon, axis_name, activation, dtype):
  x32 = x.astype(jnp.float32)
  mean, var = _stats(x32, axis_name)
  mul = lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
  z = (x32 - mean) * mul + bias.astype(jnp.float32)
  y = _apply_act(z, activation).astype(dtype)
  return (y, mean, var), (x, mean, var, scale, bias)


def _backward(epsilon, axis_name, activation, dtype, residuals, cotangents):
  del dtype
  x, mean, var, scale, bias = residuals
  dy = cotangents[0].astype(jnp.float32)  # the statistics' are not used
  x32 = x.astype(jnp.float32)
  inv = lax.rsqrt(var + epsilon)
  mul = inv * scale.astype(jnp.float32)
  bias32 = bias.astype(jnp.float32)
  centred = x32 - mean
  x_hat = centred * inv
  g = dy
  if activation is not None:
    z = centred * mul + bias32
    # jax.nn.relu6's derivative: 1 strictly inside (0, 6), 0 elsewhere.
    g = jnp.where((z > 0) & (z < 6), dy, 0.0)
  if kernels.available():
    call = jax.ffi.ffi_call(
      'mnv2_batch_norm_grad_sums',
      _channel_shapes(x, 2),
      vmap_method='broadcast_all',
    )
    dbias, dscale_centred = call(
      x32, dy, mean, mul, bias32, relu6=np.bool_(activation is not None)
    )
    dscale = dscale_centred * inv
  else:
    dbias = jnp.sum(g, _AXES)
    dscale = jnp.sum(g * x_hat, _AXES)
  count = x.shape[0] * x.shape[1] * x.shape[2]
  total_dbias, total_dscale = dbias, dscale
  if axis_name is not None:
    count = count * lax.psum(1, axis_name)
    total_dbias = _device_sum(dbias, axis_name)
    total_dscale = _device_sum(dscale, axis_name)
  dx = mul * (g - total_dbias / count - x_hat * (total_dscale / count))
  return (
    dx.astype(x.dtype),
    dscale.astype(scale.dtype),
    dbias.astype(bias.dtype),
  )


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over NHWC's channels with ReLU6 optionally fused.

  Attributes follow `nn.BatchNorm` (`use_fast_variance=False`); `activation`
  is None or `jax.nn.relu6` (`nn.relu6`), as `models.batch_norm_act` takes.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str | None = None
  activation: Callable[[jax.Array], jax.Array] | None = None
  # Accepted for the contract; these layers compute two-pass statistics
  # either way (the same up to float rounding; one pass saves nothing here).
  use_fast_variance: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    kernels.require_cpu('mnv2_flax.cpu.batch_norm.BatchNorm')
    if self.activation not in (None, jax.nn.relu6):
      raise ValueError(
        f'activation={self.activation!r} is not valid; expected None or '
        'nn.relu6.'
      )
    activation = None if self.activation is None else 'relu6'

    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    channels = x.shape[-1]
    ra_mean = self.variable(
      'batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), (channels,)
    )
    ra_var = self.variable(
      'batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), (channels,)
    )
    scale = self.param(
      'scale', nn.initializers.ones, (channels,), self.param_dtype
    )
    bias = self.param(
      'bias', nn.initializers.zeros, (channels,), self.param_dtype
    )
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    if use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      z = (x.astype(jnp.float32) - ra_mean.value) * mul + bias
      return _apply_act(z, activation).astype(dtype)
    y, mean, var = batch_norm_train(
      x, scale, bias, self.epsilon, self.axis_name, activation, dtype
    )
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var
    return y


def batch_norm_act(
  *, activation: Callable[[jax.Array], jax.Array] | None = None, **kwargs: Any
) -> BatchNorm:
  """`models.batch_norm_act`'s contract with ReLU6 fused into the BatchNorm."""
  return BatchNorm(activation=activation, **kwargs)
