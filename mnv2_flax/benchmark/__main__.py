"""Times the library's own train step or inference apply.

  python -m mnv2_flax.benchmark --width_multiplier=0.5 --resolution=32 \
      --batch_size=256 --num_classes=10 --mode=train [--dtype=bfloat16]
      [--devices=N] [--nocpu_fast_path] [--output_stride=8]
      [--steps_per_call=8] [--pack=4] [--profile_steps=3] [--json]

Train mode times `steps.train_step` under the same `jax.pmap` as the
training loop (SGD with momentum 0.9 and weight decay, torchvision's
numerics, EMA of the parameters included), on a fixed
random uint8 batch split over `--devices` and placed there once (the timed
calls copy nothing from the host). `--steps_per_call=N` times the loop's
`lax.scan` program of N steps (times per step). `--pack=N` times a pack
of N seeds trained as one program (`steps._train_fn`, each seed with
`--batch_size` images per step) in turn with one seed's step, and prints
images/s per seed and in all, and the pack's speed-up over training the
seeds one after another. Infer mode times
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

Needs JAX, Flax, Optax, ml_collections and clu only (no TensorFlow): it runs
on a bare accelerator image. The library is `benchmark/lib.py`.
"""

import dataclasses
import json
import os

from absl import flags
from ml_collections import config_flags

from mnv2_flax import cli
from mnv2_flax import defaults

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
  defaults.COMPILATION_CACHE_DIR,
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
_PACK = flags.DEFINE_integer(
  'pack', 1, 'Train N seeds as one program, timed in turn with one seed.'
)
_AOT_TOPOLOGY = flags.DEFINE_string(
  'aot_topology',
  None,
  "Compile the train step for this TPU topology (e.g. 'v5e:2x2'; libtpu, no "
  'TPU needed) and print its FLOPs, bytes accessed and temporaries instead '
  'of timing anything.',
)
_INPUT_PIPELINE = flags.DEFINE_bool(
  'input_pipeline',
  False,
  "Time --config's host input pipeline (tf.data, no device) instead.",
)
_SYNTHETIC_JPEG = flags.DEFINE_bool(
  'synthetic_jpeg',
  False,
  'With --input_pipeline: the train transforms on locally made 375x500 '
  'JPEGs instead of the configured dataset.',
)
_PHOTOS = flags.DEFINE_bool(
  'photos',
  False,
  "With --input_pipeline: --config's train pipeline on photo-like JPEGs of "
  'ImageNet sizes at each of --resolutions, from the original (full and '
  'scaled decoding) and from resized copies (JPEG, raw), per core.',
)
_RESOLUTIONS = flags.DEFINE_list(
  'resolutions', ['96', '128', '160', '192', '224'], 'With --photos.'
)
_THREADS = flags.DEFINE_integer(
  'threads', 1, 'With --photos: tf.data threads (1: images/s per core).'
)
_COPY_SIDE_RATIO = flags.DEFINE_float(
  'copy_side_ratio',
  0.0,
  'With --photos: copies at this times the resolution (0: the smallest '
  'short side that covers it).',
)
_CONFIG = None  # --config, defined when run as a program (sweep has one)


def _check_flags() -> None:
  """What can be checked before JAX loads."""
  for flag, low in (
    (_WIDTH, 0.0),
    (_RESOLUTION, 0),
    (_BATCH_SIZE, 0),
    (_STEPS, 0),
    (_STEPS_PER_CALL, 0),
    (_PACK, 0),
  ):
    if not flag.value > low:
      raise ValueError(
        f'--{flag.name}={flag.value}: expected a number above {low}.'
      )
  if not all(
    r.isdigit() and defaults.MIN_IMAGE_SIZE <= int(r) <= defaults.MAX_IMAGE_SIZE
    for r in _RESOLUTIONS.value
  ):
    raise ValueError(
      f'--resolutions={",".join(_RESOLUTIONS.value)}: expected integers in '
      f'[{defaults.MIN_IMAGE_SIZE}, {defaults.MAX_IMAGE_SIZE}], e.g. 96,128.'
    )


def _time_input_pipeline() -> None:
  """--input_pipeline: the host pipeline of --config, without a device."""
  if _CONFIG.value is None:
    raise ValueError('--input_pipeline: pass --config=path/to/config.py.')
  config = _CONFIG.value
  from mnv2_flax.benchmark import pipeline  # pylint: disable=g-import-not-at-top

  if _PHOTOS.value:
    result = pipeline.benchmark_photos(
      config,
      tuple(int(r) for r in _RESOLUTIONS.value),
      steps=_STEPS.value,
      threads=_THREADS.value,
      copy_side_ratio=_COPY_SIDE_RATIO.value,
    )
    if _JSON.value:
      print(json.dumps(result))
    else:
      print(pipeline.format_photos(result, _THREADS.value))
    return
  if _SYNTHETIC_JPEG.value:
    result = pipeline.benchmark_jpeg(config, steps=_STEPS.value)
  else:
    result = pipeline.benchmark(config, steps=_STEPS.value)
  name = '375x500 JPEG' if _SYNTHETIC_JPEG.value else config.data.name
  print(
    f'{name} train pipeline at {config.data.image_size}px, '
    f'batch {config.data.batch_size}, {os.cpu_count()} CPUs: '
    f'{result["images_per_second"]:,.0f} images/s '
    f'({result["steps"]} batches in {result["seconds"]:.2f} s)'
  )


def main(argv):
  if len(argv) > 1:
    cli.fail(
      f'unexpected arguments {argv[1:]}; flags take the form --name=value.'
    )
  _check_flags()
  if _CONFIG.value is not None:
    defaults.check(_CONFIG.value)
  if _INPUT_PIPELINE.value:
    _time_input_pipeline()
    return
  # pylint: disable=g-import-not-at-top
  from mnv2_flax.benchmark import aot
  from mnv2_flax.benchmark import lib as benchmark_lib
  # pylint: enable=g-import-not-at-top

  if _AOT_TOPOLOGY.value:
    if _CONFIG.value is not None:
      config = _CONFIG.value
    else:
      config = benchmark_lib.make_config(
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
  cli.start_jax(_CACHE_DIR.value)
  result = benchmark_lib.run(
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
    _PACK.value,
  )
  if _JSON.value:
    print(json.dumps(result))
    return
  print(benchmark_lib.format_result(result))
  if result['ops']:
    print(benchmark_lib.format_ops(result['ops'], _PROFILE_TOP.value))


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'With --aot_topology: the run config to compile (its global batch is '
    'split over the topology); default: the flags above.',
  )
  cli.run(main)
