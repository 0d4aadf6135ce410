"""Orbax checkpoints: save, resume, and restore anywhere.

Layout of `<workdir>/checkpoints/<step>/` (plain orbax-checkpoint, readable
without this package):
  state/   the TrainState as a PyTree: step, params, batch_stats, opt_state,
           ema_params (StandardSave).
  config/  the experiment's ConfigDict as JSON (JsonSave).
Orbax writes each step to a temporary directory and renames it when complete,
so a save killed half-way never looks like a checkpoint. The position in the
data stream is the step itself: the train stream is a pure function of the
seed, and `create_train_dataset(start_step=...)` skips what was consumed.
"""

import json
import os
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

ITEMS = ('state', 'config')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model it is restored into."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(
  workdir: str, config: ml_collections.ConfigDict, read_only: bool = False
) -> ocp.CheckpointManager:
  """Keeps the latest `config.checkpoint.keep` plus the best by eval top-1."""
  policy = pp.AnyPreservationPolicy(
    [
      pp.LatestN(n=config.checkpoint.keep),
      pp.BestN(
        get_metric_fn=lambda m: m['top1'],
        n=1,
        keep_checkpoints_without_metrics=False,
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    create=not read_only,
    read_only=read_only,
    cleanup_tmp_directories=not read_only,
    enable_async_checkpointing=config.checkpoint.async_save,
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_names=ITEMS
  )


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  config: ml_collections.ConfigDict,
  metrics: dict[str, float] | None = None,
) -> None:
  """Saves the state and the config at `step` (asynchronously if enabled)."""
  if jax.process_count() > 1:
    # pmap's outputs are host-local arrays, replicated on this process's
    # devices; orbax needs global arrays to write them once for all hosts.
    state = jax.tree.map(
      ocp.utils.fully_replicated_host_local_array_to_global_array, state
    )
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict()),
    ),
    metrics=dict(metrics) if metrics else None,
    force=True,
  )


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/block_01/.../kernel': (shape, dtype)} of arrays or metadata."""
  if hasattr(tree, 'params'):  # a TrainState: compare its array fields only
    tree = {
      k: getattr(tree, k)
      for k in ('step', 'params', 'batch_stats', 'opt_state', 'ema_params')
    }
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = '/'.join(
      str(getattr(p, 'key', getattr(p, 'idx', getattr(p, 'name', p))))
      for p in path
    )
    flat[key] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
  return flat


_ORDER = ('params', 'batch_stats', 'ema_params', 'opt_state', 'step')


def _ordered(keys):
  """Parameters first: they name the layers that differ most readably."""

  def rank(key):
    head = key.split('/')[0]
    return (_ORDER.index(head) if head in _ORDER else len(_ORDER), key)

  return sorted(keys, key=rank)


def check_compatible(saved: Any, target: Any, where: str) -> None:
  """Raises naming every entry whose presence or shape differs."""
  saved_flat, target_flat = _flat_shapes(saved), _flat_shapes(target)

  problems = [
    f'{k}: checkpoint has {saved_flat[k][0]}, model expects {target_flat[k][0]}'
    for k in _ordered(saved_flat)
    if k in target_flat and saved_flat[k][0] != target_flat[k][0]
  ]
  problems += [
    f'{k}: only in the checkpoint'
    for k in _ordered(saved_flat)
    if k not in target_flat
  ]
  problems += [
    f'{k}: missing from the checkpoint'
    for k in _ordered(target_flat)
    if k not in saved_flat
  ]
  if problems:
    shown = problems[:12] + (
      [f'... and {len(problems) - 12} more'] if len(problems) > 12 else []
    )
    raise CheckpointMismatchError(
      f'{where} does not match the model ({len(problems)} entries differ; '
      'check width_multiplier, num_classes and the ablation knobs): '
      + '; '.join(shown)
    )


def _state_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved state's tree of array metadata (shapes, dtypes)."""
  path = os.path.join(str(manager.directory), str(step), 'state')
  return ocp.StandardCheckpointer().metadata(path).item_metadata


def restore_latest(
  manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict
) -> tuple[Any, int]:
  """Restores the latest complete checkpoint into `state`'s structure.

  Returns:
    (state, step); (the given state, 0) when there is no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return state, 0
  where = f'checkpoint {manager.directory}/{step}'
  check_compatible(_state_metadata(manager, step), state, where)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      config=ocp.args.JsonRestore(),
      state=ocp.args.StandardRestore(abstract),
    ),
  )
  changed = config_differences(restored['config'], config)
  if changed:
    logging.warning(
      'Resuming %s with a config that differs from the saved one: %s.',
      where,
      '; '.join(changed),
    )
  return restored['state'], step


def config_differences(
  saved: dict[str, Any], config: ml_collections.ConfigDict
) -> list[str]:
  """'config.field: saved -> now' for each field where `config` differs from
  a config saved as JSON (a tuple equals the list JSON made of it)."""
  flat_saved = traverse_util.flatten_dict(saved, sep='.')
  now = json.loads(json.dumps(config.to_dict()))
  flat_now = traverse_util.flatten_dict(now, sep='.')
  absent = object()
  return [
    f'config.{key}: {flat_saved.get(key, "(absent)")!r} -> '
    f'{flat_now.get(key, "(absent)")!r}'
    for key in sorted(set(flat_saved) | set(flat_now))
    if flat_saved.get(key, absent) != flat_now.get(key, absent)
  ]


def _abstract_from_metadata(metadata: Any) -> Any:
  """Shapes and dtypes of the saved arrays, placed on this host's device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
    metadata,
  )


def restore(
  path: str, step: int | None = None, target: Any = None
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Restores a checkpoint on whatever devices exist now.

  Args:
    path: a workdir, its `checkpoints` directory, or one step's directory.
    step: the step to restore; default: the latest.
    target: optional variables (`{'params', 'batch_stats', ...}`, arrays or
      shapes) of the model they are meant for; entries that differ in
      presence or shape raise `CheckpointMismatchError` naming them.

  Returns:
    (config, {'params', 'batch_stats', 'ema_params'}) with the arrays on the
    first local device.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'state')) and step is None:
    step = int(os.path.basename(path))
    path = os.path.dirname(path)
  elif os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No checkpoint directory at {path}.')
  with ocp.CheckpointManager(
    path, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True)
  ) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'{path} holds no complete checkpoint.')
    step = manager.latest_step() if step is None else step
    if step not in steps:
      raise ValueError(
        f'step={step} is not in {path}; available: {sorted(steps)}.'
      )
    metadata = _state_metadata(manager, step)
    keep = ('params', 'batch_stats', 'ema_params')
    metadata = {k: metadata[k] for k in keep}
    if target is not None:
      check_compatible(
        {k: metadata[k] for k in target if k in metadata},
        target,
        f'checkpoint {path}/{step}',
      )
    abstract = _abstract_from_metadata(metadata)
    saved = manager.restore(
      step,
      args=ocp.args.Composite(
        config=ocp.args.JsonRestore(),
        state=ocp.args.PyTreeRestore(
          item=abstract,
          restore_args=jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract
          ),
          partial_restore=True,
        ),
      ),
    )
  config = ml_collections.ConfigDict(saved['config'])
  return config, dict(saved['state'])
