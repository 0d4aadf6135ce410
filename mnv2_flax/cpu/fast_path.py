"""Fast paths for XLA's CPU backend, plugged into the model in one place.

Nothing here changes what the network computes, only how fast XLA's CPU
backend runs it; the model (`models.py`) and the loop (`train_lib.py`) do not
know it. The layers enter through `layers()`, called by
`training_state.create_model` when `config.train.cpu_fast_path` is on (the
default), and only on the CPU backend; `training_state` also asks for
`init_compiler_options()`, and `programs` has `precompile` compile the
steps. The allocator settings must precede JAX's CPU client, so the
command-line programs call `configure_host()` (in `cli.start_jax`)
first. `MNV2_FLAX_CPU=0` in the environment turns all of it off.

  fast_path.configure_host()  # first in a script, before JAX runs anything
  model = models.MobileNetV2(num_classes=10, **fast_path.layers())

Where the C++ kernels cannot be built (no compiler), one warning is logged
and the pure-JAX versions of the same layers run. What each piece buys:
docs/performance_cpu.md.
"""

import functools
import os
from typing import Any

import flax.linen as nn
import jax

from mnv2_flax.cpu import batch_norm
from mnv2_flax.cpu import dense
from mnv2_flax.cpu import depthwise
from mnv2_flax.cpu import host_malloc
from mnv2_flax.runtime import hardware

ENV_VAR = 'MNV2_FLAX_CPU'

# One object each, so that models built twice compare (and hash) equal.
_CONV = functools.partial(
  nn.Conv, conv_general_dilated=depthwise.conv_general_dilated
)


def _switched_off() -> bool:
  return os.environ.get(ENV_VAR, '1') == '0'


def configure_host() -> bool:
  """glibc malloc settings that let XLA:CPU reuse its step buffers.

  For the CPU backend only: a no-op where
  `hardware.accelerator_expected()` (the host then only feeds the input
  pipeline), with `MNV2_FLAX_CPU=0`, outside Linux/glibc, or once JAX has
  started (it must run first); True if applied. See `host_malloc`.
  """
  if _switched_off() or hardware.accelerator_expected():
    return False
  return host_malloc.configure()


def init_compiler_options() -> dict[str, Any] | None:
  """XLA options for the state initialiser's program; None off CPU.

  It runs once but is large (a random draw per parameter): on 2 CPU cores
  XLA compiled it in 17 s at its default optimisation level, in 3-5 s with
  LLVM's optimisations off. The values are deterministic either way; they
  differ from the optimised program's by float32 rounding (up to 3e-8).
  """
  if not enabled():
    return None
  return {
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True,
  }


def enabled() -> bool:
  """On the CPU backend, unless `MNV2_FLAX_CPU=0`."""
  return not _switched_off() and jax.default_backend() == 'cpu'


def layers() -> dict[str, Any]:
  """`MobileNetV2` fields for the CPU: `conv`, `norm_act` and `dense`.

  Returns {} (Flax's layers) where `enabled()` is False. Variables, their
  names and the results are those of Flax's layers, up to float rounding.
  """
  if not enabled():
    return {}
  return dict(conv=_CONV, norm_act=batch_norm.batch_norm_act, dense=dense.Dense)
