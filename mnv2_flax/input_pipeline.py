"""tensorflow-datasets to per-device batches for the pmap-ed training loop.

Any tfds image-classification dataset (`config.data.name`) is read from
`config.data.data_dir` without touching the network when it is there. The
train split is sharded per process, shuffled and augmented reproducibly from
`config.seed` (Inception-style random resized crop, horizontal flip);
evaluation uses a central crop and pads its last batches with masked examples
so that every example of the split is counted exactly once, whatever the
number of processes and devices. Batches come out as numpy dicts
`{'image': (local_devices, per_device_batch, H, W, 3) uint8, 'label': int32,
'mask': float32}`; `prefetch_to_device` puts them on the devices, where the
steps normalise them (`preprocessing.normalize`).

Benchmark of the host pipeline:
  python -m mnv2_flax.benchmark --input_pipeline --config=configs/quickstart.py
"""

import collections
from collections.abc import Iterator
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax import digits  # registers the tfds dataset sklearn_digits
from mnv2_flax import fashion_mnist
from mnv2_flax import placement
from mnv2_flax import workdir_lock

# TensorFlow only feeds the input pipeline: keep it off the accelerators.
tf.config.set_visible_devices([], 'GPU')

IMAGENET_HOW_TO = (
  'ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar '
  'and ILSVRC2012_img_val.tar in {manual_dir} (or set config.data.manual_dir '
  'to their directory) and run again; they are prepared once into '
  '{data_dir}.'
)


class DataError(ValueError):
  """The configured data cannot be read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What the rest of the code needs to know about a dataset."""

  num_classes: int
  num_train_examples: int
  num_eval_examples: int


def _data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.data.data_dir or '~/tensorflow_datasets')


