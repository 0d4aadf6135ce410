"""A run's compiled programs: lowered once, then loaded or compiled.

`prepare` gives the loop its state and steps, compiled ahead of time while a
thread fills the input pipeline's shuffle buffer. On XLA:CPU the programs
are compiled by a child process into the persistent compilation cache and
loaded from it (`cpu/precompile.py` says why), but only on a cache miss: the
child's successes are recorded by the programs' fingerprints (hashes of
their lowered text, JAX's version and the devices), so a run whose programs
the cache already holds starts no child.
"""

import collections
from collections.abc import Callable, Iterator
import concurrent.futures
import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import optax

from mnv2_flax import models
from mnv2_flax.cpu import precompile
from mnv2_flax.runtime import compilation_cache
from mnv2_flax.runtime import placement
from mnv2_flax.train import steps
from mnv2_flax.train import training_state


def lower_steps(
  config: ml_collections.ConfigDict,
  state: training_state.TrainState,
  learning_rate_fn: optax.Schedule,
  train_batch: dict[str, Any],
  eval_batch: dict[str, Any] | None,
  pack: int = 0,
) -> tuple[dict[str, jax.stages.Lowered], Callable, Callable]:
  """A run's steps, pmap-ed and lowered for its (abstract) arguments.

  Compiling the lowered programs fills pmap's own cache: calls with a state
  of `state`'s tree structure (its optimizer and apply function included)
  then compile nothing. `state` may be abstract (`abstract_train_state`).
  `train_batch` and `eval_batch` are unplaced shapes
  (`input_pipeline.batch_spec(ds)`); no eval step without `eval_batch`.
  With `pack` = N, the steps of a pack of N seeds (`steps._train_fn`):
  `state` is one seed's, and `train_batch` has the seed axis.
  One process only: with several, pmap cannot lower abstract inputs.

  Returns:
    ({name: lowered program}, p_train_step, p_eval_step).
  """
  replicated, split = placement.replicated(), placement.split()
  seeds = (pack,) if pack else ()
  state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      seeds + x.shape, x.dtype, sharding=replicated
    ),
    state,
  )
  k = config.train.steps_per_call
  p_train_step = steps.make_p_train_step(
    config, learning_rate_fn, steps=k, pack=pack
  )
  p_eval_step = steps.make_p_eval_step(config, pack)
  rng = jax.random.key(config.seed + 1)
  if pack:
    rng = jax.ShapeDtypeStruct(seeds, rng.dtype, sharding=replicated)
  hparams = {
    k: jax.ShapeDtypeStruct(seeds, jax.numpy.float32)
    for k in training_state.HYPERPARAMETERS
  }
  train_batch = placement.placed(train_batch, split)
  if k > 1:  # single steps run only to reach a log, eval or save step
    lowered = {
      f'Train program of {k} steps': p_train_step.lower(
        state, (train_batch,) * k, rng, hparams
      )
    }
  else:
    lowered = {
      'Train step': p_train_step.lower(state, train_batch, rng, hparams)
    }
  if eval_batch is not None:
    lowered['Eval step'] = p_eval_step.lower(
      state, placement.placed(eval_batch, split)
    )
  return lowered, p_train_step, p_eval_step


def lower_run_programs(
  config: ml_collections.ConfigDict,
  num_classes: int,
  steps_per_epoch: int,
  train_batch: dict[str, Any],
  eval_batch: dict[str, Any] | None,
  pack: int = 0,
) -> dict[str, jax.stages.Lowered]:
  """What `precompile`'s child compiles: a run's steps, as `prepare` lowers
  them (the state initialiser is compiled, and cached, on the way)."""
  model = training_state.create_model(config, num_classes)
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch)
  state = training_state.initial_train_state(config, model, lr)
  return lower_steps(config, state, lr, train_batch, eval_batch, pack)[0]


def fingerprints(lowered: dict[str, jax.stages.Lowered]) -> dict[str, str]:
  """A hash of each program as this JAX would compile it here."""
  devices = [(d.platform, d.device_kind) for d in jax.local_devices()]
  where = repr((jax.__version__, devices))
  return {
    name: hashlib.sha256((where + program.as_text()).encode()).hexdigest()[:24]
    for name, program in lowered.items()
  }


