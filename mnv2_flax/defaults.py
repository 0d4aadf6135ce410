"""The schema of a run's config: every field, its default and its meaning,
and `check(config)`, which validates a config against it.

The defaults are TF-slim's ImageNet recipe (`configs/default.py`); recipes in
`configs/` override what differs. `mnv2_flax.evaluate` fills fields that an
older checkpoint's saved config lacks from here. Imports no JAX or
TensorFlow, so `train.py` checks a config before loading them.
"""

import difflib
import math
import os
import re

from absl import logging
import ml_collections
from ml_collections import config_dict

from mnv2_flax import model_fields

MIN_IMAGE_SIZE = model_fields.MIN_RESOLUTION
MAX_IMAGE_SIZE = 4096

OPTIMIZERS = ('rmsprop_tf', 'sgd', 'adamw')
SCHEDULES = ('exponential', 'cosine', 'constant')
WEIGHT_DECAY_MASKS = ('tf_slim', 'no_norm')
NORMALIZATIONS = ('inception', 'imagenet')
INIT_FROM_KINDS = (
  'a workdir or step directory of this project, a Keras .keras / .h5 file, '
  'or a torchvision / timm .safetensors (or .npz) state dict'
)


# JAX's persistent compilation cache of training runs and benchmarks.
COMPILATION_CACHE_DIR = '~/.cache/mnv2_flax/jax'
# python -m mnv2_flax.export --format, --quantize.
EXPORT_FORMATS = ('tflite', 'saved_model', 'onnx')
EXPORT_QUANTIZE = ('none', 'float16', 'int8')


