"""Times the library's own train step or inference apply (the library of
`python -m mnv2_flax.benchmark`, whose docstring says what it prints).

Train mode times `steps.train_step` under the same `jax.pmap` as the
training loop (SGD with momentum 0.9 and weight decay, torchvision's
numerics, EMA of the parameters included), on a fixed random uint8 batch
split over the devices and placed there once (the timed calls copy nothing
from the host). Infer mode times `model.apply(..., train=False)` under
`jax.jit` on one device. Imports JAX, Flax and Optax only: it runs on an
accelerator image without TensorFlow.
"""

import collections
import functools
import glob
import re
import resource
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

from mnv2_flax import defaults
from mnv2_flax import preprocessing
from mnv2_flax import stats
from mnv2_flax.cpu import fast_path
from mnv2_flax.runtime import placement
from mnv2_flax.train import programs
from mnv2_flax.train import steps as steps_lib
from mnv2_flax.train import training_state

MODES = ('train', 'infer')
DTYPES = ('float32', 'bfloat16')


def make_config(
  width_multiplier: float,
  resolution: int,
  batch_size: int,
  dtype: str,
  output_stride: int | None = None,
  cpu_fast_path: bool = True,
) -> ml_collections.ConfigDict:
  """A run's config with torchvision's numerics and SGD step."""
  config = defaults.get_config()
  config.model.update(
    padding='torch',
    bn_epsilon=1e-5,
    bn_momentum=0.9,
    init_scheme='torchvision',
    output_stride=output_stride,
    width_multiplier=width_multiplier,
    dropout_rate=0.2,
  )
  config.optim.update(
    optimizer='sgd',
    learning_rate=0.5,
    lr_reference_batch=1024,
    schedule='cosine',
    weight_decay=4e-5,
    weight_decay_mask='no_norm',
  )
  config.data.image_size = resolution
  config.data.batch_size = batch_size
  config.train.dtype = dtype
  config.train.cpu_fast_path = cpu_fast_path
  return config


