"""Pieces of a step that a pack of seeds (`jax.vmap`) runs once per seed.

Under `jax.vmap` XLA compiles a reduction over a batched shape, and its
vectorised order can differ from the same reduction in a run alone: the
seeds of a pack then drift from their runs alone by rounding, and after a
few hundred steps by whole points of accuracy. The few reductions where
that happened (the loss, the classifier's bias gradient, the 1x1 convs'
weight gradients on the CPU) are wrapped in `each_in_turn`: under `vmap` it
calls the function once per seed, unrolled, so each seed runs the program
of a run alone. They are small or a fraction of the step (docs/packs.md).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def each_in_turn(fn: Callable) -> Callable:
  """`fn`, whose `jax.vmap` calls it once per index (unrolled) and stacks
  the results, instead of batching its operations. Not differentiable by
  itself: use it inside a `jax.custom_vjp`'s forward and backward."""
  fn = jax.custom_batching.custom_vmap(fn)

  @fn.def_vmap
  def rule(axis_size, in_batched, *args):
    outs = [
      fn(*(a[i] if b else a for a, b in zip(args, in_batched, strict=True)))
      for i in range(axis_size)
    ]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *outs)
    return stacked, jax.tree.map(lambda _: True, stacked)

  return fn