def get_config() -> ml_collections.ConfigDict:
  """Every field of a run's config, at TF-slim's ImageNet recipe."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Fine-tuning (mnv2_flax/train/finetune.py): start a fresh run from a
  # workdir or step directory of this project, a Keras .keras/.h5 file or a
  # torchvision / timm .safetensors state dict; '' trains from scratch. The
  # classifier is re-initialised when the class count differs.
  config.init_from = ''
  config.init_from_ema = True  # a project checkpoint's EMA (else raw) params
  # Regex of parameter paths (e.g. 'classifier/') kept at their fresh
  # initialisation although init_from has them.
  config.init_reset = ''

  config.model = ml_collections.ConfigDict()
  config.model.width_multiplier = 1.0  # the single source of width
  config.model.dropout_rate = 0.2
  config.model.bn_momentum = 0.997  # TF-slim's BN decay
  config.model.bn_epsilon = 1e-3
  # One-pass batch variance in Flax's BatchNorm: fewer bytes per TPU train
  # step (XLA fuses the sums into the convs; docs/accelerators.md).
  # mnv2_flax.cpu's layers are two-pass either way. False: TF-slim's and
  # torch's two-pass numerics.
  config.model.bn_fast_variance = True
  config.model.padding = 'tf'  # 'tf' (SAME) or 'torch' (symmetric)
  config.model.init_scheme = 'tf_slim'
  config.model.bottleneck_activation = 'linear'  # Fig. 6a: or 'relu6'
  config.model.shortcut = 'bottleneck'  # Fig. 6b: 'expansion', 'none'
  config.model.expand_ratio = 6.0  # t of the bottleneck rows
  # None: 32, the classifier. 8 or 16: later strides become atrous rates
  # (TF-slim's output_stride), denser final feature maps.
  config.model.output_stride = config_dict.placeholder(int)
  # BatchNorm in inference mode during training too: running statistics
  # used and not updated (fine-tuning, linear probes).
  config.model.bn_frozen = False

  config.data = ml_collections.ConfigDict()
  config.data.name = 'imagenet2012'  # any tfds image-classification dataset
  # tfds data_dir; None: ~/tensorflow_datasets. Placeholders (None with a
  # type) can be set on the command line: --config.data.data_dir=/data.
  config.data.data_dir = config_dict.placeholder(str)
  # None: <data_dir>/downloads/manual
  config.data.manual_dir = config_dict.placeholder(str)
  config.data.download = False  # allow tfds to download (needs internet)
  config.data.image_size = 224  # the single source of resolution
  config.data.batch_size = 1024  # global, over all processes and devices
  config.data.eval_batch_size = 1024
  config.data.train_split = 'train'
  # What results report (ImageNet: its 'validation' split; Fashion-MNIST:
  # 'test'). Never used to choose anything.
  config.data.eval_split = 'validation'
  # Held-out training examples for choices (a recipe, a hyperparameter):
  # a tfds split expression disjoint from train_split, as big_vision's
  # 'minival' (e.g. 'train[99%:]' with train_split 'train[:99%]'). Evaluated
  # beside eval_split (metrics minival_*); '' for none.
  config.data.minival_split = ''
  # Inception crop; TF-slim: area (0.05, 1), torchvision: (0.08, 1) with
  # min_object_covered 0.
  config.data.crop_area_range = (0.05, 1.0)
  config.data.crop_aspect_range = (3 / 4, 4 / 3)
  config.data.crop_min_object_covered = 0.1
  config.data.random_flip = True  # horizontal, in training
  config.data.eval_crop_fraction = 0.875
  # JPEGs: decode a crop window at 1/2, 1/4 or 1/8 scale where it is that
  # many times image_size on both sides, then resize as ever. Off: on
  # ImageNet-sized photos it gained 1.05-1.12x at 96 px and nothing above
  # (docs/input_pipeline.md), and it changes the pixels.
  config.data.jpeg_scaled_decode = False
  # > 0: read a copy of the dataset whose images have this short side,
  # prepared once beside it (`python -m mnv2_flax.prepare_data`, or the
  # first run). It must cover image_size and test_image_sizes: its eval
  # centre crop at least that size (146 px: up to 127 px). Its smallest
  # random crops see fewer pixels than the original's (docs/
  # input_pipeline.md). 0: the original.
  config.data.resized_short_side = 0
  config.data.resized_format = 'jpeg'  # or 'raw': pixels, ~10x the bytes
  # Also evaluate the final state at these image sizes (the train and test
  # resolutions apart, as FixRes: random-resized crops make objects look
  # larger in training than in a centre crop of the same size). BatchNorm
  # statistics as trained. results.json: at_resolution; () for none.
  config.data.test_image_sizes = ()
  # With N > 0, also evaluate at each of test_image_sizes and at image_size
  # with BatchNorm statistics re-estimated there (FixRes's fix for the
  # statistics' shift with resolution): those of N training images (rounded
  # down to whole eval batches; each process the first of its share),
  # preprocessed as for evaluation, under the raw parameters (the EMA
  # metrics use them too). results.json: at_resolution_bn.
  config.data.test_bn_examples = 0
  # Also report top-1/top-5 of the mean softmax over each eval image and its
  # mirror (metrics flip_*, ema_flip_*); the plain metrics stay single-view.
  config.data.eval_flip_average = False
  config.data.normalization = 'inception'  # [-1, 1]; 'imagenet': mean/std
  config.data.shuffle_buffer = 16_384
  config.data.cache = False  # keep decoded examples in memory
  # Multi-process input: 'files' (each process reads 1/N of the split) or
  # 'batch' (each reads the whole stream and keeps its rows of every global
  # batch: the same batches for any process count, N times the reading).
  config.data.process_sharding = 'files'
  # tf.data threads: 0 shares TensorFlow's pool (one per core); a small
  # private pool leaves the cores to XLA when the input is cheap.
  config.data.threadpool_size = 0

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = 'rmsprop_tf'  # or 'sgd', 'adamw'
  config.optim.learning_rate = 0.045  # per lr_reference_batch images
  config.optim.lr_reference_batch = 96  # lr scales with batch / this
  config.optim.schedule = 'exponential'  # 'cosine', 'constant'
  config.optim.decay_rate = 0.98  # exponential: x0.98 ...
  config.optim.decay_epochs = 2.5  # ... every 2.5 epochs, staircase
  config.optim.warmup_epochs = 0.0  # linear warm-up from 0
  config.optim.momentum = 0.9
  config.optim.nesterov = False  # sgd only
  config.optim.adam_b2 = 0.999  # adamw only (b1 is optim.momentum)
  config.optim.rmsprop_decay = 0.9
  config.optim.rmsprop_epsilon = 1.0
  config.optim.weight_decay = 4e-5  # L2, added to the gradient
  config.optim.weight_decay_mask = 'tf_slim'  # or 'no_norm'
  config.optim.label_smoothing = 0.1
  config.optim.ema_decay = 0.9999  # TF-style warm-up min(d, (1+n)/(10+n))
  # Train the classifier only, every other parameter fixed (a linear probe).
  config.optim.freeze_backbone = False

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 420.0
  config.train.dtype = 'bfloat16'  # compute dtype; params stay float32
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 5000
  # Stop after this step as if preempted (0: never); the next run resumes.
  config.train.stop_after_step = 0
  # Train steps per call of the pmap-ed program (lax.scan over that many
  # batches): amortises the per-call dispatch cost on fast accelerators and
  # small models. Log, eval and save steps are reached exactly.
  config.train.steps_per_call = 1
  # Seeds config.seed, config.seed + 1, ... trained together as one pack
  # (one program, a seed axis; train_lib.train_seeds), each in
  # <workdir>/seed-<seed>. 1: one run in <workdir>.
  config.train.seeds = 1
  # JAX persistent compilation cache; '' disables it.
  config.train.compilation_cache_dir = COMPILATION_CACHE_DIR
  # On the CPU backend, plug mnv2_flax.cpu's layers (C++ kernels, fused
  # BatchNorm) into the model: same variables, faster steps. Ignored
  # elsewhere.
  config.train.cpu_fast_path = True
  # Stop at start, with how to install, if JAX finds no GPU or TPU (it falls
  # back to the CPU otherwise, with one log line).
  config.train.require_accelerator = False
  # On GPUs, XLA's deterministic ops (`--xla_gpu_deterministic_ops=true`:
  # deterministic reductions and scatters, no autotuning), so that a rerun
  # gives the same bits. Off: it slows the step by an amount not measured
  # here (docs/reproducibility.md). Set before JAX starts, by train.py and
  # the sweep's workers. The CPU's bits depend on the config and seed alone.
  config.train.gpu_deterministic_ops = False

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5000
  config.checkpoint.keep = 3  # latest K, plus the best by eval top-1
  config.checkpoint.async_save = True
  # Resuming over an incomplete or unreadable step: False stops and names the
  # previous complete step; True moves the bad step to
  # <workdir>/corrupt_checkpoints/ and resumes from the newest readable one.
  config.checkpoint.skip_corrupt = False
  return config


def check(config: ml_collections.ConfigDict) -> None:
  """Validates a run's config before anything is built; one clear error.

  Needs no JAX or TensorFlow: the programs call it before importing them.
  """

  def fail(field, value, valid):
    raise ValueError(
      f'config.{field}={value!r} is not valid; expected {valid}.'
    )

  check_schema(config, get_config())
  check_init(config)
  optim, train = config.optim, config.train
  if optim.optimizer not in OPTIMIZERS:
    fail('optim.optimizer', optim.optimizer, ' or '.join(OPTIMIZERS))
  if optim.schedule not in SCHEDULES:
    fail('optim.schedule', optim.schedule, ', '.join(SCHEDULES))
  if optim.weight_decay_mask not in WEIGHT_DECAY_MASKS:
    fail(
      'optim.weight_decay_mask',
      optim.weight_decay_mask,
      ' or '.join(WEIGHT_DECAY_MASKS),
    )
  for field in ('learning_rate', 'lr_reference_batch'):
    if not optim[field] > 0:
      fail(f'optim.{field}', optim[field], 'a number > 0')
  if not 0 <= optim.weight_decay < 1:
    fail('optim.weight_decay', optim.weight_decay, 'a value in [0, 1)')
  if not 0 <= optim.label_smoothing < 1:
    fail('optim.label_smoothing', optim.label_smoothing, 'a value in [0, 1)')
  if not 0 <= optim.ema_decay < 1:
    fail('optim.ema_decay', optim.ema_decay, 'a value in [0, 1)')
  if not train.num_epochs > 0:
    fail('train.num_epochs', train.num_epochs, 'a number > 0')
  for field in (
    'log_every_steps',
    'eval_every_steps',
    'steps_per_call',
    'seeds',
  ):
    if not train[field] > 0:
      fail(f'train.{field}', train[field], 'an integer > 0')
  if train.dtype not in ('float32', 'bfloat16'):
    fail('train.dtype', train.dtype, "'float32' or 'bfloat16'")
  ckpt = config.checkpoint
  if not (isinstance(ckpt.every_steps, int) and ckpt.every_steps > 0):
    fail('checkpoint.every_steps', ckpt.every_steps, 'an integer > 0')
  if not (isinstance(ckpt.keep, int) and ckpt.keep > 0):
    fail('checkpoint.keep', ckpt.keep, 'an integer > 0')
  model_fields.check(config.model.to_dict(), prefix='config.model.')
  check_data(config)


def check_init(config: ml_collections.ConfigDict) -> None:
  """`init_from` exists and `init_reset` is a regex; one clear error."""
  if config.init_from and not os.path.exists(
    os.path.expanduser(config.init_from)
  ):
    raise ValueError(
      f'config.init_from={config.init_from!r} does not exist; expected '
      f'{INIT_FROM_KINDS}.'
    )
  try:
    re.compile(config.init_reset)
  except re.error as e:
    raise ValueError(
      f'config.init_reset={config.init_reset!r} is not a valid regex ({e}); '
      "expected e.g. 'classifier/'."
    ) from None


def _pair(value) -> tuple[float, float]:
  """(lo, hi) of a range field; (nan, nan), which fails every check, for
  anything but two numbers."""
  if (
    isinstance(value, tuple | list)
    and len(value) == 2
    and all(
      isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
  ):
    return value[0], value[1]
  return math.nan, math.nan


RESIZED_FORMATS = ('jpeg', 'raw')


def covering_short_side(image_size: int, eval_crop_fraction: float) -> int:
  """The smallest short side whose eval centre crop is image_size or more
  (the copy's images are not enlarged before the crop)."""
  side = image_size
  while int(eval_crop_fraction * side) < image_size:
    side += 1
  return side


def _check_resized(data, fail) -> None:
  side = data.resized_short_side
  if not isinstance(side, int) or isinstance(side, bool) or side < 0:
    fail('resized_short_side', 'a whole number of pixels, or 0 (none)')
  if data.resized_format not in RESIZED_FORMATS:
    fail('resized_format', ' or '.join(repr(f) for f in RESIZED_FORMATS))
  if not side:
    return
  sizes = {'image_size': data.image_size}
  sizes.update(
    (f'test_image_sizes {s}', s) for s in tuple(data.test_image_sizes)
  )
  for field, size in sizes.items():
    need = covering_short_side(size, data.eval_crop_fraction)
    if side < need:
      fail(
        'resized_short_side',
        f'at least {need} for {field} {size} (its eval centre crop, '
        f'{data.eval_crop_fraction} of the short side, is not enlarged), '
        'or 0 to read the original',
      )


def check_data(config: ml_collections.ConfigDict) -> None:
  """Validates `config.data` before anything is read; one clear error."""
  data = config.data

  def fail(field, valid):
    raise ValueError(
      f'config.data.{field}={data[field]!r} is not valid; expected {valid}.'
    )

  if not isinstance(data.image_size, int) or not (
    MIN_IMAGE_SIZE <= data.image_size <= MAX_IMAGE_SIZE
  ):
    fail(
      'image_size',
      f'an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (the model needs '
      f'>= {MIN_IMAGE_SIZE})',
    )
  if data.normalization not in NORMALIZATIONS:
    fail('normalization', ' or '.join(repr(n) for n in NORMALIZATIONS))
  lo, hi = _pair(data.crop_area_range)
  if not 0 < lo <= hi <= 1:
    fail('crop_area_range', '(min, max) with 0 < min <= max <= 1')
  lo, hi = _pair(data.crop_aspect_range)
  if not 0 < lo <= hi:
    fail('crop_aspect_range', '(min, max) with 0 < min <= max')
  if not 0 < data.eval_crop_fraction <= 1:
    fail('eval_crop_fraction', 'a fraction in (0, 1]')
  sizes = data.test_image_sizes
  if not isinstance(sizes, tuple | list) or not all(
    isinstance(s, int) and MIN_IMAGE_SIZE <= s <= MAX_IMAGE_SIZE for s in sizes
  ):
    fail(
      'test_image_sizes',
      f'a tuple of integers in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], e.g. '
      '(32, 48)',
    )
  _check_resized(data, fail)
  if not isinstance(data.jpeg_scaled_decode, bool):
    fail('jpeg_scaled_decode', 'True or False')
  examples = data.test_bn_examples
  if type(examples) is not int or (
    examples and not data.eval_batch_size <= examples
  ):
    fail(
      'test_bn_examples',
      '0 (statistics as trained) or an integer >= data.eval_batch_size '
      f'({data.eval_batch_size}): whole eval batches of training images',
    )
  if not isinstance(data.eval_flip_average, bool):
    fail('eval_flip_average', 'True or False')
  if not data.shuffle_buffer > 0:
    fail('shuffle_buffer', 'a positive integer')
  if data.process_sharding not in ('files', 'batch'):
    fail('process_sharding', "'files' or 'batch'")
  if not isinstance(data.threadpool_size, int) or data.threadpool_size < 0:
    fail('threadpool_size', "an integer >= 0 (0: TensorFlow's shared pool)")


def check_schema(
  config: ml_collections.ConfigDict,
  schema: ml_collections.ConfigDict,
  prefix: str = 'config',
) -> None:
  """Every field of `config` is one of `schema`'s, of the same kind.

  A misspelt field in a config file would otherwise be ignored silently.
  """
  for key, value in config.items():
    where = f'{prefix}.{key}'
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      raise ValueError(
        f'{where} is not a config field'
        + (f'; did you mean {prefix}.{close[0]}?' if close else '')
        + f' (the fields of {prefix}: {", ".join(sorted(schema.keys()))}).'
      )
    default = schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f'{where}={value!r} is not valid; expected a section.')
      check_schema(value, default, where)
      continue
    if default is None:  # a placeholder: ConfigDict keeps its type
      continue
    kinds = {
      bool: (bool,),
      int: (int,),
      float: (int, float),
      str: (str,),
      tuple: (tuple, list),
    }[type(default)]
    wrong = not isinstance(value, kinds) or (
      isinstance(value, bool) and not isinstance(default, bool)
    )
    # An empty default tuple: a list of any length (its own check).
    if isinstance(default, tuple) and default and not wrong:
      wrong = len(value) != len(default) or not all(
        isinstance(v, (int, float)) for v in value
      )
    if wrong:
      expected = (
        f'{len(default)} numbers, e.g. {default}'
        if isinstance(default, tuple) and default
        else 'a tuple'
        if isinstance(default, tuple)
        else f'a {type(default).__name__}'
      )
      raise ValueError(f'{where}={value!r} is not valid; expected {expected}.')


