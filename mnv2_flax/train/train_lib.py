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
import dataclasses
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
from mnv2_flax.data import input_pipeline
from mnv2_flax.data import prepare
from mnv2_flax.runtime import files
from mnv2_flax.runtime import hardware
from mnv2_flax.runtime import placement
from mnv2_flax.runtime import preemption
from mnv2_flax.runtime import workdir_lock
from mnv2_flax.train import divergence
from mnv2_flax.train import finetune
from mnv2_flax.train import members
from mnv2_flax.train import programs
from mnv2_flax.train import reporting
from mnv2_flax.train import resolutions
from mnv2_flax.train import steps
from mnv2_flax.train import training_state

TrainingDivergedError = divergence.TrainingDivergedError


def check_config(config: ml_collections.ConfigDict) -> None:
  """`defaults.check`, and batch sizes that split over the processes."""
  defaults.check(config)
  for field in ('batch_size', 'eval_batch_size'):
    placement.per_process_batch_size(
      config.data[field], f'config.data.{field}', jax.process_count()
    )


def evaluate(p_eval_step: Callable, state, eval_ds, pack: int = 0):
  """Runs the eval split once; returns mean loss, top-1, top-5 (raw, EMA).

  With `pack` = N (a state of N stacked seeds), a list of N such dicts.
  """
  totals = None
  for batch in input_pipeline.prefetch_to_device(eval_ds, placement.split()):
    sums = p_eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  if not pack:
    return _means(totals)
  return [_means({k: v[i] for k, v in totals.items()}) for i in range(pack)]


def _evaluate_splits(p_eval_step, state, eval_ds, minival_ds, pack: int):
  """Per seed (one for a plain run), the eval split's metrics and, with a
  minival split, its metrics as `minival_<name>`."""
  per_seed = evaluate(p_eval_step, state, eval_ds, pack)
  per_seed = per_seed if pack else [per_seed]
  if minival_ds is not None:
    held = evaluate(p_eval_step, state, minival_ds, pack)
    for metrics, m in zip(per_seed, held if pack else [held], strict=True):
      metrics.update({f'{reporting.MINIVAL}{k}': v for k, v in m.items()})
  return per_seed


def _means(totals: dict[str, Any]) -> dict[str, float]:
  totals = {k: float(v) for k, v in totals.items()}
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
  (result,) = train_seeds([config], [workdir])
  return result


def train_seeds(
  configs: list[ml_collections.ConfigDict], workdirs: list[str]
) -> list[dict[str, Any] | TrainingDivergedError]:
  """Trains configs that differ only in their seed and hyperparameters
  (`MEMBER_FIELDS`: the peak learning rate, weight decay, label smoothing,
  EMA decay) as one pack.

  The members' states are stacked on a leading axis and trained by one
  compiled program (`steps._train_fn`), their hyperparameters its
  arguments; each member reads its seed's data stream, and writes its own
  workdir exactly as `train_and_evaluate` would (checkpoints, events,
  results.json). Members that finished are skipped; one left trains alone.
  The others must resume from one step.

  Returns:
    Per seed, its result, or (packs only) the `TrainingDivergedError` that
    stopped it alone: its last finite checkpoint is kept, the others went
    on. A single run raises it.
  """
  wall_start = time.perf_counter()
  members.check_pack(configs, workdirs)
  with contextlib.ExitStack() as held:
    runs = []
    for config, workdir in zip(configs, workdirs, strict=True):
      run = _Run(config, workdir)  # checks and locks: nothing written yet
      held.enter_context(run.lock)
      runs.append(run)
    watch = held.enter_context(preemption.Watch())
    return _train(runs, watch, wall_start)


@dataclasses.dataclass
class _Member:
  """One member of a run (today a seed; a single run has one): its workdir
  and what the loop keeps for it between log, eval and save steps."""

  run: '_Run'
  index: int  # on the stacked axis of a pack
  name: str  # before its log lines in a pack ('seed 3: '), '' alone
  writer: Any
  logged: list[dict] = dataclasses.field(default_factory=list)
  eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  failure: TrainingDivergedError | None = None  # it stopped, the others not

  @property
  def active(self) -> bool:
    return self.failure is None


