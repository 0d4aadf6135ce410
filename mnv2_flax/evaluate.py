"""Evaluates a checkpoint: restores it and prints its eval metrics.

  python -m mnv2_flax.evaluate --workdir=workdirs/quickstart [--step=N]

The config saved beside the state says which model and data; fields it lacks
(a checkpoint written before they existed) take their defaults from
`mnv2_flax.defaults`; fields this version no longer has are ignored. Single
fields can be overridden (for example `--data_dir`).
"""

import json
import os

from absl import flags

from mnv2_flax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir or checkpoints.')
_STEP = flags.DEFINE_integer('step', None, 'Step; default: the latest.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Override tfds data_dir.')


def evaluate_checkpoint(
  path: str, step: int | None = None, data_dir: str | None = None
) -> dict[str, float]:
  """Restores `path` (a workdir or checkpoint dir) and evaluates it."""
  # pylint: disable=g-import-not-at-top
  from mnv2_flax import checkpointing
  from mnv2_flax import defaults
  from mnv2_flax.data import input_pipeline
  from mnv2_flax.data import prepare
  from mnv2_flax.train import steps
  from mnv2_flax.train import train_lib
  from mnv2_flax.train import training_state
  # pylint: enable=g-import-not-at-top

  config, variables = checkpointing.restore(path, step)
  config = defaults.with_defaults(config)
  if data_dir:
    config.data.data_dir = data_dir
  builder = prepare.get_builder(config)
  meta = prepare.dataset_meta(builder, config)
  model = training_state.create_model(config, meta.num_classes)
  return train_lib.evaluate(
    steps.make_p_eval_step(config),
    training_state.eval_state(model, variables),
    input_pipeline.create_eval_dataset(builder, config),
  )


def main(argv):
  if len(argv) > 1:
    cli.fail(
      f'unexpected arguments {argv[1:]}; flags take the form --name=value.'
    )
  if not os.path.exists(_WORKDIR.value):
    raise FileNotFoundError(
      f'No checkpoint directory at {_WORKDIR.value} (--workdir).'
    )
  cli.start_jax()
  metrics = evaluate_checkpoint(_WORKDIR.value, _STEP.value, _DATA_DIR.value)
  print(json.dumps(metrics, indent=2))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  cli.run(main)
