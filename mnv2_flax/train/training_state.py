"""The train state and what it is made of: the model, the learning-rate
schedule and the optimizer.

  model = training_state.create_model(config, num_classes)
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch)
  state = training_state.initial_train_state(config, model, lr)

Imports JAX, Flax and Optax only (no TensorFlow): a host without the input
pipeline's packages can build, time and compile the training programs.
"""

from collections.abc import Callable
import functools
from typing import Any

from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mnv2_flax import models
from mnv2_flax.cpu import fast_path
from mnv2_flax.runtime import placement


class TrainState(train_state.TrainState):
  """Parameters, optimizer state, BatchNorm statistics and EMA parameters."""

  batch_stats: Any
  ema_params: Any


def create_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  axis_name: str | None = placement.AXIS,
) -> models.MobileNetV2:
  """The model of `config.model`; BN statistics averaged over `axis_name`.

  The one constructor of the library's models (training, evaluation, export,
  statistics) and the one place where backend-specific layers enter: with
  `config.train.cpu_fast_path` on the CPU backend, `fast_path.layers()`
  (same variables, faster steps); Flax's layers everywhere else.
  """
  dtype = jnp.bfloat16 if config.train.dtype == 'bfloat16' else jnp.float32
  layers = fast_path.layers() if config.train.cpu_fast_path else {}
  return models.MobileNetV2(
    num_classes=num_classes,
    bn_axis_name=axis_name,
    dtype=dtype,
    **config.model.to_dict(),
    **layers,
  )


# ----------------------------------------------------------------- optimizer


# The optimizer's scalars that keep a program's shapes. The train step takes
# them as arguments (`hyperparameters`), not as constants: the members of a
# pack may differ in them, and runs that differ only in them compile one
# program.
HYPERPARAMETERS = (
  'learning_rate',
  'weight_decay',
  'label_smoothing',
  'ema_decay',
)


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`config.optim.learning_rate` scaled with the global batch: the peak."""
  optim = config.optim
  return optim.learning_rate * config.data.batch_size / optim.lr_reference_batch


def hyperparameters(
  config: ml_collections.ConfigDict, members: int = 0
) -> dict[str, Any]:
  """The train step's scalar arguments, from `config.optim` (float32, as
  the step computes); with `members` = N, each repeated on a pack's axis of
  N. 'learning_rate' is the schedule's peak (`base_learning_rate`), the
  others the fields of their names."""
  optim = config.optim
  values = {
    'learning_rate': base_learning_rate(config),
    'weight_decay': optim.weight_decay,
    'label_smoothing': optim.label_smoothing,
    'ema_decay': optim.ema_decay,
  }
  if members:
    return {k: np.full((members,), v, np.float32) for k, v in values.items()}
  return {k: np.float32(v) for k, v in values.items()}


class LearningRate:
  """`config`'s learning-rate schedule: an optax schedule (count -> rate),
  and `at(peak)`, the same schedule at another peak. The train step builds
  it at its `hyperparameters()['learning_rate']`, a traced scalar: at the
  config's own peak, bitwise the rates of the schedule with the peak built
  in (optax computes the same expressions with a float or an array)."""

  def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch: int):
    self._optim, self._steps_per_epoch = config.optim, steps_per_epoch
    self._total = max(1, int(config.train.num_epochs * steps_per_epoch))
    self._schedule = self.at(base_learning_rate(config))

  def __call__(self, count: Any) -> Any:
    return self._schedule(count)

  def at(self, peak: Any) -> optax.Schedule:
    """Warm-up to `peak` (a float or a traced scalar), then the schedule."""
    optim, steps_per_epoch = self._optim, self._steps_per_epoch
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    if optim.schedule == 'exponential':  # TF-slim: x0.98 every 2.5 epochs
      main = optax.exponential_decay(
        peak,
        transition_steps=max(1, int(optim.decay_epochs * steps_per_epoch)),
        decay_rate=optim.decay_rate,
        staircase=True,
      )
    elif optim.schedule == 'cosine':
      main = optax.cosine_decay_schedule(peak, max(1, self._total - warmup))
    else:
      main = optax.constant_schedule(peak)
    if warmup == 0:
      return main
    return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), main], [warmup]
    )


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> LearningRate:
  """Base rate scaled with the global batch, warm-up, then the schedule."""
  return LearningRate(config, steps_per_epoch)


def at_peak(learning_rate_fn: optax.Schedule, peak: Any) -> optax.Schedule:
  """`learning_rate_fn` at `peak` where it is a `LearningRate`; any other
  schedule (a test's constant) as it is."""
  at = getattr(learning_rate_fn, 'at', None)
  return at(peak) if at else learning_rate_fn


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
  config: ml_collections.ConfigDict,
  learning_rate_fn: optax.Schedule,
  weight_decay: Any = None,
) -> optax.GradientTransformation:
  """`config.optim`'s optimizer; `weight_decay` (a float or a traced
  scalar) in place of `config.optim.weight_decay`, whose being zero or not
  alone decides the optimizer's structure."""
  optim = config.optim
  if weight_decay is None:
    weight_decay = optim.weight_decay
  tx = _optimizer(optim, learning_rate_fn, weight_decay)
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


def _optimizer(
  optim, learning_rate_fn, weight_decay
) -> optax.GradientTransformation:
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
      weight_decay=weight_decay,
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
  return optax.chain(optax.add_decayed_weights(weight_decay, mask), opt)


# --------------------------------------------------------------------- state


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


def compile_initializer(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  learning_rate_fn: optax.Schedule,
) -> Callable[[jax.Array], TrainState]:
  """rng -> a freshly initialised state: compiled once, for any seed."""
  init = jax.jit(_init_fn(config, model, learning_rate_fn))
  rng = jax.eval_shape(jax.random.key, 0)
  options = fast_path.init_compiler_options()
  return init.lower(rng).compile(compiler_options=options)


def create_train_state(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  learning_rate_fn: optax.Schedule,
  rng: jax.Array,
) -> TrainState:
  """A freshly initialised state (jit-compiled, on the default device)."""
  return compile_initializer(config, model, learning_rate_fn)(rng)


def initial_train_state(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  learning_rate_fn: optax.Schedule,
) -> TrainState:
  """The state a run starts from (seed `config.seed`)."""
  return create_train_state(
    config, model, learning_rate_fn, jax.random.key(config.seed)
  )


def abstract_train_state(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  learning_rate_fn: optax.Schedule,
) -> TrainState:
  """The state's shapes and dtypes, without computing anything."""
  rng = jax.eval_shape(jax.random.key, 0)  # a key's shape: nothing runs
  return jax.eval_shape(_init_fn(config, model, learning_rate_fn), rng)


def eval_state(
  model: models.MobileNetV2, variables: dict[str, Any]
) -> TrainState:
  """A state that only evaluates: restored variables, no optimizer."""
  return TrainState(
    step=0,
    apply_fn=model.apply,
    params=variables['params'],
    tx=None,
    opt_state=None,
    batch_stats=variables['batch_stats'],
    ema_params=variables['ema_params'],
  )
