"""Times the library's own train step or inference apply.

  python -m mnv2_flax.benchmark --width_multiplier=0.5 --resolution=32 \
      --batch_size=256 --num_classes=10 --mode=train [--dtype=bfloat16]
      [--devices=N] [--nocpu_fast_path] [--output_stride=8]
      [--steps_per_call=8] [--profile_steps=3] [--json]

Train mode times `train_lib.train_step` under the same `jax.pmap` as the
training loop (SGD with momentum 0.9 and weight decay, torchvision's
numerics, EMA of the parameters included), on a fixed
random uint8 batch split over `--devices` and placed there once (the timed
calls copy nothing from the host). `--steps_per_call=N` times the loop's
`lax.scan` program of N steps (times per step). Infer mode times
`model.apply(..., train=False)` under `jax.jit` on one device.

Prints: compile time (ahead-of-time `lower().compile()`, through the
persistent compilation cache unless `--compilation_cache_dir=''`), the median
step time over `--steps` timed steps after `--warmup` untimed ones, images/s,
achieved GFLOP/s (2 FLOPs per MAC from `mnv2_flax.stats`, x3 for a train step:
forward plus a backward of twice its cost), and the process's peak resident
memory. `--profile_steps=N` traces N more steps with `jax.profiler` and prints
the time per XLA op kind and the largest single ops with the model operation
each came from.

Without the hardware: `--aot_topology=v5e:2x2 [--config=configs/default.py]`
compiles the train step for that TPU topology (libtpu, `make setup-tpu`)
and prints XLA's FLOPs, bytes accessed and temporary memory per chip.
"""

import collections
import dataclasses
import glob
import json
import re
import resource
import statistics
import tempfile
import time

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from mnv2_flax import aot
from mnv2_flax import cli
from mnv2_flax import compilation_cache
from mnv2_flax import cpu
from mnv2_flax import defaults
from mnv2_flax import preprocessing
from mnv2_flax import stats
from mnv2_flax import train_lib

MODES = ('train', 'infer')
DTYPES = ('float32', 'bfloat16')

