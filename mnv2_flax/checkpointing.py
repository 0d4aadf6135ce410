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

import contextlib
import glob
import json
import logging as stdlib_logging
import os
import shutil
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from mnv2_flax.runtime import tree_diff

ITEMS = ('state', 'config')


class CheckpointError(ValueError):
  """A checkpoint cannot be used or written; the message says what to do."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint does not fit the model it is restored into."""


class CorruptCheckpointError(CheckpointError):
  """A step directory is incomplete or its arrays cannot be read."""


class CheckpointSaveError(CheckpointError):
  """A save failed (disk full, permissions); the partial step is removed."""


# What a complete step holds (orbax writes the first last, on commit).
_COMPLETE_FILES = ('_CHECKPOINT_METADATA', 'state/_METADATA', 'config/metadata')
# Where `skip_corrupt` moves unreadable steps: beside `checkpoints/`, out of
# orbax's sight, nothing deleted.
CORRUPT_DIR = 'corrupt_checkpoints'
# Where a pack's seed keeps the steps it had saved past the others' latest
# (`set_aside_after`): the pack resumes all its seeds from one step.
AHEAD_DIR = 'checkpoints_ahead'


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
  if not read_only:  # what a killed or failed save left behind
    for path in remove_partial_saves(checkpoint_dir(workdir)):
      logging.warning('Removed %s, a save that did not finish.', path)
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
  """Saves the state and the config at `step` (asynchronously if enabled).

  Raises:
    CheckpointSaveError: not enough disk space for the state (checked before
      anything is written), or the write failed; the last complete step is
      kept and the partial one removed.
  """
  directory = str(manager.directory)
  needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) + 2**20
  try:
    free = shutil.disk_usage(directory).free
  except OSError:  # not a local file system: orbax reports what fails
    free = needed
  if free < needed:
    raise CheckpointSaveError(
      f'not enough disk space to save step {step} in {directory}: '
      f'{free / 2**20:.1f} MiB free, the checkpoint needs '
      f'{needed / 2**20:.1f} MiB. {_kept(manager)} Free some space and run '
      'the same command again to resume.'
    )
  if jax.process_count() > 1:
    # pmap's outputs are host-local arrays, replicated on this process's
    # devices; orbax needs global arrays to write them once for all hosts.
    state = jax.tree.map(
      ocp.utils.fully_replicated_host_local_array_to_global_array, state
    )
  try:
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict()),
      ),
      metrics=dict(metrics) if metrics else None,
      force=True,
    )
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, e) from None


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Waits for an asynchronous save; its failure as `CheckpointSaveError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_failed(manager, e) from None


def _complete_steps(manager: ocp.CheckpointManager) -> list[int]:
  return [s for s in manager.all_steps() if not step_problem(manager, s)]


def _kept(manager: ocp.CheckpointManager) -> str:
  steps = _complete_steps(manager)
  if not steps:
    return 'No checkpoint was completed before.'
  return f'The last complete checkpoint, step {max(steps)}, is kept.'


def first_line(error: BaseException) -> str:
  """The gist of a (possibly chained, multi-line TensorStore) error: the
  first line of its innermost cause, at most 300 characters."""
  error = _causes(error)[-1]
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def _causes(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from, outermost first."""
  chain = [error]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def remove_partial_saves(directory: str) -> list[str]:
  """Removes orbax's temporary directories of saves that did not finish."""
  partial = glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*'))
  if jax.process_index() == 0:
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
  return partial


def _save_failed(manager, error: Exception) -> CheckpointSaveError:
  """Cleans up after a failed save; the error that says what happened."""
  directory = str(manager.directory)
  try:  # other writes of the same save end (and fail) first
    manager.wait_until_finished()
  except Exception:  # pylint: disable=broad-except
    pass
  remove_partial_saves(directory)
  text = ' '.join(str(e) for e in _causes(error))
  cause = (
    'the disk is full'
    if 'No space left on device' in text or "os_error_code='28'" in text
    else first_line(error)
  )
  return CheckpointSaveError(
    f'saving a checkpoint in {directory} failed: {cause}. The partial save '
    f'was removed. {_kept(manager)} Fix the cause and run the same command '
    'again to resume.'
  )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/block_01/.../kernel': shape} of arrays or metadata."""
  if hasattr(tree, 'params'):  # a TrainState: compare its array fields only
    tree = {
      k: getattr(tree, k)
      for k in ('step', 'params', 'batch_stats', 'opt_state', 'ema_params')
    }
  return tree_diff.shapes(tree)


_ORDER = ('params', 'batch_stats', 'ema_params', 'opt_state', 'step')


def _rank(path: str) -> tuple[int, str]:
  """Parameters first: they name the layers that differ most readably."""
  head = path.split('/')[0]
  return (_ORDER.index(head) if head in _ORDER else len(_ORDER), path)


def check_compatible(saved: Any, target: Any, where: str) -> None:
  """Raises naming every entry whose presence or shape differs."""
  problems = tree_diff.diff(_shapes(target), _shapes(saved), key=_rank)
  if problems:
    raise CheckpointMismatchError(
      f'{where} does not match the model ({len(problems)} entries differ; '
      'check width_multiplier, num_classes and the ablation knobs): '
      + tree_diff.summarize(
        problems,
        12,
        missing='{path}: missing from the checkpoint',
        unexpected='{path}: only in the checkpoint',
        shape='{path}: checkpoint has {actual}, model expects {expected}',
      )
    )


def _state_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved state's tree of array metadata (shapes, dtypes)."""
  path = os.path.join(str(manager.directory), str(step), 'state')
  metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
  if not metadata:  # orbax only warns about an unreadable _METADATA
    raise ValueError(f'no array metadata in {path}')
  return metadata


def step_problem(manager: ocp.CheckpointManager, step: int) -> str | None:
  """Why step `step` cannot be a checkpoint, from its files; None if none."""
  step_dir = os.path.join(str(manager.directory), str(step))
  missing = [
    f for f in _COMPLETE_FILES if not os.path.isfile(os.path.join(step_dir, f))
  ]
  if missing:
    return f'incomplete (no {", ".join(missing)})'
  # The tree's metadata file parsed, not orbax's reader (0.5 s a step, for
  # every kept step of every member at each start): `restore_latest` reads
  # the restored step's metadata through orbax, to check shapes.
  try:
    with open(os.path.join(step_dir, 'state', '_METADATA')) as f:
      if not json.load(f).get('tree_metadata'):
        raise ValueError('no array metadata')
  except (OSError, ValueError) as e:
    return f'unreadable ({first_line(e)})'
  return None


def _previous_complete(manager: ocp.CheckpointManager, step: int) -> str:
  earlier = [s for s in _complete_steps(manager) if s < step]
  if not earlier:
    return 'There is no earlier complete checkpoint.'
  return f'Step {max(earlier)} is the previous complete one.'


def _corrupt(manager, step: int, problem: str, fix: str):
  return CorruptCheckpointError(
    f'checkpoint {manager.directory}/{step} is {problem}. '
    f'{_previous_complete(manager, step)} {fix}'
  )


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
  """The steps saved completely (`step_problem` finds nothing), ascending."""
  return sorted(_complete_steps(manager))


def set_aside_after(manager: ocp.CheckpointManager, step: int) -> list[str]:
  """Moves the steps after `step` to `AHEAD_DIR` beside the checkpoint
  directory (kept, not deleted); returns where they went."""
  return [
    _move_aside(manager, s, AHEAD_DIR)
    for s in sorted(manager.all_steps())
    if s > step
  ]


def _move_aside(
  manager: ocp.CheckpointManager, step: int, to: str = CORRUPT_DIR
) -> str:
  """Moves a step out of the checkpoint directory; returns where to."""
  directory = str(manager.directory)
  aside = os.path.join(os.path.dirname(directory), to, str(step))
  while os.path.exists(aside):
    aside += '_'
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.replace(os.path.join(directory, str(step)), aside)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(f'mnv2_flax: moved step {step}')
  manager.reload()
  return aside


def restore_latest(
  manager: ocp.CheckpointManager,
  target: Any,
  config: ml_collections.ConfigDict,
  skip_corrupt: bool = False,
) -> tuple[Any, int]:
  """Restores the latest complete checkpoint into `target`'s structure.

  Args:
    manager: the run's checkpoint manager.
    target: the TrainState to restore into: arrays or shapes (nothing is
      compiled); what differs raises `CheckpointMismatchError` before any
      array is read.
    config: the run's config; fields that differ from the saved one are
      logged.
    skip_corrupt: move incomplete or unreadable steps to `CORRUPT_DIR` and
      resume from the newest readable one; otherwise such a step raises
      `CorruptCheckpointError` naming the previous complete one.

  Returns:
    (state on the first local device, step); (None, 0) without checkpoints.
  """
  abstract = _on_first_device(target)
  for step in sorted(manager.all_steps(), reverse=True):
    where = f'checkpoint {manager.directory}/{step}'
    problem = step_problem(manager, step)
    if problem is None:
      check_compatible(_state_metadata(manager, step), target, where)
      try:
        restored = manager.restore(
          step,
          args=ocp.args.Composite(
            config=ocp.args.JsonRestore(),
            state=ocp.args.StandardRestore(abstract),
          ),
        )
      except Exception as e:  # pylint: disable=broad-except
        problem = f'unreadable ({first_line(e)})'
    if problem is None:
      changed = config_differences(restored['config'], config)
      if changed:
        logging.warning(
          'Resuming %s with a config that differs from the saved one: %s.',
          where,
          '; '.join(changed),
        )
      return restored['state'], step
    if not skip_corrupt:
      raise _corrupt(
        manager,
        step,
        problem,
        'To resume from it, run again with '
        '--config.checkpoint.skip_corrupt=True (which moves this step to '
        f'{CORRUPT_DIR}/), or move {step}/ away yourself.',
      )
    logging.warning(
      '%s is %s; moved to %s, trying the previous step.',
      where,
      problem,
      _move_aside(manager, step),
    )
  return None, 0


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


def _on_first_device(tree: Any) -> Any:
  """The shapes and dtypes of `tree` (arrays, shapes or Orbax's metadata),
  as restore targets on this host's first device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree
  )


# What orbax warns of on every read-only restore: its options adjusted to
# read-only, and its own optional metadata file absent (which reads like
# corruption and is not).
_READ_ONLY_NOTICES = (
  'read_only=True, setting',
  'Given directory is read only',
  'Metadata file does not exist',
)


class _NoReadOnlyNotices(stdlib_logging.Filter):
  def filter(self, record: stdlib_logging.LogRecord) -> bool:
    return '/orbax/' not in record.pathname or not any(
      notice in str(record.msg) for notice in _READ_ONLY_NOTICES
    )


@contextlib.contextmanager
def _read_only_notices_off():
  """`restore` from a script or notebook without orbax's notices (the
  command lines filter them for the whole process: `cli`)."""
  logger, notices = stdlib_logging.getLogger('absl'), _NoReadOnlyNotices()
  logger.addFilter(notices)
  try:
    yield
  finally:
    logger.removeFilter(notices)


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
  with (
    _read_only_notices_off(),
    ocp.CheckpointManager(
      path,
      item_names=ITEMS,
      options=ocp.CheckpointManagerOptions(read_only=True),
    ) as manager,
  ):
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'{path} holds no complete checkpoint.')
    step = manager.latest_step() if step is None else step
    if step not in steps:
      raise ValueError(
        f'step={step} is not in {path}; available: {sorted(steps)}.'
      )
    fix = 'Restore another step (mnv2_flax.evaluate: --step=N).'
    problem = step_problem(manager, step)
    if problem:
      raise _corrupt(manager, step, problem, fix)
    metadata = _state_metadata(manager, step)
    keep = ('params', 'batch_stats', 'ema_params')
    metadata = {k: metadata[k] for k in keep}
    if target is not None:
      check_compatible(
        {k: metadata[k] for k in target if k in metadata},
        target,
        f'checkpoint {path}/{step}',
      )
    abstract = _on_first_device(metadata)
    try:
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
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupt(
        manager, step, f'unreadable ({first_line(e)})', fix
      ) from None
  config = ml_collections.ConfigDict(saved['config'])
  return config, dict(saved['state'])