def _merge(default: dict, saved: dict, prefix: str = 'config') -> dict:
  merged = dict(default)
  for key, value in saved.items():
    if key not in default:  # a field this version no longer has
      logging.info('Ignoring %s.%s=%r of the saved config.', prefix, key, value)
      continue
    if isinstance(value, dict) and isinstance(default[key], dict):
      value = _merge(default[key], value, f'{prefix}.{key}')
    merged[key] = value
  return merged


def with_defaults(
  saved: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """`saved` over the default config: fields it lacks get their defaults."""
  return ml_collections.ConfigDict(
    _merge(get_config().to_dict(), saved.to_dict())
  )


def export_output(
  workdir: str, fmt: str, quantize: str, batch_size: int, step: int | None
) -> str:
  """The default `--output` of `mnv2_flax.export`: inside the run's
  workdir (a step dir's run), `export/<format>[_<quantize>]_b<batch>`
  with the step when given ('export/tflite_int8_b1.tflite')."""
  run = os.path.normpath(workdir)
  if os.path.basename(os.path.dirname(run)) == 'checkpoints':  # a step dir
    step = step if step is not None else os.path.basename(run)
    run = os.path.dirname(os.path.dirname(run))
  name = fmt + ('' if quantize == 'none' else f'_{quantize}')
  name += f'_b{batch_size}' + ('' if step is None else f'_step{step}')
  suffix = {'tflite': '.tflite', 'onnx': '.onnx', 'saved_model': ''}[fmt]
  return os.path.join(run, 'export', name + suffix)


def check_export(output: str, fmt: str, quantize: str, batch_size: int) -> None:
  """The export's arguments (`mnv2_flax.export`), before anything loads."""
  if fmt not in EXPORT_FORMATS:
    raise ValueError(
      f'--format={fmt!r}: valid are {" or ".join(EXPORT_FORMATS)}.'
    )
  if quantize not in EXPORT_QUANTIZE:
    raise ValueError(
      f'--quantize={quantize!r}: valid are {", ".join(EXPORT_QUANTIZE)}.'
    )
  if fmt != 'tflite' and quantize != 'none':
    raise ValueError(
      f'--quantize={quantize}: quantisation is a LiteRT step; use '
      f'--format=tflite (--format={fmt} is float32).'
    )
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size}: expected 1 or more.')
  if os.path.exists(output):
    raise FileExistsError(
      f'--output={output!r} exists; choose a new path (nothing is overwritten).'
    )
