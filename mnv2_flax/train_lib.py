"""Training state, pmap-ed train and eval steps, and the training loop.

The steps are pure functions of (state, batch, rng). Collectives use
`axis_name` only, so the same functions run under `jax.pmap` (as here, with the
state unreplicated: `in_axes=(None, 0, None)`, `out_axes=None`) or, with
`axis_name=None`, under `jit`.
"""

from collections.abc import Callable, Sequence
import concurrent.futures
import contextlib
import functools
import json
import math
import os
import tempfile
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mnv2_flax import checkpointing
from mnv2_flax import compilation_cache
from mnv2_flax import cpu
from mnv2_flax import defaults
from mnv2_flax import finetune
from mnv2_flax import hardware
from mnv2_flax import input_pipeline
from mnv2_flax import models
from mnv2_flax import preprocessing
from mnv2_flax import stats
from mnv2_flax.cpu import precompile

AXIS = 'batch'


class TrainState(train_state.TrainState):
  """Parameters, optimizer state, BatchNorm statistics and EMA parameters."""

  batch_stats: Any
  ema_params: Any


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or Inf."""


# -------------------------------------------------------------------- config


def check_config(config: ml_collections.ConfigDict) -> None:
  """`defaults.check`, and batch sizes that split over the processes."""
  defaults.check(config)
  for field in ('batch_size', 'eval_batch_size'):
    input_pipeline.per_process_batch_size(
      config.data[field], f'config.data.{field}', jax.process_count()
    )


def create_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  axis_name: str | None = AXIS,
) -> models.MobileNetV2:
  """The model of `config.model`; BN statistics averaged over `axis_name`.

  The one place where backend-specific layers enter: with
  `config.train.cpu_fast_path` on the CPU backend, `mnv2_flax.cpu.layers()`
  (same variables, faster steps); Flax's layers everywhere else.
  """
  dtype = jnp.bfloat16 if config.train.dtype == 'bfloat16' else jnp.float32
  layers = cpu.layers() if config.train.cpu_fast_path else {}
  return models.MobileNetV2(
    num_classes=num_classes,
    bn_axis_name=axis_name,
    dtype=dtype,
    **config.model.to_dict(),
    **layers,
  )


# ----------------------------------------------------------------- optimizer


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Base rate scaled with the global batch, warm-up, then the schedule."""
  optim = config.optim
  base = optim.learning_rate * config.data.batch_size / optim.lr_reference_batch
  warmup = int(optim.warmup_epochs * steps_per_epoch)
  total = max(1, int(config.train.num_epochs * steps_per_epoch))
  if optim.schedule == 'exponential':  # TF-slim: x0.98 every 2.5 epochs
    main = optax.exponential_decay(
      base,
      transition_steps=max(1, int(optim.decay_epochs * steps_per_epoch)),
      decay_rate=optim.decay_rate,
      staircase=True,
    )
  elif optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(base, max(1, total - warmup))
  else:
    main = optax.constant_schedule(base)
  if warmup == 0:
    return main
  return optax.join_schedules(
    [optax.linear_schedule(0.0, base, warmup), main], [warmup]
  )


def weight_decay_mask(params: Any, mode: str) -> Any:
  """True where weight decay applies.

  'tf_slim': conv and dense kernels, not depthwise kernels, BN or biases.
  'no_norm': everything but BatchNorm scale and bias (torchvision's recipe).
  """
  flat = traverse_util.flatten_dict(params)
  if mode == 'tf_slim':
    mask = {k: k[-1] == 'kernel' and 'depthwise_conv' not in k for k in flat}
  else:
    mask = {k: not any(part.endswith('_bn') for part in k) for k in flat}
  return traverse_util.unflatten_dict(mask)