@dataclasses.dataclass
class _Loop:
  """What the members of a run share: one state (stacked for a pack), its
  compiled steps and data, the step counter's periodic actions."""

  run: '_Run'  # the first member's: the shared config and schedule
  pack: int  # members on the stacked axis; 0 for a single run
  start_step: int
  state: Any
  call: '_StepCaller'
  p_eval_step: Callable
  eval_ds: Any
  minival_ds: Any
  progress: periodic_actions.ReportProgress
  members: list[_Member]
  model_stats: dict[str, Any]

  def evaluate(self) -> None:
    for member, metrics in zip(
      self.members,
      _evaluate_splits(
        self.p_eval_step, self.state, self.eval_ds, self.minival_ds, self.pack
      ),
      strict=True,
    ):
      member.eval_metrics = metrics

  def evaluate_at_resolutions(self) -> None:
    """The final state at the other test sizes the config asks for
    (`resolutions`), into each member's metrics as `at_resolution` and
    `at_resolution_bn`: {size: metrics}."""
    config = self.run.config
    for key, size, per_member in resolutions.evaluate(
      config,
      self.run.builder,
      self.run.meta.num_classes,
      self.state,
      self.pack,
      lambda state, eval_ds, minival_ds: _evaluate_splits(
        self.p_eval_step, state, eval_ds, minival_ds, self.pack
      ),
    ):
      for member, metrics in zip(self.members, per_member, strict=True):
        member.eval_metrics.setdefault(key, {})[str(size)] = metrics
        logging.info(
          '%seval at %d px (trained at %d, BatchNorm statistics %s): top1 '
          '%.4f (EMA %.4f)',
          member.name,
          size,
          config.data.image_size,
          're-estimated' if key == 'at_resolution_bn' else 'as trained',
          metrics['top1'],
          metrics['ema_top1'],
        )

  def take_metrics(self, pending: list[dict], done: int) -> None:
    """The pending steps' metrics to each member's log; a member whose
    metrics turned non-finite stops there (a single run raises)."""
    for member, new in zip(
      self.members, _per_seed(pending, self.pack), strict=True
    ):
      bad = divergence.first_non_finite(new, done - len(new) + 1)
      if bad and member.active:
        member.failure = _diverged(member.run, bad, self.pack, member.name)
      member.logged += new

  def save(self, member: _Member, done: int, with_eval: bool) -> None:
    checkpointing.save(
      member.run.manager,
      done,
      programs.unstack(self.state, member.index) if self.pack else self.state,
      member.run.config,
      member.eval_metrics if with_eval else None,
    )


def _train(runs: list['_Run'], watch: preemption.Watch, wall_start: float):
  """The loop of `train_seeds`, in the workdirs `runs` hold."""
  results = [
    files.read_json(run.results_path) if run.finished() else None
    for run in runs
  ]
  live = [run for run, r in zip(runs, results, strict=True) if r is None]
  if not live:
    return results
  loop = _start(live)
  run, config = loop.run, loop.run.config
  done, calls, signalled = loop.start_step, 0, False
  pending, eval_seconds, loop_start = [], 0.0, time.perf_counter()
  while done < run.num_steps and any(m.active for m in loop.members):
    loop.state, metrics, n = loop.call(loop.state, done, run.num_steps)
    pending.append(metrics)
    for _ in range(n):
      done += 1
      loop.progress(done)  # clu's periodic actions want every step
    due = _due(done, run.num_steps, config)
    # Every process asks at every call (multi-process: a collective choice).
    if watch.stop_requested(calls) and done < run.num_steps:
      signalled = True
      due |= {'log', 'save', 'stop'}
    calls += 1
    if due:  # reading the steps' flags waits for them, as a save does
      loop.take_metrics(pending, done)
      pending = []
    active = [m for m in loop.members if m.active]
    if 'log' in due:
      for m in loop.members:
        if m.active:
          reporting.log_train(
            m.writer, m.logged, done, run.num_steps, run.steps_per_epoch, m.name
          )
        m.logged = []
    if 'eval' in due and active:
      eval_start = time.perf_counter()
      with loop.progress.timed('eval'):
        loop.evaluate()
      eval_seconds += time.perf_counter() - eval_start
      for m in active:
        reporting.log_eval(m.writer, done, m.eval_metrics, m.name)
    if 'save' in due:
      for m in active:
        loop.save(m, done, 'eval' in due)
    if 'stop' in due:
      if not signalled:
        logging.info('Stopping after step %d as configured.', done)
      break

  train_seconds = time.perf_counter() - loop_start - eval_seconds
  if done == run.num_steps and (
    config.data.test_image_sizes or config.data.test_bn_examples
  ):
    eval_start = time.perf_counter()
    loop.evaluate_at_resolutions()
    eval_seconds += time.perf_counter() - eval_start
  for m in loop.members:
    checkpointing.wait_until_finished(m.run.manager)
    m.writer.flush()
  # A pack's members each count an equal share of its times (a pack of N
  # trains N seeds' images in its time): summed over runs they give what
  # the runs cost, and images/s is per second of a run's own share.
  share = len(loop.members)
  shared = dict(
    eval_split=config.data.eval_split,
    minival_split=config.data.minival_split,
    # The prepared dataset read: the original or a resized copy.
    data_source=run.builder.data_dir,
    bits_depend_on=reporting.bits_depend_on(),
    train_seconds=train_seconds / share,
    eval_seconds=eval_seconds / share,
    images_per_second=(done - loop.start_step)
    * config.data.batch_size
    / max(train_seconds / share, 1e-9),
    **loop.model_stats,
    **({'pack': share} if loop.pack else {}),
    **(
      {'stopped': {'signal': watch.signal_name, 'step': done}}
      if signalled
      else {}
    ),
  )
  members = iter(loop.members)  # the runs whose results are None, in order
  for i, result in enumerate(results):
    if result is None:
      m = next(members)
      results[i] = m.failure or m.run.finish(
        dict(m.eval_metrics, **shared), wall_start, share
      )
  if signalled:
    raise watch.stopped(done)
  return results