def get_builder(config: ml_collections.ConfigDict):
  """The tfds builder of `config.data.name`, prepared in the data_dir.

  Fashion-MNIST is prepared from local idx files on first use; other datasets
  are prepared only with `config.data.download=True`.

  Raises:
    DataError: unknown dataset, or data that is not there (with what to do).
  """
  defaults.check_data(config)
  name, data_dir = config.data.name, _data_dir(config)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
      f'config.data.name={name!r} is not a tfds dataset; use a registered '
      'image-classification dataset such as fashion_mnist, cifar10, '
      'imagenette or imagenet2012.'
    ) from None
  if _is_prepared(builder):
    return builder
  if '://' in data_dir:  # a bucket: no file locks there
    return _prepare(builder, config)
  # One process prepares, the others wait for it: two preparing at once
  # collide (tfds renames its incomplete directory into place).
  created = not os.path.isdir(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  try:
    with workdir_lock.hold(
      data_dir, 'dataset directory', wait=True, file=f'.{name}.lock'
    ):
      builder = tfds.builder(name, data_dir=data_dir)
      if _is_prepared(builder):  # by the process this one waited for
        return builder
      return _prepare(builder, config)
  except BaseException:
    if created:  # nothing prepared: no empty directory left behind
      with contextlib.suppress(OSError):
        os.rmdir(data_dir)
    raise


def _prepare(builder, config: ml_collections.ConfigDict):
  """Prepares `builder`'s dataset if it can (see `get_builder`)."""
  name, data_dir = config.data.name, _data_dir(config)
  manual_dir = config.data.manual_dir or os.path.join(
    data_dir, 'downloads', 'manual'
  )
  if name == 'fashion_mnist':
    try:
      fashion_mnist.prepare(data_dir, config.data.manual_dir)
      return tfds.builder(name, data_dir=data_dir)
    except fashion_mnist.IdxError as e:
      if not config.data.download:  # else: tfds' own download below
        raise DataError(
          f'fashion_mnist is not prepared in {data_dir} and cannot be: {e} '
          "Install Debian's dataset-fashion-mnist (`make data`), set "
          'config.data.manual_dir to the four idx files, or set '
          'config.data.download=True on a machine with internet access.'
        ) from None
  if name == digits.SklearnDigits.name:  # scikit-learn ships the data
    builder.download_and_prepare()
    return builder
  if name.startswith('imagenet2012') and not os.path.exists(
    os.path.join(manual_dir, 'ILSVRC2012_img_train.tar')
  ):
    raise DataError(
      f'{name} is not prepared in {data_dir}. '
      + IMAGENET_HOW_TO.format(manual_dir=manual_dir, data_dir=data_dir)
    )
  if not config.data.download and not name.startswith('imagenet2012'):
    raise DataError(
      f'{name} is not prepared in {data_dir}. Set config.data.download=True '
      'on a machine with internet access to download and prepare it once, '
      'or point config.data.data_dir to where it is prepared.'
    )
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except Exception as e:  # network errors come in many types
    raise DataError(
      f'{name} could not be downloaded and prepared in {data_dir} '
      f'({type(e).__name__}: {str(e)[:200]}). Without internet access, '
      'provide the files locally (see README: Data).'
    ) from None
  return builder


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json'))


def _check_split(builder, split: str, field: str) -> None:
  base = split.split('[')[0]
  if base not in builder.info.splits:
    raise DataError(
      f'{field}={split!r}: {builder.info.name} has no split '
      f'{base!r}; it has {sorted(builder.info.splits)}.'
    )


def _example_ranges(builder, split: str) -> list[tuple[str, int, int]]:
  """(split name, first, end) of the examples a split expression reads."""
  splits = builder.info.splits
  instruction = tfds.core.ReadInstruction.from_spec(split)
  return [
    (
      a.splitname,
      a.from_ or 0,
      splits[a.splitname].num_examples if a.to is None else a.to,
    )
    for a in instruction.to_absolute(splits)
  ]


def _check_minival(builder, config: ml_collections.ConfigDict) -> None:
  """The minival split exists, holds examples and shares none with
  train_split (it is there to choose on data never trained on)."""
  minival, train = config.data.minival_split, config.data.train_split
  _check_split(builder, minival, 'config.data.minival_split')
  held = _example_ranges(builder, minival)
  if not any(end > first for _, first, end in held):
    raise DataError(f'config.data.minival_split={minival!r} holds no examples.')
  for name, first, end in held:
    for other, t_first, t_end in _example_ranges(builder, train):
      shared = min(end, t_end) - max(first, t_first)
      if other == name and shared > 0:
        raise DataError(
          f'config.data.minival_split={minival!r} shares {shared} examples '
          f'with config.data.train_split={train!r}; they must be disjoint '
          f"(e.g. train_split='{name}[:90%]', minival_split='{name}[90%:]')."
        )


def dataset_meta(builder, config: ml_collections.ConfigDict) -> DatasetMeta:
  """Classes and example counts, from the dataset's info."""
  _check_split(builder, config.data.train_split, 'config.data.train_split')
  _check_split(builder, config.data.eval_split, 'config.data.eval_split')
  if config.data.minival_split:
    _check_minival(builder, config)
  return DatasetMeta(
    num_classes=builder.info.features['label'].num_classes,
    num_train_examples=builder.info.splits[
      config.data.train_split
    ].num_examples,
    num_eval_examples=builder.info.splits[config.data.eval_split].num_examples,
  )


# ---------------------------------------------------------------- transforms


def _decode_and_random_crop(data, shape, seed, config):
  """Inception-style crop of a random area/aspect, decoding only the crop."""
  bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=bbox,
    seed=seed,
    min_object_covered=config.data.crop_min_object_covered,
    aspect_ratio_range=tuple(config.data.crop_aspect_range),
    area_range=tuple(config.data.crop_area_range),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  offset_y, offset_x, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(size)
  window = tf.stack([offset_y, offset_x, height, width])
  if isinstance(data, tuple):  # (jpeg bytes,): decode the window only
    return tf.image.decode_and_crop_jpeg(data[0], window, channels=3)
  return tf.image.crop_to_bounding_box(data, offset_y, offset_x, height, width)


def _central_crop(data, shape, fraction):
  height, width = shape[0], shape[1]
  side = tf.cast(
    fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32
  )
  offset_y, offset_x = (height - side + 1) // 2, (width - side + 1) // 2
  if isinstance(data, tuple):
    return tf.image.decode_and_crop_jpeg(
      data[0], tf.stack([offset_y, offset_x, side, side]), channels=3
    )
  return tf.image.crop_to_bounding_box(data, offset_y, offset_x, side, side)


def _finish(image: tf.Tensor, config: ml_collections.ConfigDict):
  """Resize, 3 channels, uint8: one image (HWC) or a batch (NHWC).

  The resized pixels are rounded to the nearest integer, as PIL's resize
  (torchvision, timm) gives them; the steps normalise them on the device.
  """
  size = config.data.image_size
  image = tf.image.resize(
    image, (size, size), method='bilinear', antialias=False
  )
  image = tf.saturate_cast(tf.round(image), tf.uint8)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return tf.ensure_shape(image, image.shape[:-3] + (size, size, 3))


def _preprocess(example, seed, *, train, jpeg, config):
  """Crop, flip, resize, 3 channels; returns (uint8 image, label)."""
  if jpeg:
    data = (example['image'],)
    shape = tf.image.extract_jpeg_shape(example['image'])
  else:
    data = example['image']
    shape = tf.shape(data)
  if train:
    crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2)
    )
    image = _decode_and_random_crop(data, shape, crop_seed, config)
    if config.data.random_flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  else:
    image = _central_crop(data, shape, config.data.eval_crop_fraction)
  return _finish(image, config), tf.cast(example['label'], tf.int32)