def create_optimizer(
  config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  optim = config.optim
  tx = _optimizer(optim, learning_rate_fn)
  if not optim.freeze_backbone:
    return tx
  # A linear probe: the classifier trains, every other parameter gets a zero
  # update (and XLA drops the backbone's gradients, which nothing reads).
  return optax.multi_transform(
    {'trained': tx, 'frozen': optax.set_to_zero()},
    lambda params: {
      k: jax.tree.map(
        lambda _, k=k: 'trained' if k == 'classifier' else 'frozen', v
      )
      for k, v in params.items()
    },
  )


def _optimizer(optim, learning_rate_fn) -> optax.GradientTransformation:
  mask = functools.partial(weight_decay_mask, mode=optim.weight_decay_mask)
  if optim.optimizer == 'rmsprop_tf':
    # TF1 RMSProp: epsilon inside the square root, accumulator starting at 1.
    opt = optax.rmsprop(
      learning_rate_fn,
      decay=optim.rmsprop_decay,
      eps=optim.rmsprop_epsilon,
      initial_scale=1.0,
      eps_in_sqrt=True,
      momentum=optim.momentum,
    )
  elif optim.optimizer == 'adamw':
    # Decoupled decay (Loshchilov & Hutter): lr * wd * w, same mask.
    return optax.adamw(
      learning_rate_fn,
      b1=optim.momentum,
      b2=optim.adam_b2,
      weight_decay=optim.weight_decay,
      mask=mask,
    )
  else:
    opt = optax.sgd(
      learning_rate_fn, momentum=optim.momentum, nesterov=optim.nesterov
    )
  if optim.weight_decay == 0:
    return opt
  # L2 as TF-slim and torch's SGD apply it: wd * w is added to the gradient
  # before the optimizer (the gradient of wd / 2 * ||w||^2).
  return optax.chain(optax.add_decayed_weights(optim.weight_decay, mask), opt)


def _init_fn(config, model, learning_rate_fn) -> Callable:
  """rng -> a freshly initialised TrainState."""
  size = config.data.image_size

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, size, size, 3)), train=False)
    state = TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=create_optimizer(config, learning_rate_fn),
      batch_stats=variables['batch_stats'],
      ema_params=variables['params'],
    )
    # A strongly typed step, as a restored one is: with `create`'s weakly
    # typed 0 a resumed run lowers a different train step than a fresh one
    # (a persistent-cache miss and a second compile after every resume).
    return state.replace(step=jnp.zeros((), jnp.int32))

  return init


def create_train_state(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  learning_rate_fn: optax.Schedule,
  rng: jax.Array,
) -> TrainState:
  """A freshly initialised state (jit-compiled, on the default device)."""
  init = jax.jit(_init_fn(config, model, learning_rate_fn))
  options = cpu.init_compiler_options()
  return init.lower(rng).compile(compiler_options=options)(rng)


def initial_train_state(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  learning_rate_fn: optax.Schedule,
) -> TrainState:
  """The state a run starts from (seed `config.seed`)."""
  return create_train_state(
    config, model, learning_rate_fn, jax.random.key(config.seed)
  )


def abstract_train_state(config, model, learning_rate_fn) -> TrainState:
  """The state's shapes and dtypes, without computing anything."""
  return jax.eval_shape(
    _init_fn(config, model, learning_rate_fn), jax.random.key(0)
  )


# --------------------------------------------------------------------- steps


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0):
  targets = (
    optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    if label_smoothing
    else (jax.nn.one_hot(labels, num_classes))
  )
  return optax.softmax_cross_entropy(logits, targets)


def _mean(x, axis_name):
  return jax.lax.pmean(x, axis_name) if axis_name else x


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  axis_name: str | None = AXIS,
):
  """One optimisation step; returns the new state and the step's metrics.

  Gradients and metrics are averaged over `axis_name`; the model's BN
  normalises with statistics across it, so its running statistics agree on
  every device without another average (tested). The dropout rng
  is distinct per device and per step. `metrics['finite']` is 0.0 once the
  loss or the new state holds a NaN or Inf.
  """
  if axis_name:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  rng = jax.random.fold_in(rng, state.step)
  num_classes = state.params['classifier']['bias'].shape[-1]
  images = preprocessing.normalize(batch['image'], config.data.normalization)

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': rng},
    )
    loss = cross_entropy(
      logits, batch['label'], num_classes, config.optim.label_smoothing
    ).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
    loss_fn, has_aux=True
  )(state.params)
  grads = _mean(grads, axis_name)
  # No average of `batch_stats` here: the model's BN computed them from
  # statistics over `axis_name`, so every device already holds the same ones.
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  # TF's ExponentialMovingAverage(num_updates=step): slow start, then decay.
  step = new_state.step.astype(jnp.float32)
  decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
  ema = optax.incremental_update(
    new_state.params, state.ema_params, 1.0 - decay
  )
  new_state = new_state.replace(ema_params=ema)
  metrics = {
    'loss': loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
    'learning_rate': learning_rate_fn(state.step),
    # 1.0 while the loss and the new state are finite: checked before every
    # save, so a diverged state is never written over a good one.
    'finite': _all_finite(loss, new_state).astype(jnp.float32),
  }
  return new_state, _mean(metrics, axis_name)


