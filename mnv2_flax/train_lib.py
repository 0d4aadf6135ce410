"""The training loop: restore, then train, log, evaluate and save.

  result = train_lib.train_and_evaluate(config, workdir)

The rooms it calls: `training_state` (model, optimizer, state), `steps` (the
pmap-ed train and eval steps), `programs` (compiled ahead of time, through
the persistent cache), `checkpointing` (Orbax), `divergence` (non-finite
states), `reporting` (TensorBoard events, results.json) and
`input_pipeline` (tfds; the only one that imports TensorFlow).
"""

from collections.abc import Callable
import contextlib
import math
import os
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnv2_flax import checkpointing
from mnv2_flax import defaults
from mnv2_flax import divergence
from mnv2_flax import files
from mnv2_flax import finetune
from mnv2_flax import hardware
from mnv2_flax import input_pipeline
from mnv2_flax import placement
from mnv2_flax import preemption
from mnv2_flax import programs
from mnv2_flax import reporting
from mnv2_flax import steps
from mnv2_flax import training_state
from mnv2_flax import workdir_lock

TrainingDivergedError = divergence.TrainingDivergedError


def check_config(config: ml_collections.ConfigDict) -> None:
  """`defaults.check`, and batch sizes that split over the processes."""
  defaults.check(config)
  for field in ('batch_size', 'eval_batch_size'):
    placement.per_process_batch_size(
      config.data[field], f'config.data.{field}', jax.process_count()
    )


