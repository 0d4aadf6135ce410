"""Prepares a config's dataset once, ahead of its runs: from local files or
ImageNet's tars as a run would, and the resized copy that
`config.data.resized_short_side` asks for (`mnv2_flax.data.resized`).

  python -m mnv2_flax.prepare_data --config=configs/default.py \\
    --config.data.resized_short_side=146
"""

import time

from absl import flags
from ml_collections import config_flags

from mnv2_flax import cli
from mnv2_flax import defaults

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config of the runs that will read the data.'
)


def main(argv):
  if len(argv) > 1:
    cli.fail(
      f'unexpected arguments {argv[1:]}; flags take the form --name=value.'
    )
  config = _CONFIG.value
  defaults.check_data(config)
  from mnv2_flax.data import prepare  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  builder = prepare.get_builder(config)
  splits = ', '.join(
    f'{name} {split.num_examples}'
    for name, split in builder.info.splits.items()
  )
  print(
    f'{builder.data_dir}: {splits} examples '
    f'(ready after {time.perf_counter() - start:.0f} s).'
  )


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run(main)