def _augments_per_batch(builder, config, jpeg: bool) -> bool:
  """Whether train augmentation can run on whole batches.

  It can when every image has the same stored shape and the crop is the
  whole image (`crop_area_range` (1, 1)): only the flip differs per example.
  One batched call replaces a dozen small ops per image (their cost:
  docs/performance_cpu.md, "The host input pipeline").
  """
  shape = builder.info.features['image'].shape
  return (
    not jpeg
    and None not in shape
    and tuple(config.data.crop_area_range)[0] == 1.0
  )


def _preprocess_batch(examples, seeds, *, config):
  """`_preprocess` (train) of a batch of same-size images, crop-free.

  The flip of each example is the low bit of its first seed (uniform: the
  seeds are Philox outputs).
  """
  image = examples['image']
  if config.data.random_flip:
    flip = tf.equal(tf.bitwise.bitwise_and(seeds[:, 0], 1), 1)
    image = tf.where(flip[:, None, None, None], tf.reverse(image, [2]), image)
  return {
    'image': _finish(image, config),
    'label': tf.cast(examples['label'], tf.int32),
  }


# ------------------------------------------------------------------ datasets


def _read(builder, split, *, shuffle, seed, cache=False):
  """The examples of `split` (images still encoded if JPEG), and whether
  they are JPEG. With `cache` (`config.data.cache`: the split fits in
  memory), a split read from one file comes from `_in_memory`; otherwise
  tfds reads the files, cached in memory by the first pass."""
  image_feature = builder.info.features['image']
  jpeg = getattr(image_feature, 'encoding_format', None) == 'jpeg'
  decoders = {'image': tfds.decode.SkipDecoding()} if jpeg else None
  if cache and _one_file(builder, split):
    arrays = _in_memory(builder, split, jpeg)
    return tf.data.Dataset.from_tensor_slices(arrays), jpeg
  ds = builder.as_dataset(
    split=split,
    shuffle_files=shuffle,
    decoders=decoders,
    read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
  )
  return (ds.cache() if cache else ds), jpeg


def _one_file(builder, split) -> bool:
  """Whether `split` reads one file (whose order no seed changes)."""
  try:
    return len(builder.info.splits[split].file_instructions) == 1
  except (KeyError, ValueError, TypeError, AttributeError):
    return False


# The decoded examples of the splits this process read last, by (dataset
# directory, split): a sweep worker trains the runs of one dataset one after
# another, and each run would decode its splits again (what that cost:
# docs/sweeps.md, "Where a worker's time goes"). In file order: the
# streams are those of a read from the file (tests/input_pipeline_test.py).
_SPLITS = collections.OrderedDict()
_KEEP_SPLITS = 4


def _in_memory(builder, split, jpeg: bool) -> dict[str, np.ndarray]:
  key = (builder.data_dir, str(split), jpeg)
  if key not in _SPLITS:
    decoders = {'image': tfds.decode.SkipDecoding()} if jpeg else None
    _SPLITS[key] = tfds.as_numpy(
      builder.as_dataset(split=split, decoders=decoders, batch_size=-1)
    )
    while len(_SPLITS) > _KEEP_SPLITS:
      _SPLITS.popitem(last=False)
  _SPLITS.move_to_end(key)
  return _SPLITS[key]