def evaluate(p_eval_step: Callable, state, eval_ds) -> dict[str, float]:
  """Runs the eval split once; returns mean loss, top-1, top-5 (raw, EMA)."""
  totals = None
  for batch in input_pipeline.prefetch_to_device(eval_ds, placement.split()):
    sums = p_eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(lambda x: float(np.asarray(x)), totals)
  count = totals.pop('count')
  out = {k: v / count for k, v in totals.items()}
  out['num_examples'] = count
  return out


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Args:
    config: the experiment (fields: `mnv2_flax.defaults`).
    workdir: checkpoints, TensorBoard events, model statistics and results.

  Returns:
    The final eval metrics, with the run's wall, train and eval seconds.
  """
  wall_start = time.perf_counter()
  run = _Run(config, workdir)  # checks and locks: nothing written yet
  with run.lock, preemption.Watch() as watch:
    return _train(run, watch, wall_start)


def _train(run: '_Run', watch: preemption.Watch, wall_start: float) -> dict:
  """The loop of `train_and_evaluate`, in the workdir `run` holds."""
  config, workdir = run.config, run.workdir
  if run.finished():
    return files.read_json(run.results_path)
  state, start_step = run.restore()
  model_stats = reporting.write_model_stats(
    config, run.model, run.meta.num_classes, workdir
  )
  train_ds = input_pipeline.create_train_dataset(
    run.builder, config, start_step=start_step
  )
  eval_ds = input_pipeline.create_eval_dataset(run.builder, config)
  evaluates_early = config.train.eval_every_steps < run.num_steps
  state, p_train_step, p_eval_step, batches = programs.prepare(
    config,
    run.model,
    run.learning_rate_fn,
    run.steps_per_epoch,
    state,
    lambda: input_pipeline.prefetch_to_device(
      input_pipeline.started(train_ds), placement.split()
    ),
    input_pipeline.batch_spec(train_ds),
    input_pipeline.batch_spec(eval_ds) if evaluates_early else None,
  )
  writer = reporting.create_writer(config, workdir, start_step)
  progress = periodic_actions.ReportProgress(
    num_train_steps=run.num_steps,
    writer=writer,
    every_steps=config.train.log_every_steps,
  )
  call = _StepCaller(config, run.learning_rate_fn, p_train_step, batches)

  eval_metrics, pending, eval_seconds = {}, [], 0.0
  loop_start, done, calls, signalled = time.perf_counter(), start_step, 0, False
  while done < run.num_steps:
    state, metrics, n = call(state, done, run.num_steps)
    pending.append(metrics)
    for _ in range(n):
      done += 1
      progress(done)  # clu's periodic actions want every step
    due = _due(done, run.num_steps, config)
    # Every process asks at every call (multi-process: a collective choice).
    if watch.stop_requested(calls) and done < run.num_steps:
      signalled = True
      due |= {'log', 'save', 'stop'}
    calls += 1
    if due:  # reading the steps' flags waits for them, as a save does
      pending = reporting.per_step(pending)
      bad = divergence.first_non_finite(pending, done - len(pending) + 1)
      if bad:
        divergence.stop(run.manager, config, workdir, *bad)
    if 'log' in due:
      reporting.log_train(
        writer, pending, done, run.num_steps, run.steps_per_epoch
      )
      pending = []
    if 'eval' in due:
      eval_start = time.perf_counter()
      with progress.timed('eval'):
        eval_metrics = evaluate(p_eval_step, state, eval_ds)
      eval_seconds += time.perf_counter() - eval_start
      reporting.log_eval(writer, done, eval_metrics)
    if 'save' in due:
      checkpointing.save(
        run.manager,
        done,
        state,
        config,
        eval_metrics if 'eval' in due else None,
      )
    if 'stop' in due:
      if not signalled:
        logging.info('Stopping after step %d as configured.', done)
      break

  train_seconds = time.perf_counter() - loop_start - eval_seconds
  checkpointing.wait_until_finished(run.manager)
  writer.flush()
  result = run.finish(
    dict(
      eval_metrics,
      train_seconds=train_seconds,
      eval_seconds=eval_seconds,
      images_per_second=(done - start_step)
      * config.data.batch_size
      / max(train_seconds, 1e-9),
      **model_stats,
      **(
        {'stopped': {'signal': watch.signal_name, 'step': done}}
        if signalled
        else {}
      ),
    ),
    wall_start,
  )
  if signalled:
    raise watch.stopped(done)
  return result


class _Run:
  """What a run is built from, checked before anything is written."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    check_config(config)
    hardware.check_accelerator(config.train.require_accelerator)
    files.check_workdir(workdir)
    self.lock = contextlib.ExitStack()  # released when the run ends
    _lock_workdir(workdir, self.lock)
    try:
      self._build(config, workdir)
    except BaseException:
      self.lock.close()
      raise

  def _build(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    self.config, self.workdir = config, workdir
    self.builder = input_pipeline.get_builder(config)
    self.meta = input_pipeline.dataset_meta(self.builder, config)
    self.steps_per_epoch = _steps_per_epoch(
      config, self.meta.num_train_examples
    )
    self.num_steps = int(
      math.ceil(config.train.num_epochs * self.steps_per_epoch)
    )
    self.learning_rate_fn = training_state.create_learning_rate_fn(
      config, self.steps_per_epoch
    )
    self.model = training_state.create_model(config, self.meta.num_classes)
    self.manager = checkpointing.create_manager(workdir, config)
    self.results_path = os.path.join(workdir, reporting.RESULTS_FILE)

  def finished(self) -> bool:
    """Whether the run has finished before (then it is not run again)."""
    done = (self.manager.latest_step() or 0) >= self.num_steps
    if done and os.path.exists(self.results_path):
      logging.info('Already finished: %s', self.results_path)
      self.manager.close()
      return True
    return False

  def restore(self) -> tuple[training_state.TrainState | None, int]:
    """The latest checkpoint (before compiling: a checkpoint that does not
    fit stops here), else `config.init_from`'s weights, else None."""
    config = self.config
    divergence.check_resumable(self.workdir, config)
    state, start_step = checkpointing.restore_latest(
      self.manager,
      training_state.abstract_train_state(
        config, self.model, self.learning_rate_fn
      ),
      config,
      skip_corrupt=config.checkpoint.skip_corrupt,
    )
    if start_step:
      logging.info('Resuming from step %d of %d.', start_step, self.num_steps)
    elif config.init_from:
      state = finetune.load(
        training_state.initial_train_state(
          config, self.model, self.learning_rate_fn
        ),
        config,
      )
    return state, start_step

  def finish(self, result: dict[str, Any], wall_start: float) -> dict:
    """Adds the step counts and the run's fixed cost; writes results.json."""
    completed = self.manager.latest_step() or 0
    wall = time.perf_counter() - wall_start
    result.update(
      steps=self.num_steps,
      completed_steps=completed,
      finished=completed == self.num_steps,
      wall_seconds=wall,
      # Everything but training and evaluation: data set-up, restore,
      # compiles or cache loads, saves.
      fixed_seconds=wall - result['train_seconds'] - result['eval_seconds'],
    )
    reporting.write_json(self.results_path, result)
    if result['finished']:
      divergence.clear(self.workdir)
    return result


def _lock_workdir(workdir: str, stack: contextlib.ExitStack) -> None:
  """Process 0 holds the workdir's lock (`workdir_lock`) in `stack`; every
  process raises `DirectoryInUseError` if it could not."""
  error = None
  if jax.process_index() == 0:
    try:
      stack.enter_context(workdir_lock.hold(workdir))
    except workdir_lock.DirectoryInUseError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    if multihost_utils.broadcast_one_to_all(np.int32(error is not None)):
      error = error or workdir_lock.DirectoryInUseError(
        f'workdir {workdir} is in use: process 0 could not lock it.'
      )
  if error:
    raise error


class _StepCaller:
  """Runs `config.train.steps_per_call` steps per call where no log, eval,
  save or stop step comes first, single steps up to one."""

  def __init__(self, config, learning_rate_fn, p_train_step, batches):
    self.config, self.batches = config, batches
    self.per_call = config.train.steps_per_call
    self.p_steps = p_train_step
    self.p_step = (
      steps.make_p_train_step(config, learning_rate_fn)
      if self.per_call > 1
      else p_train_step
    )
    self.rng = jax.random.key(config.seed + 1)  # dropout

  def __call__(self, state, done: int, num_steps: int):
    """(new state, metrics, number of steps run)."""
    if self.per_call > 1 and _next_boundary(done, num_steps, self.config) >= (
      done + self.per_call
    ):
      batches = tuple(next(self.batches) for _ in range(self.per_call))
      return (*self.p_steps(state, batches, self.rng), self.per_call)
    return (*self.p_step(state, next(self.batches), self.rng), 1)


def _next_boundary(done: int, num_steps: int, config) -> int:
  """The first step after `done` that logs, evaluates, saves or stops."""
  every = (
    config.train.log_every_steps,
    config.train.eval_every_steps,
    config.checkpoint.every_steps,
  )
  ends = [num_steps] + [(done // n + 1) * n for n in every]
  if config.train.stop_after_step > done:
    ends.append(config.train.stop_after_step)
  return min(ends)


def _due(done: int, num_steps: int, config) -> set[str]:
  """What step `done` does besides training: log, eval, save, stop."""
  last = done == num_steps
  stop = done == config.train.stop_after_step
  due = set()
  if done % config.train.log_every_steps == 0 or last:
    due.add('log')
  if done % config.train.eval_every_steps == 0 or last:
    due.add('eval')
  if done % config.checkpoint.every_steps == 0 or last or stop:
    due.add('save')
  if stop:
    due.add('stop')
  return due


def _steps_per_epoch(config, num_train_examples: int) -> int:
  steps_ = num_train_examples // config.data.batch_size
  if steps_ == 0:
    raise ValueError(
      f'config.data.batch_size={config.data.batch_size} is larger than the '
      f'{num_train_examples} training examples.'
    )
  return steps_