def _all_finite(loss, state: TrainState) -> jax.Array:
  """True if the loss and every parameter and statistic are finite (one
  fused reduction per leaf; no norm that large finite values overflow)."""
  trees = (state.params, state.ema_params, state.batch_stats)
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(trees)]
  return jnp.isfinite(loss) & jnp.stack(leaves).all()


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  flip_average: bool = False,
  normalization: str = 'inception',
  axis_name: str | None = AXIS,
) -> dict[str, jax.Array]:
  """Masked sums of loss, top-1 and top-5 for the raw and the EMA params.

  With `flip_average`, also those of the mean softmax over each image and its
  horizontal mirror (keys `flip_*`, `ema_flip_*`); the plain keys stay
  single-view. `batch['image']` holds pixels in [0, 255], normalised here
  (`config.data.normalization`).
  """
  images = preprocessing.normalize(batch['image'], normalization)
  mask = batch['mask']
  labels = batch['label']
  num_classes = state.params['classifier']['bias'].shape[-1]
  sums = {'count': mask.sum()}

  def add(prefix, log_probs):
    loss = -jnp.take_along_axis(log_probs, labels[:, None], -1)[:, 0]
    top5 = jax.lax.top_k(log_probs, min(5, num_classes))[1]
    sums[prefix + 'loss'] = (loss * mask).sum()
    sums[prefix + 'top1'] = ((top5[:, 0] == labels) * mask).sum()
    sums[prefix + 'top5'] = ((top5 == labels[:, None]).any(-1) * mask).sum()

  for prefix, params in (('', state.params), ('ema_', state.ema_params)):

    def log_probs(images, params=params):
      logits = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        images,
        train=False,
      )
      return jax.nn.log_softmax(logits.astype(jnp.float32))

    single = log_probs(images)
    add(prefix, single)
    if flip_average:
      mirrored = log_probs(images[:, :, ::-1])
      add(
        prefix + 'flip_',
        jnp.logaddexp(single, mirrored) - jnp.log(2.0),
      )
  return jax.lax.psum(sums, axis_name) if axis_name else sums


def device_mesh() -> jax.sharding.Mesh:
  """The mesh of the pmap-ed steps: this process's devices, axis `AXIS`."""
  return jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))


def replicated_sharding() -> jax.sharding.NamedSharding:
  """How the state goes in (`in_axes=None`) and out of the pmap-ed steps."""
  return jax.sharding.NamedSharding(device_mesh(), jax.sharding.PartitionSpec())


def batch_sharding() -> jax.sharding.NamedSharding:
  """How batches go in (`in_axes=0`): the leading axis over the devices."""
  return jax.sharding.NamedSharding(
    device_mesh(), jax.sharding.PartitionSpec(AXIS)
  )


def _train_fn(config, learning_rate_fn, steps: int = 1) -> Callable:
  """(state, batch or tuple of `steps` batches, rng) -> (state, metrics)."""
  step = train_step if steps == 1 else train_steps
  return functools.partial(
    step, config=config, learning_rate_fn=learning_rate_fn
  )


def _eval_fn(config) -> Callable:
  """(state, batch) -> metric sums, as `config.data` asks."""
  return functools.partial(
    eval_step,
    flip_average=config.data.eval_flip_average,
    normalization=config.data.normalization,
  )


def make_p_train_step(
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  devices: Sequence[jax.Device] | None = None,
  steps: int = 1,
) -> Callable:
  """`train_step` pmap-ed over the local devices (or `devices`), the state
  unreplicated and donated. With `steps` > 1, `train_steps`: it takes a
  tuple of `steps` batches and returns metrics stacked per step."""
  return jax.pmap(
    _train_fn(config, learning_rate_fn, steps),
    axis_name=AXIS,
    in_axes=(None, 0, None),
    out_axes=(None, None),
    # The old state's buffers hold the new one: one state in memory, not
    # two. A buffer still referenced elsewhere is not donated but copied
    # (on CPU, a checkpoint being written reads the state in place).
    donate_argnums=(0,),
    devices=devices,
  )


