"""Images/second of the host input pipeline (no device transfer).

python -m mnv2_flax.benchmark --input_pipeline --config=configs/quickstart.py
"""

import time

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax.data import input_pipeline
from mnv2_flax.data import prepare
from mnv2_flax.data import transforms


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
  builder = prepare.get_builder(config)
  if split == 'train':
    ds = input_pipeline.create_train_dataset(builder, config)
  else:
    ds = input_pipeline.create_eval_dataset(builder, config).repeat()
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
  and augmented exactly as `input_pipeline.create_train_dataset` does.
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
        transforms.preprocess(ex, seed, train=True, jpeg=True, config=config),
        strict=True,
      )
    ),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = input_pipeline.device_batches(ds, config.data.batch_size)
  ds = input_pipeline.prefetched(ds, config)
  return _time_batches(ds, steps, warmup, config.data.batch_size)