def _combined(prints: dict[str, str]) -> str:
  """One hash for a set of programs, from theirs."""
  return hashlib.sha256(repr(sorted(prints.items())).encode()).hexdigest()[:24]


def _record_dir(cache_dir: str) -> str:
  """Beside the cache, not in it: JAX owns its cache directory's files."""
  return os.path.expanduser(cache_dir).rstrip('/') + '-precompiled'


def _cached(cache_dir: str, key: str) -> bool:
  """Whether a child compiled programs `key` into `cache_dir` before."""
  return bool(cache_dir) and os.path.exists(
    os.path.join(_record_dir(cache_dir), key)
  )


def _record(cache_dir: str, key: str) -> None:
  os.makedirs(_record_dir(cache_dir), exist_ok=True)
  with open(os.path.join(_record_dir(cache_dir), key), 'w') as f:
    f.write(time.strftime('%Y-%m-%d %H:%M:%S\n'))


def _compile_logged(what: str, lowered: jax.stages.Lowered) -> None:
  """Compiles; logs whether it came from the persistent cache."""
  start = time.perf_counter()
  with compilation_cache.counting_hits() as hits:
    lowered.compile()
  logging.info(
    '%s %s in %.1f s.',
    what,
    'loaded from the persistent compilation cache'
    if hits
    else 'compiled in this process',
    time.perf_counter() - start,
  )


def prepare(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  learning_rate_fn: optax.Schedule,
  steps_per_epoch: int,
  state: training_state.TrainState | None,
  train_batches: Callable[[], Iterator[dict[str, Any]]],
  train_batch: dict[str, Any],
  eval_batch: dict[str, Any] | None,
  seeds: tuple[int, ...] = (),
) -> tuple[training_state.TrainState, Callable, Callable, Iterator]:
  """Initialises the state (unless `state` was restored); compiles the steps.

  Args:
    config, model, learning_rate_fn, steps_per_epoch: the run's.
    state: the restored state, or None for a fresh one.
    train_batches: starts the input pipeline (run in a thread meanwhile).
    train_batch, eval_batch: unplaced batch shapes; `eval_batch` is None
      unless the run evaluates before its last step (its step is then
      compiled up front too).
    seeds: for a pack of seeds (two or more), their seeds: `state` (if
      restored) and `train_batch` are stacked on a seed axis, and the steps
      are those of a pack (`steps._train_fn`). Empty for a single run.

  Returns:
    (state placed as the steps return it, p_train_step, p_eval_step,
    iterator of placed train batches).
  """
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    first = pool.submit(train_batches)
    pack = len(seeds)
    key = _reuse_key(
      config, model.num_classes, steps_per_epoch, train_batch, eval_batch
    )
    if key in _RECENT:  # another seed of the last points: nothing to build
      _RECENT.move_to_end(key)
      logging.info('Programs reused from an earlier run in this process.')
    else:
      _RECENT[key] = _build(
        config,
        model,
        learning_rate_fn,
        steps_per_epoch,
        train_batch,
        eval_batch,
        pack,
      )
      while len(_RECENT) > _KEEP:
        _RECENT.popitem(last=False)
    structure, initialise, p_train_step, p_eval_step = _RECENT[key]
    if state is None and pack:  # each seed initialised as it would be alone
      state = stack([initialise(jax.random.key(seed)) for seed in seeds])
    elif state is None:
      state = initialise(jax.random.key(config.seed))
    # The structure the steps were lowered for: the optimizer and apply
    # function are part of a state's tree structure, and a state with other
    # such objects (equal, but not the same) makes pmap trace and compile
    # again.
    state = jax.tree.unflatten(
      jax.tree.structure(structure), jax.tree.leaves(state)
    )
    # Placed as the pmap-ed step returns it (replicated over its mesh); as
    # init or restore place it, the second step would compile again (and
    # with several processes pmap would copy it, donation or not).
    state = jax.device_put(state, placement.replicated())
    train_iter = first.result()
  return state, p_train_step, p_eval_step, train_iter