def train_steps(
  state: TrainState,
  batches: tuple[dict[str, jax.Array], ...],
  rng: jax.Array,
  **kwargs: Any,
):
  """`len(batches)` consecutive `train_step`s in one call (`lax.scan`);
  metrics gain a leading axis of one entry per step.

  The same steps as as many calls: `config.train.steps_per_call` trades
  the per-call cost of dispatching a pmap-ed step (milliseconds for ~600
  state leaves) for one more compiled program.
  """
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)

  def body(state, batch):
    return train_step(state, batch, rng, **kwargs)

  return jax.lax.scan(body, state, stacked)


def lower_steps(
  config: ml_collections.ConfigDict,
  p_train_step: Callable,
  p_eval_step: Callable,
  state: TrainState,
  train_batch: dict[str, jax.ShapeDtypeStruct],
  eval_batch: dict[str, jax.ShapeDtypeStruct] | None,
) -> dict[str, jax.stages.Lowered]:
  """The train step (and the eval step if `eval_batch`), lowered for a run's
  arguments; compiled ahead of time, later calls find the executables in
  pmap's cache. One process only: with several, pmap cannot lower abstract
  inputs."""
  rng = jax.random.key(config.seed + 1)
  k = config.train.steps_per_call
  if k > 1:  # single steps run only to reach a log, eval or save step
    lowered = {
      f'Train program of {k} steps': p_train_step.lower(
        state, (train_batch,) * k, rng
      )
    }
  else:
    lowered = {'Train step': p_train_step.lower(state, train_batch, rng)}
  if eval_batch is not None:
    lowered['Eval step'] = p_eval_step.lower(state, eval_batch)
  return lowered


def sharded_steps(
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  mesh: jax.sharding.Mesh,
) -> tuple[Callable, Callable]:
  """The pmap-ed train and eval steps as `jit(shard_map(...))` over `mesh`
  (axis `AXIS`): the program pmap builds, for meshes of devices that this
  host cannot run (`lowering_platforms`, deviceless TPU topologies).

  Arguments as the pmap-ed steps take them: the state replicated, batches
  with a leading axis of one entry per device.
  """
  replicated, split = (
    jax.sharding.PartitionSpec(),
    jax.sharding.PartitionSpec(AXIS),
  )

  def per_device(step):
    def run(state, batch, *rest):
      return step(state, jax.tree.map(lambda x: x[0], batch), *rest)

    return run

  train = jax.shard_map(
    per_device(_train_fn(config, learning_rate_fn)),
    mesh=mesh,
    in_specs=(replicated, split, replicated),
    out_specs=(replicated, replicated),
    # pmap's semantics: the step averages its gradients itself (with the
    # check on, autodiff would sum them over the devices first).
    check_vma=False,
  )
  evaluate_ = jax.shard_map(
    per_device(_eval_fn(config)),
    mesh=mesh,
    in_specs=(replicated, split),
    out_specs=replicated,
    check_vma=False,
  )
  return jax.jit(train, donate_argnums=(0,)), jax.jit(evaluate_)


def lower_run_programs(
  config: ml_collections.ConfigDict,
  num_classes: int,
  steps_per_epoch: int,
  train_batch: dict[str, jax.ShapeDtypeStruct],
  eval_batch: dict[str, jax.ShapeDtypeStruct] | None,
) -> dict[str, jax.stages.Lowered]:
  """A run's steps lowered as `train_and_evaluate` lowers them.

  What `precompile`'s child compiles into the cache (the state initialiser is
  compiled, and cached, on the way). `train_batch` and `eval_batch` are
  unplaced shapes (`input_pipeline.batch_spec(ds)`).
  """
  model = create_model(config, num_classes)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  state = jax.device_put(
    initial_train_state(config, model, learning_rate_fn),
    replicated_sharding(),
  )

  def placed(batch):
    return {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding())
      for k, v in batch.items()
    }

  return lower_steps(
    config,
    make_p_train_step(
      config, learning_rate_fn, steps=config.train.steps_per_call
    ),
    make_p_eval_step(config),
    state,
    placed(train_batch),
    placed(eval_batch) if eval_batch else None,
  )


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


