"""Trains MobileNetV2: parses flags and calls train_lib.train_and_evaluate.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python train.py --config=configs/default.py --workdir=... \
      --config.optim.learning_rate=0.09

Multi-host: run one copy per process. jax.distributed is initialised on a
Cloud TPU VM, in a Slurm job of several tasks, with JAX_COORDINATOR_ADDRESS
set, or with --multiprocess / --coordinator_address (README, "GPU, TPU and
multi-host").
"""

import contextlib
import os

from absl import flags
from ml_collections import config_flags

from mnv2_flax import cli
from mnv2_flax import defaults
from mnv2_flax.runtime import files
from mnv2_flax.runtime import hardware
from mnv2_flax.runtime import workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'ml_collections config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Checkpoints, metrics and results.'
)
_MULTIPROCESS = flags.DEFINE_bool(
  'multiprocess',
  None,
  'Call jax.distributed.initialize() (True) or not (False); default: on a '
  'Cloud TPU VM, in a Slurm job of several tasks, or with '
  'JAX_COORDINATOR_ADDRESS or --coordinator_address set.',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(
      f'unexpected arguments {argv[1:]}; flags take the form --name=value.'
    )
  # A config mistake or a workdir in use ends here, before the seconds
  # TensorFlow and JAX take and before anything is written.
  config, workdir = _CONFIG.value, _WORKDIR.value
  defaults.check(config)
  created = _missing_dirs(workdir)
  with contextlib.ExitStack() as held:
    if not hardware.multiprocess_reason(
      _MULTIPROCESS.value, _COORDINATOR.value
    ):
      # One process: it holds the workdir from here (the run holds it
      # again, re-entrantly). Several: process 0 locks it once JAX knows
      # which process it is.
      files.check_workdir(workdir)
      held.enter_context(workdir_lock.hold(workdir))
    try:
      _train(config, workdir)
    except BaseException:
      held.close()
      for directory in created:  # a refused run leaves no empty directory
        with contextlib.suppress(OSError):
          os.rmdir(directory)
      raise


def _missing_dirs(path: str) -> list[str]:
  """`path` and its ancestors that do not exist yet, deepest first."""
  missing, path = [], os.path.abspath(path)
  while not os.path.exists(path) and path != os.path.dirname(path):
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def _train(config, workdir):
  cli.start_jax(
    config.train.compilation_cache_dir,
    gpu_deterministic_ops=config.train.gpu_deterministic_ops,
    multiprocess=_MULTIPROCESS.value,
    coordinator=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
  )
  from mnv2_flax.train import members  # pylint: disable=g-import-not-at-top
  from mnv2_flax.train import train_lib  # pylint: disable=g-import-not-at-top

  if config.train.seeds == 1:
    train_lib.train_and_evaluate(config, workdir)
    return
  configs, workdirs = members.seed_pack(config, workdir)
  results = train_lib.train_seeds(configs, workdirs)
  failed = [
    (c.seed, r)
    for c, r in zip(configs, results, strict=True)
    if isinstance(r, Exception)
  ]
  if failed:
    cli.fail(
      f'{len(failed)} of {len(configs)} seeds failed; '
      + '; '.join(f'seed {seed}: {error}' for seed, error in failed)
    )


if __name__ == '__main__':
  cli.run(main)
