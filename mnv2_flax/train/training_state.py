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
