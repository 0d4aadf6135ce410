"""The classifier for the CPU path: `nn.Dense` whose weight gradients are
summed in an order the shapes fix, once per seed of a pack.

`nn.Dense`'s variables (`kernel`, `bias`), initialisers and outputs. Its one
change is the backward of the weights:
- the kernel gradient `x^T dy` is a sum over the batch; as a `dot_general`
  XLA:CPU's matrix product cuts it into pieces by the thread count (7.6e-6
  apart between 1 and 2 threads at batch 256 x 1,280 x 10 on an AMD EPYC,
  0 on the Intel CPU the 1x1 convs were first measured on). It is the fused
  reduction of the 1x1 convs' weight gradient (`depthwise._kernel_gradient`),
  one loop per entry;
- the bias gradient is XLA's reduction over the batch, and under `jax.vmap`
  (a pack of seeds) XLA:CPU vectorises a batched reduction differently from
  the one of a run alone (1.5e-5 after one step at the sweep's shapes).
Both run once per seed (`per_seed.each_in_turn`), each the program of a run
alone. Batch x 1,280 x classes work: no measurable cost.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from mnv2_flax.cpu import depthwise
from mnv2_flax.runtime import per_seed


def _rows(a):
  """(rows, features): every axis but the last as rows."""
  return a.reshape(-1, a.shape[-1])


def _weight_gradients(x, dy):
  """(kernel, bias) gradients, each summed over the rows in one loop."""
  kernel = depthwise._kernel_gradient(  # pylint: disable=protected-access
    _rows(x)[:, None, None, :], _rows(dy)[:, None, None, :]
  )
  return kernel, jnp.sum(_rows(dy), axis=0)


@jax.custom_vjp
def affine(x, kernel, bias):
  """x @ kernel + bias over the last axis of x."""
  y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y + bias


def _affine_fwd(x, kernel, bias):
  return affine(x, kernel, bias), (x, kernel)


def _affine_bwd(residuals, dy):
  x, kernel = residuals
  dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  dkernel, dbias = per_seed.each_in_turn(_weight_gradients)(x, dy)
  return dx, dkernel.astype(kernel.dtype), dbias.astype(dy.dtype)


affine.defvjp(_affine_fwd, _affine_bwd)


class Dense(nn.Module):
  """`nn.Dense`'s fields that `models.MobileNetV2` sets, same variables."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.linear.default_kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      'kernel', self.kernel_init, (x.shape[-1], self.features), self.param_dtype
    )
    bias = jnp.zeros((self.features,), self.param_dtype)
    if self.use_bias:
      bias = self.param(
        'bias', self.bias_init, (self.features,), self.param_dtype
      )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return affine(x, kernel, bias)
