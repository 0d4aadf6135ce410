"""Images/second of the host input pipeline (no device transfer).

python -m mnv2_flax.benchmark --input_pipeline --config=configs/quickstart.py
python -m mnv2_flax.benchmark --input_pipeline --photos \
    --config=configs/default.py --resolutions=96,128,160,192,224
"""

import os
import tempfile
import time

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax.data import input_pipeline
from mnv2_flax.data import photos
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


# What --photos times at each resolution: (name, config.data fields).
PHOTO_SOURCES = (
  ('original, full decode', dict(jpeg_scaled_decode=False)),
  ('original, scaled decode', dict(jpeg_scaled_decode=True)),
  ('copy, JPEG', dict(resized_format='jpeg')),
  ('copy, raw', dict(resized_format='raw')),
)


def benchmark_photos(
  config: ml_collections.ConfigDict,
  resolutions: tuple[int, ...],
  *,
  num_images: int = 1024,
  steps: int = 20,
  warmup: int = 3,
  threads: int = 1,
  copy_side_ratio: float = 0.0,
) -> dict[str, list[dict]]:
  """Images/s of `config`'s train pipeline on a tfds dataset of photo-like
  JPEGs of ImageNet's sizes (`photos`), at each of `resolutions`: from the
  original with and without scaled decoding, and from resized copies (JPEG
  and raw) at the smallest short side that covers the resolution (or at
  `copy_side_ratio` times it, if larger), with tf.data on `threads` threads
  (1: per core).

  Returns {'pipeline': rows of (resolution, source, images/s),
  'copies': rows of what each copy cost to prepare and store}.
  """
  rows, copies = [], []
  with tempfile.TemporaryDirectory() as data_dir:
    num_eval = 32
    path = photos.write_dataset(
      data_dir, num_train=num_images, num_eval=num_eval, shard_size=256
    )
    per_1000 = 1000 / (num_images + num_eval)  # both splits are copied
    original_bytes = _bytes(path)
    for size in resolutions:
      side = max(
        defaults.covering_short_side(size, config.data.eval_crop_fraction),
        round(copy_side_ratio * size),
      )
      for name, fields in PHOTO_SOURCES:
        c = ml_collections.ConfigDict(config.to_dict())
        c.data.update(
          name='photos',
          data_dir=data_dir,
          image_size=size,
          train_split='train',
          minival_split='',
          eval_split='validation',
          shuffle_buffer=num_images,
          threadpool_size=threads,
          resized_short_side=side if name.startswith('copy') else 0,
          **fields,
        )
        start = time.perf_counter()
        builder = prepare.get_builder(c)
        if name.startswith('copy'):
          copies.append(
            dict(
              short_side=side,
              format=c.data.resized_format,
              seconds_per_1000=(time.perf_counter() - start) * per_1000,
              mb_per_1000=_bytes(builder.data_dir) / 1e6 * per_1000,
              original_mb_per_1000=original_bytes / 1e6 * per_1000,
            )
          )
        ds = input_pipeline.create_train_dataset(builder, c)
        result = _time_batches(ds, steps, warmup, c.data.batch_size)
        rows.append(
          dict(resolution=size, source=name, short_side=side, **result)
        )
  return dict(pipeline=rows, copies=copies)


def _bytes(directory: str) -> int:
  return sum(
    os.path.getsize(os.path.join(directory, f))
    for f in os.listdir(directory)
    if '.tfrecord' in f
  )


def format_photos(result: dict[str, list[dict]], threads: int) -> str:
  """The table of `benchmark_photos`: images/s per resolution and source."""
  names = [name for name, _ in PHOTO_SOURCES]
  by_size = {}
  for row in result['pipeline']:
    by_size.setdefault(row['resolution'], {})[row['source']] = row
  unit = 'per core' if threads == 1 else f'on {threads} threads'
  lines = [
    f'Train pipeline, photo-like JPEGs of ImageNet sizes: images/s {unit}',
    '| px | copy side | ' + ' | '.join(names) + ' |',
    '|---:|---:|' + '---:|' * len(names),
  ]
  for size, rows in by_size.items():
    side = next(iter(rows.values()))['short_side']
    cells = ' | '.join(f'{rows[n]["images_per_second"]:,.0f}' for n in names)
    lines.append(f'| {size} | {side} | {cells} |')
  lines += [
    '',
    f'Copies: preparation ({os.cpu_count()} CPUs) and size per 1,000 images',
    '| side | format | s / 1,000 | MB / 1,000 | original MB / 1,000 |',
    '|---:|---|---:|---:|---:|',
  ]
  for c in result['copies']:
    lines.append(
      f'| {c["short_side"]} | {c["format"]} | {c["seconds_per_1000"]:.1f} | '
      f'{c["mb_per_1000"]:.1f} | {c["original_mb_per_1000"]:.1f} |'
    )
  return '\n'.join(lines)