def _device_batches(ds, per_process_batch, transform=None):
  """Batches of (local_devices, per_device, ...), as numpy.

  `transform`, if given, maps each batch (before the device split).
  """
  devices = jax.local_device_count()

  def shard(*batch):
    batch = transform(*batch) if transform else batch[0]
    return {
      k: tf.reshape(
        v, [devices, per_process_batch // devices] + v.shape[1:].as_list()
      )
      for k, v in batch.items()
    }

  ds = ds.batch(per_process_batch, drop_remainder=True)
  return ds.map(shard, num_parallel_calls=tf.data.AUTOTUNE)


def _prefetched(ds, config):
  """The end of every stream: prefetch, and the tf.data options below."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = config.data.threadpool_size
  options.experimental_optimization.map_parallelization = True
  # No autotuning model (AUTOTUNE: one map call per thread): with it, an
  # iterator's end waits out the model thread's sleep, up to a minute
  # (docs/performance_cpu.md, "The host input pipeline").
  options.autotune.enabled = False
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _topology(process_index: int | None, process_count: int | None):
  """(process_index, process_count), JAX's unless given (for simulations)."""
  return (
    jax.process_index() if process_index is None else process_index,
    jax.process_count() if process_count is None else process_count,
  )


def create_train_dataset(
  builder,
  config: ml_collections.ConfigDict,
  process_index: int | None = None,
  process_count: int | None = None,
  start_step: int = 0,
) -> tf.data.Dataset:
  """The infinite, shuffled, augmented train stream of this process.

  The stream is a pure function of `config.seed`: with `start_step=n` it
  continues exactly where a run that consumed n batches stopped (examples are
  skipped before decoding and augmentation, which is what costs).
  """
  process_index, process_count = _topology(process_index, process_count)
  batch = placement.per_process_batch_size(
    config.data.batch_size, 'config.data.batch_size', process_count
  )
  by_batch = config.data.process_sharding == 'batch'
  if by_batch:  # every process reads the global stream, keeps its rows
    split, seed = config.data.train_split, config.seed
  else:  # every process reads its own 1/process_count of the split
    split = tfds.even_splits(
      config.data.train_split, n=process_count, drop_remainder=True
    )[process_index]
    seed = config.seed + process_index
  ds, jpeg = _read(
    builder, split, shuffle=True, seed=seed, cache=config.data.cache
  )
  ds = ds.shuffle(
    config.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True
  ).repeat()
  # One stateless seed pair per example, continuing across epochs.
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed).batch(2))
  if start_step:
    ds = ds.skip(start_step * (config.data.batch_size if by_batch else batch))
  if by_batch and process_count > 1:
    # Rows [p * batch, (p + 1) * batch) of every global batch, before any
    # decoding: the global batches are those of a single process.
    ds = (
      ds.enumerate()
      .filter(lambda i, _: (i // batch) % process_count == process_index)
      .map(lambda _, example: example)
    )

  if _augments_per_batch(builder, config, jpeg):
    transform = functools.partial(_preprocess_batch, config=config)
    return _prefetched(_device_batches(ds, batch, transform), config)

  def preprocess(example, example_seed):
    image, label = _preprocess(
      example, example_seed, train=True, jpeg=jpeg, config=config
    )
    return {'image': image, 'label': label}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = _device_batches(ds, batch)
  return _prefetched(ds, config)


def stacked(datasets: list[tf.data.Dataset]) -> tf.data.Dataset:
  """The train streams of a pack's seeds as one: each batch of each stream
  as it would be alone, stacked to (local_devices, seeds, per_device, ...)."""

  def stack(*batches):
    return {k: tf.stack([b[k] for b in batches], axis=1) for k in batches[0]}

  ds = tf.data.Dataset.zip(tuple(datasets))
  return ds.map(stack).prefetch(tf.data.AUTOTUNE)


def num_eval_steps(
  split_size: int, process_count: int, per_process_batch: int
) -> int:
  """Steps every process runs so that the largest process shard is covered."""
  largest_shard = math.ceil(split_size / process_count)
  return math.ceil(largest_shard / per_process_batch)


def create_eval_dataset(
  builder,
  config: ml_collections.ConfigDict,
  process_index: int | None = None,
  process_count: int | None = None,
  field: str = 'eval_split',
) -> tf.data.Dataset:
  """The eval split of this process, padded to a whole number of batches.

  Every process yields `num_eval_steps(...)` batches; padded examples carry
  `mask == 0`, so summing `mask` over all processes gives the split size.
  `field`: the split of `config.data` to read ('eval_split' or
  'minival_split'), as the eval split is read.
  """
  process_index, process_count = _topology(process_index, process_count)
  batch = placement.per_process_batch_size(
    config.data.eval_batch_size, 'config.data.eval_batch_size', process_count
  )
  whole = config.data[field]
  _check_split(builder, whole, f'config.data.{field}')
  split = tfds.even_splits(whole, n=process_count, drop_remainder=False)[
    process_index
  ]
  local = builder.info.splits[split].num_examples
  total = builder.info.splits[whole].num_examples
  steps = num_eval_steps(total, process_count, batch)
  ds, jpeg = _read(
    builder, split, shuffle=False, seed=config.seed, cache=config.data.cache
  )

  def preprocess(example):
    image, label = _preprocess(
      example, None, train=False, jpeg=jpeg, config=config
    )
    return {'image': image, 'label': label, 'mask': tf.constant(1.0)}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  size = config.data.image_size
  padding = tf.data.Dataset.from_tensors(
    {
      'image': tf.zeros((size, size, 3), tf.uint8),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0),
    }
  ).repeat(steps * batch - local)
  ds = _device_batches(ds.concatenate(padding), batch)
  return _prefetched(ds, config)


def prefetch_to_device(
  ds: tf.data.Dataset | Iterator[dict[str, Any]],
  sharding: jax.sharding.Sharding,
  size: int = 2,
) -> Iterator[dict[str, Any]]:
  """Batches of `ds` (or of a numpy iterator), placed `size` steps ahead.

  `sharding` places every array of a batch (for pmap: the leading axis over
  the local devices, as the step expects it; see placement.split).
  """
  it = iter(tfds.as_numpy(ds)) if isinstance(ds, tf.data.Dataset) else ds
  queue = collections.deque()
  for batch in it:
    queue.append(jax.device_put(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def started(ds: tf.data.Dataset) -> Iterator[dict[str, Any]]:
  """A numpy iterator over `ds` whose first batch has been read.

  Reading it can take seconds (a shuffle buffer to fill); in a thread, it
  overlaps with work such as compiling the step.
  """
  it = iter(tfds.as_numpy(ds))
  return itertools.chain([next(it)], it)


def batch_spec(
  ds: tf.data.Dataset, sharding: jax.sharding.Sharding | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
  """The batches of `ds` as `prefetch_to_device` places them, abstractly
  (without `sharding`: shapes and dtypes only, picklable)."""
  return {
    k: jax.ShapeDtypeStruct(
      tuple(v.shape), v.dtype.as_numpy_dtype, sharding=sharding
    )
    for k, v in ds.element_spec.items()
  }


# ----------------------------------------------------------------- benchmark


def _time_batches(ds, steps: int, warmup: int, batch_size: int):
  """Times `steps` batches of `ds` after `warmup` untimed ones."""
  it = iter(tfds.as_numpy(ds))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  elapsed = time.perf_counter() - start
  return dict(
    images_per_second=steps * batch_size / elapsed, seconds=elapsed, steps=steps
  )


def benchmark(
  config: ml_collections.ConfigDict,
  *,
  steps: int = 50,
  warmup: int = 5,
  split: str = 'train',
) -> dict[str, float]:
  """Images/second of the host pipeline (no device transfer)."""
  builder = get_builder(config)
  if split == 'train':
    ds = create_train_dataset(builder, config)
  else:
    ds = create_eval_dataset(builder, config).repeat()
  return _time_batches(ds, steps, warmup, config.data.batch_size)


def benchmark_jpeg(
  config: ml_collections.ConfigDict,
  *,
  steps: int = 20,
  warmup: int = 3,
  num_images: int = 256,
  jpeg_size: tuple[int, int] = (375, 500),
) -> dict[str, float]:
  """Images/second of the train transforms on locally made JPEGs.

  ImageNet-style: `num_images` smooth random images of `jpeg_size` (ImageNet's
  typical 375x500), JPEG-encoded in memory, decoded with the crop window
  and augmented exactly as `create_train_dataset` does.
  """
  rng = np.random.default_rng(0)
  jpegs = []
  for _ in range(num_images):
    small = rng.integers(0, 256, (jpeg_size[0] // 8, jpeg_size[1] // 8, 3))
    image = tf.image.resize(tf.constant(small, tf.float32), jpeg_size)
    jpegs.append(tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90))
  ds = tf.data.Dataset.from_tensor_slices(
    {'image': tf.stack(jpegs), 'label': tf.zeros([num_images], tf.int64)}
  )
  ds = tf.data.Dataset.zip(ds.repeat(), tf.data.Dataset.random(seed=0).batch(2))
  ds = ds.map(
    lambda ex, seed: dict(
      zip(
        ('image', 'label'),
        _preprocess(ex, seed, train=True, jpeg=True, config=config),
        strict=True,
      )
    ),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = _prefetched(_device_batches(ds, config.data.batch_size), config)
  return _time_batches(ds, steps, warmup, config.data.batch_size)
