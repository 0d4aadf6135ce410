"""A run whose loss or state stops being finite: stopped, recorded, and not
resumed unchanged.

Every train step reports whether its loss and new state are finite
(`steps.train_step`'s 'finite' metric). The loop checks those flags before
it logs, evaluates or saves, so a non-finite state is never written over a
good checkpoint; `stop` records the step in `<workdir>/diverged.json` and
raises, and `check_resumable` refuses to resume that run with the same
config (it would diverge again).
"""

import contextlib
import os

from absl import logging
import jax
import ml_collections
import numpy as np

from mnv2_flax import checkpointing
from mnv2_flax.runtime import files

FILE = 'diverged.json'


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or Inf."""


def first_non_finite(metrics: list[dict], first_step: int) -> tuple | None:
  """(step, loss) of the first step whose loss or new state is not finite."""
  for i, m in enumerate(metrics):
    if not float(m['finite']):
      return first_step + i, float(m['loss'])
  return None


def stop(manager, config, workdir: str, step: int, loss: float) -> None:
  """Records the divergence in `workdir` and raises; nothing is saved."""
  checkpointing.wait_until_finished(manager)
  last = manager.latest_step()
  kept = (
    f'the last checkpoint, step {last} (finite: only finite states are '
    f'saved), is kept in {manager.directory}'
    if last is not None
    else 'no checkpoint was saved before it'
  )
  if jax.process_index() == 0:
    files.write_json(
      os.path.join(workdir, FILE),
      dict(step=step, loss=loss, last_checkpoint=last, config=config.to_dict()),
    )
  what = (
    f'the parameters are no longer finite (loss {loss:.4g})'
    if np.isfinite(loss)
    else f'the loss is {loss}'
  )
  raise TrainingDivergedError(
    f'training diverged at step {step}: {what}. Step {step} was not saved; '
    f'{kept}. Resuming needs a changed config, e.g. a lower '
    '--config.optim.learning_rate.'
  )


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run that diverged unless the config changed."""
  path = os.path.join(workdir, FILE)
  record = files.read_json(path)
  if not record:
    return
  changed = checkpointing.config_differences(record['config'], config)
  where = (
    f'this run diverged at step {record["step"]} (loss '
    f'{record["loss"]:.4g}, a non-finite state); its last checkpoint is step '
    f'{record["last_checkpoint"]}'
  )
  if not changed:
    raise TrainingDivergedError(
      f'{where}. With the same config it would diverge again: change the '
      f'config (e.g. --config.optim.learning_rate), or delete {path} to '
      'retry it unchanged.'
    )
  logging.warning('Resuming although %s; config changes: %s', where, changed)


def clear(workdir: str) -> None:
  """Forgets a divergence once the run has finished."""
  if jax.process_index() == 0:
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, FILE))