# The programs of this process's latest runs, by `_reuse_key`: the seeds of
# a sweep point, trained one after another by a sweep worker, differ only in
# values (the seed enters the steps as an argument), so they share their
# lowered and compiled programs (4 s of lowering and 3 s of loads per run on
# one CPU core, measured).
_RECENT = collections.OrderedDict()
_KEEP = 4


def stack(trees: list[Any]) -> Any:
  """Trees of one structure stacked on a new leading (seed) axis, in the
  first tree's structure: the seeds' states, restored or built one by one,
  hold equal but distinct optimizer and apply-function objects."""
  leaves = [jax.tree.leaves(tree) for tree in trees]
  return jax.tree.unflatten(
    jax.tree.structure(trees[0]),
    [jax.numpy.stack(x) for x in zip(*leaves, strict=True)],
  )


def unstack(tree: Any, index: int) -> Any:
  """Seed `index` of a tree stacked by `stack`."""
  return jax.tree.map(lambda x: x[index], tree)


def forget() -> None:
  """Drops the programs kept for reuse (their memory goes with them)."""
  _RECENT.clear()


def _reuse_key(config, num_classes, steps_per_epoch, train_batch, eval_batch):
  """What the programs depend on: the config but its seed and the step's
  hyperparameter arguments (of weight decay, whether there is one: the
  optimizer's structure), the shapes."""
  fields = config.to_dict()
  fields.pop('seed')
  for name in training_state.HYPERPARAMETERS:
    fields['optim'].pop(name)
  fields['optim']['decays_weights'] = config.optim.weight_decay != 0
  shapes = [
    {k: (tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items())}
    if batch
    else None
    for batch in (train_batch, eval_batch)
  ]
  devices = [d.id for d in jax.local_devices()]
  return json.dumps(
    [
      fields,
      num_classes,
      steps_per_epoch,
      shapes,
      devices,
      jax.process_count(),
    ],
    sort_keys=True,
    default=repr,
  )


def _build(
  config,
  model,
  learning_rate_fn,
  steps_per_epoch,
  train_batch,
  eval_batch,
  pack,
):
  """(state structure, compiled initialiser, p_train_step, p_eval_step)."""
  structure = training_state.abstract_train_state(
    config, model, learning_rate_fn
  )
  if jax.process_count() > 1:
    # pmap cannot lower abstract inputs across processes: it compiles at
    # the first step.
    return (
      structure,
      training_state.compile_initializer(config, model, learning_rate_fn),
      steps.make_p_train_step(
        config, learning_rate_fn, steps=config.train.steps_per_call, pack=pack
      ),
      steps.make_p_eval_step(config, pack),
    )
  lowered, p_train_step, p_eval_step = lower_steps(
    config, structure, learning_rate_fn, train_batch, eval_batch, pack
  )
  prints = fingerprints(lowered)  # each program's text hashed once
  for name, key in prints.items():
    logging.info('%s: program %s.', name, key)
  _precompile(
    config,
    _combined(prints),
    model.num_classes,
    steps_per_epoch,
    train_batch,
    eval_batch,
    pack,
  )
  initialise = training_state.compile_initializer(
    config, model, learning_rate_fn
  )
  for name, program in lowered.items():
    _compile_logged(name, program)
  return structure, initialise, p_train_step, p_eval_step


def _precompile(
  config, key, num_classes, steps_per_epoch, train_batch, eval_batch, pack
):
  """On a cache miss where it helps (`precompile.wanted`), has a child
  process compile the programs `key` into the persistent cache."""
  cache_dir = config.train.compilation_cache_dir
  if not precompile.wanted(cache_dir):
    return
  if _cached(cache_dir, key):
    logging.info('Programs %s are in the compilation cache.', key)
    return
  child = precompile.start(
    'mnv2_flax.train.programs:lower_run_programs',
    cache_dir,
    config=config,
    num_classes=num_classes,
    steps_per_epoch=steps_per_epoch,
    train_batch=train_batch,
    eval_batch=eval_batch,
    pack=pack,
  )
  if child is not None and child.wait():
    _record(cache_dir, key)
