"""The classifier for the CPU path: `nn.Dense` whose bias gradient is summed
once per seed of a pack.

`nn.Dense`'s variables (`kernel`, `bias`), initialisers and outputs. Its one
change is the backward of the bias: the sum of the output gradient over the
batch is XLA's reduction, and under `jax.vmap` (a pack of seeds) XLA:CPU
vectorises the batched reduction differently from the one of a run alone,
so a pack's classifier bias, then every weight, drifted from its seeds
alone by rounding (1.5e-5 after one step at the sweep's shapes). Here that
sum runs once per seed (`per_seed.each_in_turn`), each the program of a run
alone: a pack is bitwise its seeds alone. No effect on speed (a batch x
classes sum).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from mnv2_flax import per_seed


def _sum_rows(dy):
  return jnp.sum(dy, axis=tuple(range(dy.ndim - 1)))


@jax.custom_vjp
def add_bias(y, bias):
  """y + bias over the last axis; the bias gradient summed per seed."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, dy):
  return dy, per_seed.each_in_turn(_sum_rows)(dy)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """`nn.Dense`'s fields that `models.MobileNetV2` sets, same variables."""

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable[..., jax.Array] = nn.linear.default_kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      'kernel', self.kernel_init, (x.shape[-1], self.features), self.param_dtype
    )
    bias = None
    if self.use_bias:
      bias = self.param(
        'bias', self.bias_init, (self.features,), self.param_dtype
      )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(
      x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision
    )
    return y if bias is None else add_bias(y, bias)
