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
import functools
import itertools
import math
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax.data import prepare
from mnv2_flax.data import transforms
from mnv2_flax.runtime import placement


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


def device_batches(ds, per_process_batch, transform=None):
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


def prefetched(ds, config):
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

  if transforms.augments_per_batch(builder, config, jpeg):
    transform = functools.partial(transforms.preprocess_batch, config=config)
    return prefetched(device_batches(ds, batch, transform), config)

  def preprocess(example, example_seed):
    image, label = transforms.preprocess(
      example, example_seed, train=True, jpeg=jpeg, config=config
    )
    return {'image': image, 'label': label}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = device_batches(ds, batch)
  return prefetched(ds, config)


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
  prepare.check_split(builder, whole, f'config.data.{field}')
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
    image, label = transforms.preprocess(
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
  ds = device_batches(ds.concatenate(padding), batch)
  return prefetched(ds, config)


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