def make_p_eval_step(config: ml_collections.ConfigDict) -> Callable:
  """`eval_step` pmap-ed over the local devices, the state unreplicated."""
  return jax.pmap(
    _eval_fn(config),
    axis_name=AXIS,
    in_axes=(None, 0),
    out_axes=None,
  )


def evaluate(p_eval_step: Callable, state: TrainState, eval_ds) -> dict:
  """Runs the eval split once; returns mean loss, top-1, top-5 (raw, EMA)."""
  totals = None
  for batch in input_pipeline.prefetch_to_device(eval_ds, batch_sharding()):
    sums = p_eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(lambda x: float(np.asarray(x)), totals)
  count = totals.pop('count')
  out = {k: v / count for k, v in totals.items()}
  out['num_examples'] = count
  return out


# ---------------------------------------------------------------------- loop


def _write_model_stats(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  num_classes: int,
  workdir: str,
) -> dict[str, Any]:
  """Parameter and MAC counts, logged and written to model_stats.json."""
  counts = stats.count(model.clone(bn_axis_name=None), config.data.image_size)
  logging.info(
    'Model: %s parameters, %s MACs per image',
    f'{counts.params:,}',
    f'{counts.macs:,}',
  )
  model_stats = dict(
    counts.as_dict(),
    num_classes=num_classes,
    image_size=config.data.image_size,
    width_multiplier=config.model.width_multiplier,
  )
  _write_json(os.path.join(workdir, 'model_stats.json'), model_stats)
  return model_stats


