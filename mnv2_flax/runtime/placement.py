"""Where the data-parallel steps' arguments live: one mesh, two shardings.

The pmap-ed steps (`steps.make_p_train_step`) and their `jit(shard_map)`
twins (`steps.sharded_steps`, for hardware this host does not have) take the
state replicated over a one-axis mesh and batches split along its axis:

  mesh = placement.device_mesh()          # this process's devices, axis AXIS
  state = jax.device_put(state, placement.replicated(mesh))
  batch = jax.device_put(batch, placement.split(mesh))
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

AXIS = 'batch'


def device_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A one-axis mesh (`AXIS`) over `devices`; default: this process's."""
  devices = jax.local_devices() if devices is None else devices
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def replicated(mesh: jax.sharding.Mesh | None = None):
  """How the state goes in (`in_axes=None`) and out of the pmap-ed steps."""
  return jax.sharding.NamedSharding(
    mesh or device_mesh(), jax.sharding.PartitionSpec()
  )


def split(mesh: jax.sharding.Mesh | None = None):
  """How batches go in (`in_axes=0`): the leading axis over the devices."""
  return jax.sharding.NamedSharding(
    mesh or device_mesh(), jax.sharding.PartitionSpec(AXIS)
  )


def placed(
  shapes: Mapping[str, Any], sharding: jax.sharding.Sharding
) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract arrays of `shapes` (anything with .shape and .dtype) placed
  with `sharding`: what `lower` needs to compile for placed arguments."""
  return {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
    for k, v in shapes.items()
  }


def per_process_batch_size(
  global_batch: int, field: str, process_count: int
) -> int:
  """Checks `global_batch` against the devices; returns this process's."""
  devices = jax.local_device_count() * process_count
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(
      f'{field}={global_batch} must be a positive multiple of '
      f'the global device count {devices} (for example '
      f'{devices * max(1, round(global_batch / devices))}).'
    )
  return global_batch // process_count
