"""Trains MobileNetV2: parses flags and calls train_lib.train_and_evaluate.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python train.py --config=configs/default.py --workdir=... \
      --config.optim.learning_rate=0.09

Multi-host: run one copy per process. jax.distributed is initialised on a
Cloud TPU VM, in a Slurm job of several tasks, with JAX_COORDINATOR_ADDRESS
set, or with --multiprocess / --coordinator_address (README, "GPU, TPU and
multi-host").
"""

from absl import flags
from ml_collections import config_flags

from mnv2_flax import cli
from mnv2_flax import defaults

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
  # A config mistake ends here, before the seconds TensorFlow and JAX take.
  defaults.check(_CONFIG.value)
  cli.start_jax(
    _CONFIG.value.train.compilation_cache_dir,
    gpu_deterministic_ops=_CONFIG.value.train.gpu_deterministic_ops,
    multiprocess=_MULTIPROCESS.value,
    coordinator=_COORDINATOR.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
  )
  from mnv2_flax import train_lib  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, _WORKDIR.value
  if config.train.seeds == 1:
    train_lib.train_and_evaluate(config, workdir)
    return
  configs, workdirs = train_lib.seed_pack(config, workdir)
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
