"""One process of the multi-process training test (checkpointing_test.py).

  python tests/multiprocess_worker.py DATA_DIR WORKDIR PROCESS_ID NUM_PROCS \
      PORT [OUT]

With NUM_PROCS > 1 it joins a `jax.distributed` job on 127.0.0.1:PORT (CPU
collectives over gloo); with 1 it trains alone on the devices it was given
and, given OUT, restores the checkpoint with `checkpointing.restore` and
saves its variables there (npz, keys 'params/...').

The signal test (preemption_test.py) sets MNV2_TEST_EPOCHS,
MNV2_TEST_SAVE_EVERY and MNV2_TEST_CACHE (a compilation cache) for a longer
run; a run stopped by a
signal prints `STOPPED <step>` and exits with the CLI's status.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]


def main(data_dir, workdir, process_id, num_processes, port, out=None):
  from absl import logging
  import jax

  logging.set_verbosity(logging.INFO)  # 'Resuming from step ...'

  jax.config.update('jax_disable_most_optimizations', True)
  if num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes, process_id)
  from fake_data import tiny_config

  from mnv2_flax import checkpointing
  from mnv2_flax.runtime import preemption
  from mnv2_flax.train import train_lib

  # 3 steps of 16 images (4 per device). The base rate is tiny: the gradients
  # are large at TF-slim's initialisation on noise images and a real step
  # makes float32 rounding grow; tiny steps keep the comparison exact while
  # the momentum traces still hold every step's averaged gradient.
  config = tiny_config(
    data_dir, num_epochs=float(os.environ.get('MNV2_TEST_EPOCHS', 1.5))
  )
  config.train.compilation_cache_dir = os.environ.get('MNV2_TEST_CACHE', '')
  config.data.batch_size = 16
  config.data.process_sharding = 'batch'  # the global batches of 1 process
  config.optim.learning_rate = 1e-5
  config.optim.schedule = 'constant'
  config.optim.warmup_epochs = 0.0
  config.checkpoint.every_steps = int(os.environ.get('MNV2_TEST_SAVE_EVERY', 2))
  try:
    result = train_lib.train_and_evaluate(config, workdir)
  except preemption.Stopped as e:
    print('STOPPED', e, flush=True)
    sys.exit(e.exit_code)
  if out and num_processes == 1:
    import numpy as np

    _, variables = checkpointing.restore(workdir)
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    np.savez(
      out,
      **{'/'.join(str(k.key) for k in path): x for path, x in flat},
    )
  print(
    'RESULT',
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    result['steps'],
    flush=True,
  )


if __name__ == '__main__':
  main(
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    int(sys.argv[4]),
    int(sys.argv[5]),
    *sys.argv[6:],
  )