def _start(live: list['_Run']) -> _Loop:
  """Restores the members (or initialises them), writes their model
  statistics, starts their data and compiles (or reuses) the programs."""
  if len(live) > 1:
    _align_steps(live)
  restored = [run.restore() for run in live]
  start_step = _common_start(live, [s for _, s in restored])
  pack = len(live) if len(live) > 1 else 0  # one seed left: a plain run
  states = [s for s, _ in restored]
  state = states[0] if not pack else None
  if pack and states[0] is not None:  # restored, or init_from's weights
    state = programs.stack(states)
  run, config = live[0], live[0].config
  model_stats = reporting.write_model_stats(
    config, run.model, run.meta.num_classes, run.workdir
  )
  for other in live[1:]:
    reporting.write_json(
      os.path.join(other.workdir, reporting.MODEL_STATS_FILE), model_stats
    )
  datasets = [
    input_pipeline.create_train_dataset(
      r.builder, r.config, start_step=start_step
    )
    for r in live
  ]
  train_ds = input_pipeline.stacked(datasets) if pack else datasets[0]
  eval_ds = input_pipeline.create_eval_dataset(run.builder, config)
  minival_ds = None
  if config.data.minival_split:
    minival_ds = input_pipeline.create_eval_dataset(
      run.builder, config, field='minival_split'
    )
  evaluates_early = config.train.eval_every_steps < run.num_steps
  seeds = tuple(r.config.seed for r in live) if pack else ()
  differ = members.differences([r.config for r in live]) or ['seed']
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
    seeds,
  )
  loop_members = [
    _Member(
      r,
      i,
      f'{members.name(r.config, differ)}: ' if pack else '',
      reporting.create_writer(r.config, r.workdir, start_step),
    )
    for i, r in enumerate(live)
  ]
  loop = _Loop(
    run=run,
    pack=pack,
    start_step=start_step,
    state=state,
    call=_StepCaller(
      config,
      run.learning_rate_fn,
      p_train_step,
      batches,
      seeds,
      [training_state.hyperparameters(r.config) for r in live],
    ),
    p_eval_step=p_eval_step,
    eval_ds=eval_ds,
    minival_ds=minival_ds,
    progress=periodic_actions.ReportProgress(
      num_train_steps=run.num_steps,
      writer=loop_members[0].writer,
      every_steps=config.train.log_every_steps,
    ),
    members=loop_members,
    model_stats=model_stats,
  )
  return loop


