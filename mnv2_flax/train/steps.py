"""The train and eval steps, and their pmap and shard_map builders.

The steps are pure functions of (state, batch, rng, hyperparameters), the
last the optimizer's scalars (`training_state.hyperparameters`). Collectives
use `axis_name` only, so the same functions run under `jax.pmap` (as in the
loop, with the state unreplicated: `in_axes=(None, 0, None, None)`,
`out_axes=None`), under `jit(shard_map)` over a mesh of devices this host
does not have (`sharded_steps`), or, with `axis_name=None`, under `jit`.
Imports JAX, Flax and Optax only.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mnv2_flax import preprocessing
from mnv2_flax.runtime import per_seed
from mnv2_flax.runtime import placement
from mnv2_flax.train import training_state
from mnv2_flax.train.training_state import TrainState

AXIS = placement.AXIS


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0):
  """The batch's mean softmax cross-entropy, computed per seed in a pack
  (`per_seed`: its reductions then have the bits of a run alone)."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  # Smoothed always, as `label_smoothing` may be traced: by 0.0 the targets
  # are the one-hot ones exactly ((1 - 0) * t + 0 / n).
  targets = optax.smooth_labels(targets, label_smoothing)
  return _mean_cross_entropy(logits, targets)


def _plain_mean_cross_entropy(logits, targets):
  return optax.softmax_cross_entropy(logits, targets).mean()


@jax.custom_vjp
def _mean_cross_entropy(logits, targets):
  return per_seed.each_in_turn(_plain_mean_cross_entropy)(logits, targets)


def _mean_cross_entropy_fwd(logits, targets):
  return _mean_cross_entropy(logits, targets), (logits, targets)


def _mean_cross_entropy_bwd(residuals, g):
  def pull(logits, targets, g):
    return jax.vjp(_plain_mean_cross_entropy, logits, targets)[1](g)

  return per_seed.each_in_turn(pull)(*residuals, g)


_mean_cross_entropy.defvjp(_mean_cross_entropy_fwd, _mean_cross_entropy_bwd)