_WIDTH = flags.DEFINE_float('width_multiplier', 1.0, 'Width multiplier.')
_RESOLUTION = flags.DEFINE_integer('resolution', 224, 'Input height and width.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Global batch size.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'Train step or inference.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', DTYPES, 'Compute dtype.')
_DEVICES = flags.DEFINE_integer('devices', None, 'Local devices; default: all.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classifier outputs.')
_CPU_FAST_PATH = flags.DEFINE_bool(
  'cpu_fast_path', True, 'On CPU, the layers of mnv2_flax.cpu.'
)
_OUTPUT_STRIDE = flags.DEFINE_integer(
  'output_stride', None, 'The model output_stride (default: plain, 32).'
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
_CACHE_DIR = flags.DEFINE_string(
  'compilation_cache_dir',
  compilation_cache.DEFAULT_DIR,
  "Persistent compilation cache; '' disables it.",
)
_PROFILE_STEPS = flags.DEFINE_integer(
  'profile_steps', 0, 'Trace this many more steps; print time per op.'
)
_PROFILE_TOP = flags.DEFINE_integer(
  'profile_top', 15, 'Op kinds and ops to print.'
)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')
_STEPS_PER_CALL = flags.DEFINE_integer(
  'steps_per_call', 1, 'Train steps per call (lax.scan); times are per step.'
)
_AOT_TOPOLOGY = flags.DEFINE_string(
  'aot_topology',
  None,
  "Compile the train step for this TPU topology (e.g. 'v5e:2x2'; libtpu, no "
  'TPU needed) and print its FLOPs, bytes accessed and temporaries instead '
  'of timing anything.',
)
_CONFIG = None  # --config, defined when run as a program (sweep has one)


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
) -> dict:
  """Compiles and times one configuration; returns the measurements.

  Train mode with `steps_per_call` > 1 times calls of that many steps
  (`config.train.steps_per_call`); step times are per step.
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
  train_lib.check_config(config)
  model = train_lib.create_model(config, num_classes)
  counts = stats.count(model.clone(bn_axis_name=None), resolution)
  lr = train_lib.create_learning_rate_fn(config, steps_per_epoch=1000)
  state = train_lib.create_train_state(config, model, lr, jax.random.key(0))

  # Every argument is placed on the devices once, as the training loop's
  # prefetch does: the timed calls copy nothing from the host.
  mesh = jax.sharding.Mesh(
    np.array(jax.local_devices()[:devices]), (train_lib.AXIS,)
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if not (steps_per_call >= 1 and (mode == 'train' or steps_per_call == 1)):
    raise ValueError(
      f'--steps_per_call={steps_per_call}: expected >= 1 (and 1 with '
      '--mode=infer).'
    )
  if mode == 'train':
    step = train_lib.make_p_train_step(
      config, lr, jax.local_devices()[:devices], steps=steps_per_call
    )
    batch = _batch(
      batch_size, resolution, num_classes, (devices, batch_size // devices)
    )
    split = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(train_lib.AXIS)
    )
    batch = jax.device_put(batch, split)
    args = (
      jax.device_put(state, replicated),
      batch if steps_per_call == 1 else (batch,) * steps_per_call,
      jax.device_put(jax.random.key(1), replicated),
    )
    flops_per_image = 3 * 2 * counts.macs
  else:
    infer_model = model.clone(bn_axis_name=None)
    normalization = config.data.normalization

    def infer(variables, images):
      images = preprocessing.normalize(images, normalization)
      return infer_model.apply(variables, images, train=False)

    step = jax.jit(infer)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    batch = _batch(batch_size, resolution, num_classes, (batch_size,))
    args = jax.device_put((variables, batch['image']), jax.local_devices()[0])
    flops_per_image = 2 * counts.macs

  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  median, times, args = _time(compiled, args, steps, warmup)
  median, times = median / steps_per_call, [t / steps_per_call for t in times]
  ops = profile_ops(compiled, args, profile_steps) if profile_steps else None
  return dict(
    mode=mode,
    width_multiplier=width_multiplier,
    resolution=resolution,
    batch_size=batch_size,
    num_classes=num_classes,
    dtype=dtype,
    devices=devices,
    steps_per_call=steps_per_call,
    cpu_fast_path=bool(cpu_fast_path and cpu.enabled()),
    backend=jax.default_backend(),
    compile_seconds=compile_seconds,
    median_step_seconds=median,
    min_step_seconds=min(times),
    images_per_second=batch_size / median,
    gflops_per_second=flops_per_image * batch_size / median / 1e9,
    macs_per_image=counts.macs,
    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    ops=ops,
  )


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
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not _is_op_line(plane.name, line.name):
        continue
      for event in line.events:
        if not event.name.startswith(('ThunkExecutor', 'SlinkyThreadPool')):
          total[event.name] += event.duration_ns
  hlo = compiled.as_text()
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
    f'{r["backend"]}{"/cpu_fast_path" * r["cpu_fast_path"]}: compile '
    f'{r["compile_seconds"]:.1f} s, step {1e3 * r["median_step_seconds"]:.1f}'
    f' ms (median), {r["images_per_second"]:,.1f} img/s, '
    f'{r["gflops_per_second"]:.1f} GFLOP/s, peak RSS '
    f'{r["peak_rss_mib"]:,.0f} MiB'
  )


def main(argv):
  del argv
  if _AOT_TOPOLOGY.value:
    if _CONFIG.value is not None:
      config = _CONFIG.value
      defaults.check(config)
    else:
      config = make_config(
        _WIDTH.value,
        _RESOLUTION.value,
        _BATCH_SIZE.value,
        _DTYPE.value,
        _OUTPUT_STRIDE.value,
      )
      config.data.name = 'imagenet2012'
    num_classes = _NUM_CLASSES.value if _NUM_CLASSES.present else None
    cost = aot.tpu_cost(config, _AOT_TOPOLOGY.value, num_classes)
    print(
      json.dumps(dataclasses.asdict(cost)) if _JSON.value else cost.format()
    )
    return
  cpu.configure_host()  # before JAX starts its CPU client
  compilation_cache.enable_dir(_CACHE_DIR.value)
  result = run(
    _WIDTH.value,
    _RESOLUTION.value,
    _BATCH_SIZE.value,
    _MODE.value,
    _DTYPE.value,
    _DEVICES.value,
    _NUM_CLASSES.value,
    _STEPS.value,
    _WARMUP.value,
    _PROFILE_STEPS.value,
    _OUTPUT_STRIDE.value,
    _CPU_FAST_PATH.value,
    _STEPS_PER_CALL.value,
  )
  if _JSON.value:
    print(json.dumps(result))
    return
  print(format_result(result))
  if result['ops']:
    print(format_ops(result['ops'], _PROFILE_TOP.value))


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'With --aot_topology: the run config to compile (its global batch is '
    'split over the topology); default: the flags above.',
  )
  cli.run(main)