def _align_steps(live: list['_Run']) -> None:
  """Seeds of a pack saved at different steps (killed while their saves of
  one step were under way): where every seed holds a complete checkpoint
  of the earliest latest step, the steps after it are set aside
  (`checkpointing.AHEAD_DIR`) and the pack resumes from it, as it would
  have without the kill. Otherwise nothing moves (`_common_start` says
  why the seeds cannot resume together)."""
  steps = [checkpointing.complete_steps(r.manager) for r in live]
  common = min(s[-1] if s else 0 for s in steps)
  if not common or all((s or [0])[-1] == common for s in steps):
    return
  if not all(common in s for s in steps):
    return
  for run, saved in zip(live, steps, strict=True):
    if saved[-1] > common:
      moved = checkpointing.set_aside_after(run.manager, common)
      logging.warning(
        '%s saved steps past %d, where the other seeds of its pack are: '
        'the pack resumes from step %d; the later steps are kept in %s.',
        run.workdir,
        common,
        common,
        ', '.join(moved),
      )


class PackStartError(ValueError):
  """The seeds of a pack were saved at different steps (nothing written)."""


def _common_start(live: list['_Run'], starts: list[int]) -> int:
  """The step every seed of a pack resumes from; one clear error if not one."""
  if len(set(starts)) > 1:
    where = ', '.join(
      f'{r.workdir} at step {s}' for r, s in zip(live, starts, strict=True)
    )
    raise PackStartError(
      f'the seeds of a pack must resume from one step: {where}. Train them '
      'one at a time (a sweep: --pack=1), or remove the checkpoints of those '
      'behind to restart them.'
    )
  return starts[0]


def _per_seed(pending: list[dict], pack: int) -> list[list[dict]]:
  """Host copies of the pending steps' metrics, one list of steps per seed."""
  if not pack:
    return [reporting.per_step(pending)]
  host = jax.device_get(pending)
  return [
    reporting.per_step([{k: v[i] for k, v in m.items()} for m in host])
    for i in range(pack)
  ]


def _diverged(run: '_Run', bad: tuple, pack: int, name: str):
  """A single run raises the divergence; a seed of a pack stops alone."""
  try:
    divergence.stop(run.manager, run.config, run.workdir, *bad)
  except TrainingDivergedError as e:
    if not pack:
      raise
    logging.error('%sstopped alone, the other seeds go on: %s', name, e)
    return e


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
    self.builder = prepare.get_builder(config)
    self.meta = prepare.dataset_meta(self.builder, config)
    self.steps_per_epoch = _steps_per_epoch(
      config, self.meta.num_train_examples
    )
    self.num_steps = int(
      math.ceil(config.train.num_epochs * self.steps_per_epoch)
    )
    self.learning_rate_fn = training_state.create_learning_rate_fn(
      config, self.steps_per_epoch
    )
    if config.data.test_bn_examples > self.meta.num_train_examples:
      raise ValueError(
        f'config.data.test_bn_examples={config.data.test_bn_examples} is not '
        "valid; expected at most the training split's "
        f'{self.meta.num_train_examples} examples '
        f'(config.data.train_split={config.data.train_split!r}).'
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

  def finish(
    self, result: dict[str, Any], wall_start: float, share: int = 1
  ) -> dict:
    """Adds the step counts and the run's fixed cost (its `share` of the
    wall time: a pack of N counts 1/N); writes results.json."""
    completed = self.manager.latest_step() or 0
    wall = (time.perf_counter() - wall_start) / share
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
  save or stop step comes first, single steps up to one. With `seeds`, the
  steps of a pack of those seeds."""

  def __init__(
    self, config, learning_rate_fn, p_train_step, batches, seeds, hparams
  ):
    self.config, self.batches = config, batches
    # Each member's hyperparameters (stacked on the pack's axis).
    self.hparams = (
      jax.tree.map(lambda *x: np.stack(x), *hparams) if seeds else hparams[0]
    )
    self.per_call = config.train.steps_per_call
    self.p_steps = p_train_step
    self.p_step = (
      steps.make_p_train_step(config, learning_rate_fn, pack=len(seeds))
      if self.per_call > 1
      else p_train_step
    )
    # Dropout: each seed's rng as it would be alone.
    self.rng = (
      jax.vmap(jax.random.key)(jnp.asarray(seeds) + 1)
      if seeds
      else jax.random.key(config.seed + 1)
    )

  def __call__(self, state, done: int, num_steps: int):
    """(new state, metrics, number of steps run)."""
    if self.per_call > 1 and _next_boundary(done, num_steps, self.config) >= (
      done + self.per_call
    ):
      batches = tuple(next(self.batches) for _ in range(self.per_call))
      return (
        *self.p_steps(state, batches, self.rng, self.hparams),
        self.per_call,
      )
    return (*self.p_step(state, next(self.batches), self.rng, self.hparams), 1)


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