def _mean(x, axis_name):
  return jax.lax.pmean(x, axis_name) if axis_name else x


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  hparams: dict[str, jax.Array],
  *,
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  axis_name: str | None = AXIS,
):
  """One optimisation step; returns the new state and the step's metrics.

  `hparams` (`training_state.hyperparameters`): the peak learning rate,
  weight decay, label smoothing and EMA decay, as arguments (a pack's
  members differ in them); the rest of the recipe comes from `config`.

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
      logits, batch['label'], num_classes, hparams['label_smoothing']
    )
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
    loss_fn, has_aux=True
  )(state.params)
  grads = _mean(grads, axis_name)
  # No average of `batch_stats` here: the model's BN computed them from
  # statistics over `axis_name`, so every device already holds the same ones.
  # `state.tx` with this step's hyperparameters (the same structure: the
  # optimizer state is the one `tx` made).
  learning_rate = training_state.at_peak(
    learning_rate_fn, hparams['learning_rate']
  )
  tx = training_state.create_optimizer(
    config, learning_rate, hparams['weight_decay']
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    batch_stats=batch_stats,
  )
  # TF's ExponentialMovingAverage(num_updates=step): slow start, then decay.
  step = new_state.step.astype(jnp.float32)
  decay = jnp.minimum(hparams['ema_decay'], (1.0 + step) / (10.0 + step))
  ema = optax.incremental_update(
    new_state.params, state.ema_params, 1.0 - decay
  )
  new_state = new_state.replace(ema_params=ema)
  metrics = {
    'loss': loss,
    'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
    'learning_rate': learning_rate(state.step),
    # 1.0 while the loss and the new state are finite: checked before every
    # save, so a diverged state is never written over a good one.
    'finite': all_finite(loss, new_state).astype(jnp.float32),
  }
  return new_state, _mean(metrics, axis_name)


def all_finite(loss, state: TrainState) -> jax.Array:
  """True if the loss and every parameter and statistic are finite (one
  fused reduction per leaf; no norm that large finite values overflow)."""
  trees = (state.params, state.ema_params, state.batch_stats)
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(trees)]
  return jnp.isfinite(loss) & jnp.stack(leaves).all()


def train_steps(
  state: TrainState,
  batches: tuple[dict[str, jax.Array], ...],
  rng: jax.Array,
  hparams: dict[str, jax.Array],
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
    return train_step(state, batch, rng, hparams, **kwargs)

  return jax.lax.scan(body, state, stacked)


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


# ------------------------------------------------------------------ builders


def _train_fn(config, learning_rate_fn, steps: int = 1, pack: int = 0):
  """(state, batch or tuple of `steps` batches, rng, hparams) -> (state,
  metrics).

  With `pack` = N > 0, N members at once (`jax.vmap`): the state, each
  batch, the rng and the hyperparameters carry a leading axis of N, and so
  do the metrics. Inside
  the device-parallel step a collective over `AXIS` then reduces over the
  devices for each seed apart, as BatchNorm and the gradient mean need.
  """
  step = train_step if steps == 1 else train_steps
  fn = functools.partial(step, config=config, learning_rate_fn=learning_rate_fn)
  return jax.vmap(fn) if pack else fn


def _eval_fn(config, pack: int = 0) -> Callable:
  """(state, batch) -> metric sums, as `config.data` asks; with `pack`, a
  state of stacked seeds evaluated on one batch, sums per seed."""
  fn = functools.partial(
    eval_step,
    flip_average=config.data.eval_flip_average,
    normalization=config.data.normalization,
  )
  return jax.vmap(fn, in_axes=(0, None)) if pack else fn


def batch_moments(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  still_apply: Callable,
  normalization: str = 'inception',
) -> Any:
  """Per BatchNorm layer, the mean and variance of its inputs over `batch`
  (over all devices of the BN layers' axis) under `state.params`.

  `still_apply` is the model's `apply` with BatchNorm momentum 0 (and not
  frozen), so the statistics a training-mode pass writes are the batch's
  own, computed as the layers compute them. In `state.batch_stats`'s
  structure; `pooled_statistics` combines several batches'.
  """
  images = preprocessing.normalize(batch['image'], normalization)
  _, updates = still_apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    images,
    train=True,
    features_only=True,  # no dropout, no classifier: BN layers only
    mutable=['batch_stats'],
  )
  return updates['batch_stats']


def pooled_statistics(per_batch: list[Any]) -> Any:
  """BatchNorm statistics of batches of one size together, from each one's
  (`batch_moments`, fetched to the host): the mean of the means, and the
  mean of the variances plus the variance of the means, in float64 (no
  E[x^2] - E[x]^2 cancellation)."""

  def pool(*stats):
    means = np.stack([np.asarray(s['mean'], np.float64) for s in stats])
    variances = np.stack([np.asarray(s['var'], np.float64) for s in stats])
    mean = means.mean(0)
    var = variances.mean(0) + np.square(means - mean).mean(0)
    return {'mean': mean.astype(np.float32), 'var': var.astype(np.float32)}

  return jax.tree.map(
    pool,
    *per_batch,
    is_leaf=lambda node: isinstance(node, dict) and 'var' in node,
  )


def make_p_batch_moments(
  still_apply: Callable, normalization: str, pack: int = 0
) -> Callable:
  """`batch_moments` pmap-ed over the local devices, the state unreplicated
  (with `pack`: a state of stacked members, moments per member)."""
  fn = functools.partial(
    batch_moments, still_apply=still_apply, normalization=normalization
  )
  fn = jax.vmap(fn, in_axes=(0, None)) if pack else fn
  return jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0), out_axes=None)


def make_p_train_step(
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  devices: Sequence[jax.Device] | None = None,
  steps: int = 1,
  pack: int = 0,
) -> Callable:
  """`train_step` pmap-ed over the local devices (or `devices`), the state
  unreplicated and donated. With `steps` > 1, `train_steps`: it takes a
  tuple of `steps` batches and returns metrics stacked per step. With
  `pack` = N, a pack of N seeds (`_train_fn`): batches of (devices, N,
  per-device batch, ...), the state and rng stacked on a seed axis."""
  return jax.pmap(
    _train_fn(config, learning_rate_fn, steps, pack),
    axis_name=AXIS,
    in_axes=(None, 0, None, None),
    out_axes=(None, None),
    # The old state's buffers hold the new one: one state in memory, not
    # two. A buffer still referenced elsewhere is not donated but copied
    # (on CPU, a checkpoint being written reads the state in place).
    donate_argnums=(0,),
    devices=devices,
  )


def make_p_eval_step(
  config: ml_collections.ConfigDict, pack: int = 0
) -> Callable:
  """`eval_step` pmap-ed over the local devices, the state unreplicated
  (with `pack`: stacked seeds, sums per seed)."""
  return jax.pmap(
    _eval_fn(config, pack),
    axis_name=AXIS,
    in_axes=(None, 0),
    out_axes=None,
  )


def sharded_steps(
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  mesh: jax.sharding.Mesh,
  pack: int = 0,
) -> tuple[Callable, Callable]:
  """The pmap-ed train and eval steps as `jit(shard_map(...))` over `mesh`
  (axis `AXIS`): the program pmap builds, for meshes of devices that this
  host cannot run (`lowering_platforms`, deviceless TPU topologies).

  Arguments as the pmap-ed steps take them: the state replicated, batches
  with a leading axis of one entry per device.
  """
  replicated = jax.sharding.PartitionSpec()
  split = jax.sharding.PartitionSpec(AXIS)

  def per_device(step):
    def run(state, batch, *rest):
      return step(state, jax.tree.map(lambda x: x[0], batch), *rest)

    return run

  train = jax.shard_map(
    per_device(_train_fn(config, learning_rate_fn, pack=pack)),
    mesh=mesh,
    in_specs=(replicated, split, replicated, replicated),
    out_specs=(replicated, replicated),
    # pmap's semantics: the step averages its gradients itself (with the
    # check on, autodiff would sum them over the devices first).
    check_vma=False,
  )
  evaluate = jax.shard_map(
    per_device(_eval_fn(config, pack)),
    mesh=mesh,
    in_specs=(replicated, split),
    out_specs=replicated,
    check_vma=False,
  )
  return jax.jit(train, donate_argnums=(0,)), jax.jit(evaluate)