def _batch(batch_size, resolution, num_classes, shape_prefix):
  """Random uint8 pixels and labels, as the input pipeline makes them."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (batch_size, resolution, resolution, 3))
  label = rng.integers(0, num_classes, batch_size)
  return {
    'image': image.astype(np.uint8).reshape(
      shape_prefix + (resolution, resolution, 3)
    ),
    'label': label.astype(np.int32).reshape(shape_prefix),
  }


def _time(fn, args, steps, warmup):
  """Median seconds of fn(*args) (its output fed back as args[0]: the
  train step donates its state); returns (median, times, last args)."""
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - start)
    if isinstance(out, tuple):  # train: the new state goes back in
      args = (out[0],) + args[1:]
  return statistics.median(times), times, args


def run(
  width_multiplier: float = 1.0,
  resolution: int = 224,
  batch_size: int = 32,
  mode: str = 'train',
  dtype: str = 'float32',
  devices: int | None = None,
  num_classes: int = 1000,
  steps: int = 10,
  warmup: int = 2,
  profile_steps: int = 0,
  output_stride: int | None = None,
  cpu_fast_path: bool = True,
  steps_per_call: int = 1,
  pack: int = 1,
) -> dict:
  """Compiles and times one configuration; returns the measurements.

  Train mode with `steps_per_call` > 1 times calls of that many steps
  (`config.train.steps_per_call`); step times are per step. `pack` > 1 times
  a pack of that many seeds (`steps._train_fn`), each with `batch_size`
  images per step: images/s then counts every seed's images.
  """
  if mode not in MODES:
    raise ValueError(f'--mode={mode!r}: valid are {", ".join(MODES)}.')
  if dtype not in DTYPES:
    raise ValueError(f'--dtype={dtype!r}: valid are {", ".join(DTYPES)}.')
  available = jax.local_device_count()
  devices = devices or available
  if not 1 <= devices <= available or batch_size % devices:
    raise ValueError(
      f'--devices={devices}: expected 1..{available} devices dividing '
      f'--batch_size={batch_size}.'
    )
  config = make_config(
    width_multiplier,
    resolution,
    batch_size,
    dtype,
    output_stride,
    cpu_fast_path,
  )
  defaults.check(config)
  model = training_state.create_model(config, num_classes)
  counts = stats.count(model.clone(bn_axis_name=None), resolution)
  if not (steps_per_call >= 1 and (mode == 'train' or steps_per_call == 1)):
    raise ValueError(
      f'--steps_per_call={steps_per_call}: expected >= 1 (and 1 with '
      '--mode=infer).'
    )
  if not (pack >= 1 and (mode == 'train' or pack == 1)):
    raise ValueError(
      f'--pack={pack}: expected a whole number >= 1 (and 1 with --mode=infer).'
    )
  mesh = placement.device_mesh(jax.local_devices()[:devices])
  alone = None
  if mode == 'train':
    flops_per_image = 3 * 2 * counts.macs
    train = functools.partial(
      _train_program, config, model, mesh, num_classes, steps_per_call
    )
    step, args = train(pack)
    if pack > 1:  # one seed's step, timed in turn with the pack's
      alone = train(1)
  else:
    flops_per_image = 2 * counts.macs
    step, args = _infer_program(config, model, num_classes)

  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  if alone is None:
    median, times, args = _time(compiled, args, steps, warmup)
  else:
    alone_compiled = alone[0].lower(*alone[1]).compile()
    (median, times, args), (alone_median, _, _) = _time_in_turn(
      [(compiled, args), (alone_compiled, alone[1])], steps, warmup
    )
  median, times = median / steps_per_call, [t / steps_per_call for t in times]
  ops = profile_ops(compiled, args, profile_steps) if profile_steps else None
  pack_fields = {}
  if alone is not None:
    alone_step = alone_median / steps_per_call
    pack_fields = dict(
      alone_median_step_seconds=alone_step,
      alone_images_per_second=batch_size / alone_step,
      pack_speedup=pack * alone_step / median,
    )
  return dict(
    mode=mode,
    width_multiplier=width_multiplier,
    resolution=resolution,
    batch_size=batch_size,
    num_classes=num_classes,
    dtype=dtype,
    devices=devices,
    steps_per_call=steps_per_call,
    pack=pack,
    cpu_fast_path=bool(cpu_fast_path and fast_path.enabled()),
    backend=jax.default_backend(),
    compile_seconds=compile_seconds,
    median_step_seconds=median,
    min_step_seconds=min(times),
    images_per_second=pack * batch_size / median,
    gflops_per_second=flops_per_image * pack * batch_size / median / 1e9,
    macs_per_image=counts.macs,
    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    ops=ops,
    **pack_fields,
  )


def _train_program(config, model, mesh, num_classes, steps_per_call, pack):
  """(pmap-ed train step, its placed arguments) for `pack` seeds (1: the
  single-run program, no seed axis)."""
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=1000)
  # A pack's seeds start from their own initial states, as in training.
  states = [
    training_state.create_train_state(config, model, lr, jax.random.key(seed))
    for seed in range(pack)
  ]
  state = states[0] if pack == 1 else programs.stack(states)
  rng = jax.random.key(1)
  if pack > 1:
    rng = jax.random.split(rng, pack)
  devices = mesh.devices.size
  batch_size, resolution = config.data.batch_size, config.data.image_size
  step = steps_lib.make_p_train_step(
    config,
    lr,
    list(mesh.devices.flat),
    steps=steps_per_call,
    pack=pack if pack > 1 else 0,
  )
  seeds = (pack,) if pack > 1 else ()
  batch = _batch(
    batch_size * pack,
    resolution,
    num_classes,
    (devices, *seeds, batch_size // devices),
  )
  # Every argument is placed on the devices once, as the training loop's
  # prefetch does: the timed calls copy nothing from the host.
  batch = jax.device_put(batch, placement.split(mesh))
  replicated = placement.replicated(mesh)
  args = (
    jax.device_put(state, replicated),
    batch if steps_per_call == 1 else (batch,) * steps_per_call,
    jax.device_put(rng, replicated),
    jax.device_put(
      training_state.hyperparameters(config, pack if pack > 1 else 0),
      replicated,
    ),
  )
  return step, args


def _infer_program(config, model, num_classes):
  """(jit-ed inference apply, its arguments on the first device)."""
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=1000)
  state = training_state.create_train_state(
    config, model, lr, jax.random.key(0)
  )
  infer_model = model.clone(bn_axis_name=None)
  normalization = config.data.normalization

  def infer(variables, images):
    images = preprocessing.normalize(images, normalization)
    return infer_model.apply(variables, images, train=False)

  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  batch = _batch(
    config.data.batch_size,
    config.data.image_size,
    num_classes,
    (config.data.batch_size,),
  )
  args = jax.device_put((variables, batch['image']), jax.local_devices()[0])
  return jax.jit(infer), args


def _time_in_turn(programs_args, steps, warmup, rounds=3):
  """`_time` of each (compiled, args) in turn, `rounds` times `steps`
  steps each (the machine's drifts then fall on all alike); returns each
  one's (median, times, last args) over all its timed steps."""
  per_round = max(1, -(-steps // rounds))
  results = [[[], args] for _, args in programs_args]
  for r in range(rounds):
    for (compiled, _), result in zip(programs_args, results, strict=True):
      _, times, result[1] = _time(
        compiled, result[1], per_round, warmup if r == 0 else 0
      )
      result[0] += times
  return [(statistics.median(times), times, args) for times, args in results]


def profile_ops(compiled, args, steps: int) -> list[dict]:
  """Per-op time of `steps` runs of `compiled`, from a jax.profiler trace.

  Returns one entry per XLA op (fusion, dot, ...) that ran, with its mean
  time per step summed over the devices' op lines (GPU, TPU) or the CPU
  runtime's threads (the entries then add up to more than the step time
  when ops run in parallel), its output shape and the
  model operation it came from (HLO metadata), largest first.
  """
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    _time(compiled, args, steps, 0)
    jax.profiler.stop_trace()
    (path,) = glob.glob(f'{logdir}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  return ops_of_trace(data, compiled.as_text(), steps)


def ops_of_trace(data, hlo: str, steps: int) -> list[dict]:
  """`profile_ops`'s entries from a trace (`jax.profiler.ProfileData`, or
  anything with its planes, lines and events) of `steps` runs of the
  program whose HLO text is `hlo`."""
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not _is_op_line(plane.name, line.name):
        continue
      for event in line.events:
        if not event.name.startswith(('ThunkExecutor', 'SlinkyThreadPool')):
          total[event.name] += event.duration_ns
  ops = []
  for name, ns in total.most_common():
    line = re.search(rf'%{re.escape(name)} = (\S+) .*', hlo)
    source = line and re.search(r'op_name="([^"]*)"', line.group(0))
    ops.append(
      dict(
        name=name,
        kind=re.sub(r'\.\d+$', '', name),
        ms_per_step=ns / 1e6 / steps,
        shape=line.group(1) if line else '',
        source=source.group(1) if source else '',
      )
    )
  return ops


def _is_op_line(plane: str, line: str) -> bool:
  """Whether a trace line holds XLA ops: a GPU's or TPU's 'XLA Ops' line
  (plane '/device:GPU:0', '/device:TPU:0'), or on the CPU backend the XLA
  runtime's threads ('tf_XLA...' lines of the host plane)."""
  if plane.startswith('/device:') and not plane.startswith('/device:CPU'):
    return line == 'XLA Ops'
  return line.startswith('tf_XLA')


def format_ops(ops: list[dict], top: int) -> str:
  """The op kinds and the single ops that take the most time."""
  all_ms = sum(op['ms_per_step'] for op in ops)
  kinds = collections.Counter()
  for op in ops:
    kinds[op['kind']] += op['ms_per_step']
  lines = [f'op time per step, summed over threads: {all_ms:,.1f} ms']
  lines += [
    f'  {ms:9.1f} ms {100 * ms / all_ms:5.1f}%  {kind}'
    for kind, ms in kinds.most_common(top)
  ]
  lines.append('largest single ops:')
  lines += [
    f'  {op["ms_per_step"]:9.1f} ms  {op["name"]}  {op["shape"]}  '
    f'{op["source"].removeprefix("jit(_fun)/")}'
    for op in ops[:top]
  ]
  return '\n'.join(lines)


def format_result(r: dict) -> str:
  return (
    f'{r["mode"]} w{r["width_multiplier"]} r{r["resolution"]} '
    f'b{r["batch_size"]} {r["dtype"]} {r["devices"]} dev '
    f'{r["steps_per_call"]} step(s)/call '
    f'{r["backend"]}{"/cpu_fast_path" * r["cpu_fast_path"]}'
    f'{f" pack {r['pack']}" if r.get("pack", 1) > 1 else ""}: compile '
    f'{r["compile_seconds"]:.1f} s, step {1e3 * r["median_step_seconds"]:.1f}'
    f' ms (median), {r["images_per_second"]:,.1f} img/s, '
    f'{r["gflops_per_second"]:.1f} GFLOP/s, peak RSS '
    f'{r["peak_rss_mib"]:,.0f} MiB'
  ) + (_format_pack(r) if r.get('pack', 1) > 1 else '')


def _format_pack(r: dict) -> str:
  """The pack's line: per seed, in all, and one seed alone timed in turn."""
  return (
    f'\npack of {r["pack"]} seeds: {r["images_per_second"] / r["pack"]:,.1f}'
    f' img/s per seed, {r["images_per_second"]:,.1f} in all; one seed alone'
    f' (timed in turn): step {1e3 * r["alone_median_step_seconds"]:.1f} ms, '
    f'{r["alone_images_per_second"]:,.1f} img/s; the pack trains '
    f'{r["pack_speedup"]:.2f}x the images/s of seeds one after another'
  )
