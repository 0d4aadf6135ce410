"""Which CPU layer's bits depend on the number of threads, each on its own.

  .venv/bin/python tools/thread_bits.py [--config=configs/ablation.py:...]

Runs itself twice, under `taskset -c 0` (XLA's CPU thread pool of 1) and on
all cores, and compares. Each child builds the config's model with the CPU
fast path's layers, records every conv and BatchNorm call the network makes
(shapes, strides, padding) and runs each as its own jitted program, forward
and backward (`jax.vjp`) on fixed random inputs, then the whole model's loss
gradient with the fast path on and off. The parent prints, per op, the
largest difference between the two runs and the median time of a call on
each.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(config_arg: str, out: str, repeats: int, pack: int = 1) -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from ml_collections import config_flags  # noqa: F401

  from mnv2_flax import defaults
  from mnv2_flax.cpu import batch_norm
  from mnv2_flax.cpu import dense
  from mnv2_flax.cpu import depthwise
  from mnv2_flax.cpu import fast_path
  from mnv2_flax.train import steps
  from mnv2_flax.train import training_state

  path, _, arg = config_arg.partition(':')
  import importlib.util

  spec = importlib.util.spec_from_file_location('probe_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = defaults.with_defaults(module.get_config(arg or None))
  size, batch = config.data.image_size, config.data.batch_size
  channels = 3

  convs, norms = {}, {}

  def recording_conv(lhs, rhs, window_strides, padding, **kwargs):
    key = (lhs.shape, rhs.shape, tuple(window_strides), str(padding))
    convs.setdefault(
      key, (lhs.shape, rhs.shape, tuple(window_strides), padding, kwargs)
    )
    return depthwise.conv_general_dilated(
      lhs, rhs, window_strides, padding, **kwargs
    )

  def recording_norm(*, activation=None, **kwargs):
    module = batch_norm.BatchNorm(activation=activation, **kwargs)
    return _Recorder(module, activation)

  class _Recorder(nn.Module):
    inner: nn.Module
    activation: object

    def __call__(self, x, use_running_average=None):
      key = (x.shape, self.activation is not None)
      norms.setdefault(key, key)
      return self.inner(x, use_running_average)

  model = training_state.create_model(config, 10, axis_name=None)
  images = jnp.zeros((batch, size, size, channels))
  recording = model.clone(
    conv=functools.partial(nn.Conv, conv_general_dilated=recording_conv),
    norm_act=recording_norm,
  )
  jax.eval_shape(lambda: recording.init(jax.random.key(0), images, train=True))
  rng = np.random.default_rng(0)
  results, times = {}, {}

  def run(name, fn, *args):
    if pack > 1:  # seed 0 of a vmapped pack against the op alone
      stacked = jax.tree.map(
        lambda a: jnp.stack([a] + [a * (1 + i) for i in range(1, pack)]), args
      )
      alone = jax.jit(fn)(*args)
      packed = jax.tree.map(lambda y: y[0], jax.jit(jax.vmap(fn))(*stacked))
      diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
          jax.tree.leaves(alone), jax.tree.leaves(packed), strict=True
        )
      )
      print(f'{name:58s} {diff:10.3g}', flush=True)
      return
    fn = jax.jit(fn)
    out = jax.block_until_ready(fn(*args))
    elapsed = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      elapsed.append(time.perf_counter() - start)
    times[name] = float(np.median(elapsed))
    for i, leaf in enumerate(jax.tree.leaves(out)):
      results[f'{name}#{i}'] = np.asarray(leaf)

  def normal(shape):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

  for lhs_shape, rhs_shape, strides, padding, kwargs in convs.values():
    x, k = normal(lhs_shape), normal(rhs_shape)

    def conv_vjp(x, k, strides=strides, padding=padding, kwargs=kwargs):
      conv = functools.partial(
        depthwise.conv_general_dilated,
        window_strides=strides,
        padding=padding,
        **kwargs,
      )
      y, pull = jax.vjp(conv, x, k)
      return y, pull(jnp.cos(y))

    kind = (
      'depthwise'
      if kwargs.get('feature_group_count', 1) > 1
      else ('pointwise' if rhs_shape[:2] == (1, 1) else 'dense')
    )
    run(f'{kind} {lhs_shape}x{rhs_shape} s{strides[0]}', conv_vjp, x, k)

  for shape, act in norms.values():
    x = normal(shape)
    scale, bias = normal(shape[-1:]), normal(shape[-1:])

    def norm_vjp(x, scale, bias, act=act):
      fn = functools.partial(
        batch_norm.batch_norm_train,
        epsilon=1e-3,
        axis_name=None,
        activation='relu6' if act else None,
        dtype=jnp.float32,
      )
      y, pull = jax.vjp(fn, x, scale, bias)
      return y, pull(
        (jnp.cos(y[0]), jnp.zeros_like(y[1]), jnp.zeros_like(y[2]))
      )

    run(f'batchnorm{"+relu6" if act else ""} {shape}', norm_vjp, x, scale, bias)

  # The classifier: pooled head features x (head, classes).
  x = normal((batch, model.head_channels))
  w = normal((model.head_channels, 10))

  def classifier_vjp(x, w):
    module = dense.Dense(10)
    y, pull = jax.vjp(
      lambda x, w: module.apply(
        {'params': {'kernel': w, 'bias': jnp.zeros(10)}}, x
      ),
      x,
      w,
    )
    return y, pull(jnp.cos(y))

  run(f'classifier ({batch}, {x.shape[1]})x{w.shape}', classifier_vjp, x, w)

  pixels = normal((batch, size, size, channels))
  labels = jnp.asarray(rng.integers(0, 10, batch))
  for name, layers in (
    ('model fast path', fast_path.layers()),
    ('model XLA', {}),
  ):
    net = (
      model.clone(**layers)
      if layers
      else model.clone(conv=nn.Conv, norm_act=type(model)().norm_act)
    )
    variables = net.init(jax.random.key(0), pixels, train=False)

    def loss_grad(params, net=net, variables=variables):
      def loss(params):
        logits, _ = net.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          pixels,
          train=True,
          mutable=['batch_stats'],
          rngs={'dropout': jax.random.key(1)},
        )
        return steps.cross_entropy(logits, labels, logits.shape[-1])

      return jax.value_and_grad(loss)(params)

    run(name, loss_grad, variables['params'])

  if pack > 1:
    return
  np.savez(out, **results)
  with open(out + '.json', 'w') as f:
    json.dump(dict(times=times, devices=os.sched_getaffinity(0).__len__()), f)


def _dot_kernel_gradient(x, dy):
  """The weight gradient of a 1x1 conv as it was: one `dot_general`."""
  from jax import lax
  import jax.numpy as jnp

  rows = dy.shape[0] * dy.shape[1] * dy.shape[2]
  return lax.dot_general(
    x.reshape(rows, x.shape[3]).astype(jnp.float32),
    dy.reshape(rows, dy.shape[3]).astype(jnp.float32),
    (((0,), (0,)), ((), ())),
  )


def _cost(steps: int) -> None:
  """Train step with the 1x1 weight gradient as a dot and as a reduction,
  timed in turn in one process (benchmark_lib's program and timing)."""
  import jax

  from mnv2_flax.benchmark import lib as benchmark_lib
  from mnv2_flax.cpu import depthwise
  from mnv2_flax.runtime import placement
  from mnv2_flax.train import training_state

  shapes = (
    ('sweep w0.35 32px b256', 0.35, 32, 256, None),
    ('sweep w0.75 48px b256', 0.75, 48, 256, None),
    ('quickstart w0.5 32px b128 os16', 0.5, 32, 128, 16),
    ('w1.0 224px b32', 1.0, 224, 32, None),
  )
  print(f'{"train step":32s} {"dot ms":>8s} {"reduce ms":>10s} {"ratio":>6s}')
  reduction = depthwise._kernel_gradient
  for name, width, res, batch, os_ in shapes:
    config = benchmark_lib.make_config(width, res, batch, 'float32', os_)
    model = training_state.create_model(config, 10)
    mesh = placement.device_mesh(jax.local_devices()[:1])
    compiled = []
    for fn in (_dot_kernel_gradient, reduction):
      depthwise._kernel_gradient = fn
      step, args = benchmark_lib._train_program(config, model, mesh, 10, 1, 1)
      compiled.append((step.lower(*args).compile(), args))
    depthwise._kernel_gradient = reduction
    (dot, *_), (red, *_) = benchmark_lib._time_in_turn(compiled, steps, 2)
    print(f'{name:32s} {dot * 1e3:8.1f} {red * 1e3:10.1f} {red / dot:6.3f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--config', default='configs/ablation.py:width=0.35,res=32'
  )
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument(
    '--cost',
    action='store_true',
    help='time the train step with the old and new 1x1 weight gradient',
  )
  parser.add_argument(
    '--pack',
    type=int,
    default=1,
    help='N > 1: compare each op vmapped over N seeds with the op alone',
  )
  parser.add_argument('--child', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.pack > 1:
    print(f'{"op (forward + backward)":58s} {"|pack - alone|":>10s}')
    _child(args.config, '', 1, args.pack)
    return
  if args.cost:
    _cost(max(args.repeats, 9))
    return
  if args.child:
    _child(args.config, args.child, args.repeats)
    return
  cores = sorted(os.sched_getaffinity(0))
  runs = {}
  with tempfile.TemporaryDirectory() as tmp:
    for label, cpus in (
      ('1 thread', cores[:1]),
      (f'{len(cores)} threads', cores),
    ):
      out = os.path.join(tmp, f'{len(cpus)}.npz')
      command = ['taskset', '-c', ','.join(map(str, cpus)), sys.executable]
      command += [__file__, '--config', args.config, '--child', out]
      command += ['--repeats', str(args.repeats)]
      subprocess.run(command, check=True)
      with open(out + '.json') as f:
        times = json.load(f)['times']
      runs[label] = (dict(np.load(out)), times)
  (a_label, (a, a_times)), (b_label, (b, b_times)) = runs.items()
  print(
    f'{"op (forward + backward)":58s} {"max |diff|":>10s} '
    f'{a_label + " ms":>11s} {b_label + " ms":>11s}'
  )
  for name in a_times:
    keys = [k for k in a if k.rsplit('#', 1)[0] == name]
    diff = max(float(np.max(np.abs(a[k] - b[k]), initial=0)) for k in keys)
    print(
      f'{name:58s} {diff:10.3g} {a_times[name] * 1e3:11.2f} '
      f'{b_times[name] * 1e3:11.2f}'
    )


if __name__ == '__main__':
  main()
