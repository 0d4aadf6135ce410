"""Compiles a training run's programs in a child process, into the cache.

On XLA:CPU a program runs slower in a process that has itself compiled a
large program than in one that loaded its programs from JAX's persistent
compilation cache. On this project's 2-core machine: the quickstart's train
step took 93-107 ms compiled in the process and 75 ms loaded from the cache
(alternating runs); a process that loads the step from the cache, times it,
compiles an unrelated train step and times the first one again measured
94-109 ms before and 132-138 ms after. It is not page faults, context
switches or the heap the compiler leaves (`malloc_trim` does not restore
it), nor XLA's parallel code generation; the cause is unknown. So on CPU
`train_and_evaluate` has a child process compile the state initialiser, the
train step and (if the run evaluates before its last step) the eval step
into the persistent cache while it prepares the input, then loads them from
there: the training process compiles no large program before its last step.
A whole cold run of the quickstart recipe of the time (width 0.35, output
stride 8, 6.5 epochs; fresh kernel and XLA caches): 1,050 -> 1,400 training
images/s and 7 min 5 s -> 5 min 50 s, the same bits (reference step 92-94 ms
around both).

Only where it can help: CPU backend, one process, the persistent cache on
(`config.train.compilation_cache_dir`) and `config.train.compile_in_subprocess`.
If the child fails, the run compiles in-process as before, with a warning.

  python -m mnv2_flax.precompile  # the child; reads its job from stdin
"""

import ctypes
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import logging
import jax
import ml_collections

# The child never outlives a stuck compile by more than this.
_TIMEOUT_SECONDS = 1800


def wanted(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` asks for it and it can help here."""
  return bool(
    config.train.get('compile_in_subprocess', False)
    and config.train.get('compilation_cache_dir', '')
    and jax.default_backend() == 'cpu'
    and jax.process_count() == 1
  )


def _die_with_parent(parent: int) -> None:
  """In the child: killed if the training process dies (Linux)."""
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # it died before the line above
    sys.exit(1)


class Child:
  """A running child compile; `wait()` returns once the cache holds it."""

  def __init__(self, job: dict[str, Any]):
    self._log = tempfile.TemporaryFile()
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
      p for p in (package_root, env.get('PYTHONPATH')) if p
    )
    self._start = time.perf_counter()
    self._process = subprocess.Popen(
      [sys.executable, '-m', 'mnv2_flax.precompile'],
      stdin=subprocess.PIPE,
      stdout=self._log,
      stderr=subprocess.STDOUT,
      env=env,
    )
    self._process.stdin.write(pickle.dumps(dict(job, parent=os.getpid())))
    self._process.stdin.close()

  def wait(self) -> None:
    """Waits for the child; logs a warning with its output if it failed."""
    try:
      code = self._process.wait(timeout=_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
      code = None
    seconds = time.perf_counter() - self._start
    if code == 0:
      logging.info('Programs compiled in a child process in %.1f s.', seconds)
      return
    self._log.seek(0)
    output = self._log.read().decode(errors='replace')[-3000:]
    logging.warning(
      'Compiling in a child process failed (exit status %s after %.0f s); '
      'compiling in this process instead. Its output ends with:\n%s',
      code,
      seconds,
      output,
    )


def start(
  config: ml_collections.ConfigDict,
  num_classes: int,
  steps_per_epoch: int,
  train_batch: dict[str, jax.ShapeDtypeStruct],
  eval_batch: dict[str, jax.ShapeDtypeStruct] | None = None,
) -> Child | None:
  """Starts the child if `wanted(config)`; None otherwise.

  `train_batch`: the train batches' shapes and dtypes, unplaced
  (`input_pipeline.batch_spec(ds)`); `eval_batch` likewise for the eval
  step, which is compiled only if given. The child builds the same state,
  steps and arguments as `train_lib.train_and_evaluate`, so the programs have
  the same cache keys.
  """
  if not wanted(config):
    return None
  # pylint: disable=g-import-not-at-top
  from mnv2_flax import compilation_cache
  from mnv2_flax import native
  # pylint: enable=g-import-not-at-top

  # This process reads the cache that the child writes.
  compilation_cache.enable(config)
  native.load()  # built once here, not by both processes at once
  return Child(
    dict(
      config=config,
      num_classes=num_classes,
      steps_per_epoch=steps_per_epoch,
      train_batch=train_batch,
      eval_batch=eval_batch,
      cache_dir=config.train.compilation_cache_dir,
      # JAX's settings shape the programs and their cache keys (for example
      # jax_disable_most_optimizations): the child uses this process's.
      jax_config={
        k: v
        for k, v in jax.config.values.items()
        if isinstance(v, (bool, int, float, str, type(None)))
      },
    )
  )


def _compile(job: dict[str, Any]) -> None:
  """The child's work: the programs the training process will load."""
  # pylint: disable=g-import-not-at-top
  from mnv2_flax import compilation_cache
  from mnv2_flax import train_lib
  # pylint: enable=g-import-not-at-top

  for name, value in job['jax_config'].items():
    if jax.config.values.get(name) != value:
      try:
        jax.config.update(name, value)
      except Exception:  # pylint: disable=broad-exception-caught
        logging.info('Not set in the child: %s=%r', name, value)
  compilation_cache.enable_dir(job['cache_dir'])
  # Everything goes into the cache, however quick to compile.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  config = job['config']
  model = train_lib.create_model(config, job['num_classes'])
  learning_rate_fn = train_lib.create_learning_rate_fn(
    config, job['steps_per_epoch']
  )
  state = jax.device_put(
    train_lib.initial_train_state(config, model, learning_rate_fn),
    train_lib.replicated_sharding(),
  )

  def placed(batch):
    return {
      k: jax.ShapeDtypeStruct(
        v.shape, v.dtype, sharding=train_lib.batch_sharding()
      )
      for k, v in batch.items()
    }

  eval_batch = job['eval_batch']
  lowered = train_lib.lower_steps(
    config,
    train_lib.make_p_train_step(config, learning_rate_fn),
    train_lib.make_p_eval_step(config.data.eval_flip_average),
    state,
    placed(job['train_batch']),
    placed(eval_batch) if eval_batch else None,
  )
  for program in lowered.values():
    program.compile()


def main() -> None:
  from mnv2_flax import host_malloc  # pylint: disable=g-import-not-at-top

  host_malloc.configure()
  job = pickle.load(sys.stdin.buffer)
  _die_with_parent(job['parent'])
  _compile(job)


if __name__ == '__main__':
  main()