def _write_json(path: str, data: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(data, f, indent=2)


def _prepare_state_and_steps(
  config,
  model,
  learning_rate_fn,
  steps_per_epoch,
  state,
  train_ds,
  eval_ds,
):
  """Initialises the state (unless `state` was restored); compiles the steps.

  Runs while a thread fills the shuffle buffer (the first batch waits for
  it). `eval_ds` is None unless the run evaluates before its last step (its
  step is then compiled up front too). Returns (state, p_train_step,
  p_eval_step, device iterator of train batches).
  """
  # On CPU a child process compiles the programs into the persistent cache
  # and this one loads them (see cpu/precompile.py; None where it cannot help).
  child = None
  if config.train.cpu_fast_path:
    child = precompile.start(
      'mnv2_flax.train_lib:lower_run_programs',
      config.train.compilation_cache_dir,
      config=config,
      num_classes=model.num_classes,
      steps_per_epoch=steps_per_epoch,
      train_batch=input_pipeline.batch_spec(train_ds),
      eval_batch=input_pipeline.batch_spec(eval_ds) if eval_ds else None,
    )
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    first = pool.submit(input_pipeline.started, train_ds)
    if child is not None:
      child.wait()
    if state is None:
      state = initial_train_state(config, model, learning_rate_fn)
    p_train_step = make_p_train_step(
      config, learning_rate_fn, steps=config.train.steps_per_call
    )
    p_eval_step = make_p_eval_step(config)
    # Placed as the pmap-ed step returns it (replicated over its mesh); as
    # init or restore place it, the second step would compile again (and
    # with several processes pmap would copy it, donation or not).
    state = jax.device_put(state, replicated_sharding())
    # With several processes pmap compiles at the first step.
    if jax.process_count() == 1:
      lowered = lower_steps(
        config,
        p_train_step,
        p_eval_step,
        state,
        input_pipeline.batch_spec(train_ds, batch_sharding()),
        input_pipeline.batch_spec(eval_ds, batch_sharding())
        if eval_ds
        else None,
      )
      for name, program in lowered.items():
        _compile_logged(name, program)
    train_iter = input_pipeline.prefetch_to_device(
      first.result(), batch_sharding()
    )
  return state, p_train_step, p_eval_step, train_iter


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


def _per_step(metrics: list[dict]) -> list[dict]:
  """Host copies of `metrics`, one dict of floats per step (the programs of
  several steps return each metric stacked)."""
  out = []
  for m in jax.device_get(metrics):
    if np.ndim(m['loss']) == 0:
      out.append({k: float(v) for k, v in m.items()})
    else:
      out += [
        {k: float(v[i]) for k, v in m.items()} for i in range(len(m['loss']))
      ]
  return out


def _log_train(writer, metrics, step, num_steps, steps_per_epoch):
  """Writes and logs the means of `metrics` (the steps since the last log)."""
  summary = {
    k: float(np.mean([m[k] for m in metrics]))
    for k in metrics[0]
    if k != 'finite'
  }
  writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
  logging.info(
    'step %d/%d epoch %.2f loss %.4f acc %.4f lr %.4g',
    step,
    num_steps,
    step / steps_per_epoch,
    summary['loss'],
    summary['accuracy'],
    summary['learning_rate'],
  )


DIVERGED_FILE = 'diverged.json'


def _first_non_finite(metrics: list[dict], first_step: int) -> tuple | None:
  """(step, loss) of the first step whose loss or new state is not finite."""
  for i, m in enumerate(metrics):
    if not float(m['finite']):
      return first_step + i, float(m['loss'])
  return None


def _stop_diverged(manager, config, workdir, step, loss) -> None:
  """Records the divergence in the workdir and raises; nothing is saved."""
  checkpointing.wait_until_finished(manager)
  last = manager.latest_step()
  kept = (
    f'the last checkpoint, step {last} (finite: only finite states are '
    f'saved), is kept in {manager.directory}'
    if last is not None
    else 'no checkpoint was saved before it'
  )
  _write_json(
    os.path.join(workdir, DIVERGED_FILE),
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


def _check_not_diverged(workdir: str, config) -> None:
  """Refuses to resume a run that diverged unless the config changed."""
  path = os.path.join(workdir, DIVERGED_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    record = json.load(f)
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


def _log_eval(writer, step: int, metrics: dict[str, float]) -> None:
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  flip = (
    f'; flip-averaged top1 {metrics["flip_top1"]:.4f} '
    f'(EMA {metrics["ema_flip_top1"]:.4f})'
    if 'flip_top1' in metrics
    else ''
  )
  logging.info(
    'eval step %d: top1 %.4f top5 %.4f (EMA top1 %.4f) on %d examples%s',
    step,
    metrics['top1'],
    metrics['top5'],
    metrics['ema_top1'],
    metrics['num_examples'],
    flip,
  )


def _steps_per_epoch(config, num_train_examples: int) -> int:
  steps = num_train_examples // config.data.batch_size
  if steps == 0:
    raise ValueError(
      f'config.data.batch_size={config.data.batch_size} is larger than the '
      f'{num_train_examples} training examples.'
    )
  return steps


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, float]:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Args:
    config: the experiment (fields: `mnv2_flax.defaults`).
    workdir: checkpoints, TensorBoard events, model statistics and results.

  Returns:
    The final eval metrics, with train wall time and throughput.
  """
  # Build: checks first, nothing written until the resume is known to work.
  check_config(config)
  hardware.check_accelerator(config.train.require_accelerator)
  _check_workdir(workdir)
  builder = input_pipeline.get_builder(config)
  meta = input_pipeline.dataset_meta(builder, config)
  steps_per_epoch = _steps_per_epoch(config, meta.num_train_examples)
  num_steps = int(math.ceil(config.train.num_epochs * steps_per_epoch))
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  model = create_model(config, meta.num_classes)

  # Restore (before compiling: a checkpoint that does not fit stops here).
  manager = checkpointing.create_manager(workdir, config)
  results_path = os.path.join(workdir, 'results.json')
  if (manager.latest_step() or 0) >= num_steps and os.path.exists(results_path):
    logging.info('Already finished: %s', results_path)
    manager.close()
    with open(results_path) as f:
      return json.load(f)
  _check_not_diverged(workdir, config)
  state, start_step = checkpointing.restore_latest(
    manager,
    abstract_train_state(config, model, learning_rate_fn),
    config,
    skip_corrupt=config.checkpoint.skip_corrupt,
  )
  if start_step:
    logging.info('Resuming from step %d of %d.', start_step, num_steps)
  elif config.init_from:
    state = finetune.load(
      initial_train_state(config, model, learning_rate_fn), config
    )
  model_stats = _write_model_stats(config, model, meta.num_classes, workdir)
  train_ds = input_pipeline.create_train_dataset(
    builder, config, start_step=start_step
  )
  eval_ds = input_pipeline.create_eval_dataset(builder, config)
  evaluates_early = config.train.eval_every_steps < num_steps
  state, p_train_step, p_eval_step, train_iter = _prepare_state_and_steps(
    config,
    model,
    learning_rate_fn,
    steps_per_epoch,
    state,
    train_ds,
    eval_ds if evaluates_early else None,
  )

  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0
  )
  if start_step == 0:
    writer.write_hparams(_flat_config(config))
  report_progress = periodic_actions.ReportProgress(
    num_train_steps=num_steps,
    writer=writer,
    every_steps=config.train.log_every_steps,
  )
  dropout_rng = jax.random.key(config.seed + 1)

  # Loop.
  eval_metrics: dict[str, float] = {}
  train_metrics = []
  loop_start, eval_seconds, done = time.perf_counter(), 0.0, start_step
  per_call = config.train.steps_per_call
  p_single_step = (
    make_p_train_step(config, learning_rate_fn) if per_call > 1 else None
  )
  while done < num_steps:
    # `per_call` steps in one call, unless a log, eval or save step comes
    # first: single steps reach it.
    n = 1
    if p_single_step and _next_boundary(done, num_steps, config) >= (
      done + per_call
    ):
      n = per_call
      batches = tuple(next(train_iter) for _ in range(n))
      state, metrics = p_train_step(state, batches, dropout_rng)
    else:
      step_fn = p_single_step or p_train_step
      state, metrics = step_fn(state, next(train_iter), dropout_rng)
    train_metrics.append(metrics)
    for _ in range(n):
      done += 1
      report_progress(done)  # clu's periodic actions want every step
    is_log_step = done % config.train.log_every_steps == 0 or done == num_steps
    is_eval_step = (
      done % config.train.eval_every_steps == 0 or done == num_steps
    )
    stop = done == config.train.stop_after_step
    is_save_step = (
      done % config.checkpoint.every_steps == 0 or done == num_steps or stop
    )
    if is_log_step or is_eval_step or is_save_step:
      # The flags of the steps since the last check (they are computed in
      # the step: reading them waits for it, as a save or a log does).
      train_metrics = _per_step(train_metrics)
      diverged = _first_non_finite(train_metrics, done - len(train_metrics) + 1)
      if diverged:
        _stop_diverged(manager, config, workdir, *diverged)
    if is_log_step:
      _log_train(writer, train_metrics, done, num_steps, steps_per_epoch)
      train_metrics = []

    # Evaluate.
    if is_eval_step:
      eval_start = time.perf_counter()
      with report_progress.timed('eval'):
        eval_metrics = evaluate(p_eval_step, state, eval_ds)
      eval_seconds += time.perf_counter() - eval_start
      _log_eval(writer, done, eval_metrics)

    # Save.
    if is_save_step:
      checkpointing.save(
        manager, done, state, config, eval_metrics if is_eval_step else None
      )
    if stop:
      logging.info('Stopping after step %d as configured.', done)
      break

  # Finish.
  train_seconds = time.perf_counter() - loop_start - eval_seconds
  checkpointing.wait_until_finished(manager)
  writer.flush()
  completed = manager.latest_step() or 0
  images = (done - start_step) * config.data.batch_size
  result = dict(
    eval_metrics,
    train_seconds=train_seconds,
    images_per_second=images / train_seconds if train_seconds else 0.0,
    steps=num_steps,
    completed_steps=completed,
    finished=completed == num_steps,
    **model_stats,
  )
  _write_json(results_path, result)
  if result['finished'] and jax.process_index() == 0:
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, DIVERGED_FILE))
  return result


def _check_workdir(workdir: str) -> None:
  """Creates `workdir`; a clear error if it cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'workdir {workdir!r} is a file; expected a directory.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(
      f'workdir {workdir!r} is not writable ({e.strerror}); choose a '
      'directory this process can write.'
    ) from None


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's scalar fields, 'model.width_multiplier': 0.5, ..."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {
    k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))
  }
