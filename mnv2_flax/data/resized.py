"""A resized copy of a prepared tfds dataset, for training at low resolution.

`config.data.resized_short_side=S` makes runs read a copy of
`config.data.name` whose images have short side S (those already no larger
are kept as they are), stored as JPEG (quality `JPEG_QUALITY`) or as raw
pixels (`config.data.resized_format`). Decoding a 375x500 ImageNet JPEG is
most of what an image costs the host at low resolution; the copy's images
have several times fewer pixels (docs/input_pipeline.md).

The copy keeps the source's splits, shards and example order, so split
expressions (`train[:99%]`, a minival) name the same examples in both. It is
prepared once, shard by shard, under the dataset lock: an interrupted
preparation resumes at its first shard not written. Prepare it ahead with

  python -m mnv2_flax.prepare_data --config=configs/default.py \\
    --config.data.resized_short_side=146

or let the first run do it. It lives beside the source, in
`<data_dir>/resized/<name>_<S>px_<format>/<version>`.
"""

import contextlib
import os
import re
import time

from absl import logging
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax.data import transforms
from mnv2_flax.runtime import workdir_lock

FORMATS = defaults.RESIZED_FORMATS
JPEG_QUALITY = 90  # FFCV's, for its JPEG copies
_DONE = 'dataset_info.json'


class CopyError(ValueError):
  """The source dataset could not be read into a copy."""


def directory(data_dir: str, source, config: ml_collections.ConfigDict) -> str:
  """Where the copy of `source` (a prepared tfds builder) is."""
  name = re.sub(r'[^a-z0-9_]', '_', source.info.full_name.rsplit('/', 1)[0])
  data = config.data
  return os.path.join(
    data_dir,
    'resized',
    f'{name}_{data.resized_short_side}px_{data.resized_format}',
    str(source.info.version),
  )


def get_builder(source, config: ml_collections.ConfigDict, data_dir: str):
  """The tfds builder of the copy of `source` that `config` asks for,
  prepared first if it is not (under the dataset lock: one process
  prepares, the others wait)."""
  path = directory(data_dir, source, config)
  if not os.path.exists(os.path.join(path, _DONE)):
    lock = f'.{os.path.basename(os.path.dirname(path))}.lock'
    with workdir_lock.hold(data_dir, 'dataset directory', wait=True, file=lock):
      if not os.path.exists(os.path.join(path, _DONE)):
        made = _missing(path, data_dir)
        os.makedirs(path, exist_ok=True)
        try:
          _prepare(source, config, path)
        except BaseException:
          for made_dir in made:  # empty unless shards were written
            with contextlib.suppress(OSError):
              os.rmdir(made_dir)
          raise
  return tfds.builder_from_directory(path)


def _missing(path: str, top: str) -> list[str]:
  """`path` and its ancestors below `top` that do not exist, deepest first."""
  missing = []
  while not os.path.exists(path) and path != top:
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def _features(source, config):
  label = source.info.features['label']
  if config.data.resized_format == 'jpeg':
    image = tfds.features.Image(encoding_format='jpeg')
  else:
    channels = source.info.features['image'].shape[-1] or 3
    image = tfds.features.Tensor(
      shape=(None, None, channels),
      dtype=tf.uint8,
      encoding=tfds.features.Encoding.BYTES,
    )
  return tfds.features.FeaturesDict({'image': image, 'label': label})


def resize(example, *, jpeg: bool, short_side: int, fmt: str):
  """One example's image at short side `short_side` (not enlarged): JPEG
  bytes or uint8 pixels. A source JPEG is decoded at the smallest scale
  that keeps its short side at least `short_side`, then resized with
  antialiasing (bilinear, PIL-like); one already no larger is kept."""
  data = example['image']
  shape = tf.image.extract_jpeg_shape(data) if jpeg else tf.shape(data)
  height, width = shape[0], shape[1]
  small = tf.minimum(height, width) <= short_side

  def pixels():
    if jpeg:
      window = tf.stack([0, 0, height, width])
      return transforms.scaled_decode(data, window, shape, short_side)
    return data

  def resized():
    image = pixels()
    scale = short_side / tf.cast(tf.minimum(height, width), tf.float32)
    size = tf.cast(
      tf.round(tf.cast(tf.stack([height, width]), tf.float32) * scale),
      tf.int32,
    )
    image = tf.image.resize(image, size, method='area')
    return tf.saturate_cast(tf.round(image), tf.uint8)

  if fmt == 'jpeg':
    kept = (lambda: data) if jpeg else (lambda: tf.io.encode_jpeg(data))
    image = tf.cond(
      small,
      kept,
      lambda: tf.io.encode_jpeg(resized(), quality=JPEG_QUALITY),
    )
  else:
    image = tf.cond(small, pixels, resized)
  return {'image': image, 'label': example['label']}


def _prepare(source, config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the copy shard by shard (each renamed into place once whole),
  then its metadata, which marks it prepared."""
  data = config.data
  features = _features(source, config)
  name = os.path.basename(os.path.dirname(path))
  jpeg = getattr(source.info.features['image'], 'encoding_format', '') == 'jpeg'
  decoders = {'image': tfds.decode.SkipDecoding()} if jpeg else None
  split_infos = []
  start = time.perf_counter()
  for split, info in source.info.splits.items():
    lengths = info.shard_lengths
    first = 0
    num_bytes = 0
    for k, length in enumerate(lengths):
      out = os.path.join(
        path, f'{name}-{split}.tfrecord-{k:05d}-of-{len(lengths):05d}'
      )
      if not os.path.exists(out):
        ds = source.as_dataset(
          split=f'{split}[{first}:{first + length}]', decoders=decoders
        ).map(
          lambda ex: resize(
            ex,
            jpeg=jpeg,
            short_side=data.resized_short_side,
            fmt=data.resized_format,
          ),
          num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True,
        )
        partial = out + '.incomplete'
        try:
          with tf.io.TFRecordWriter(partial) as writer:
            for example in tfds.as_numpy(ds):
              writer.write(features.serialize_example(example))
        except tf.errors.OpError as e:
          os.remove(partial)
          raise CopyError(
            f'{source.info.full_name}: the resized copy could not be made '
            f'from examples [{first}, {first + length}) of its {split!r} '
            f'split ({type(e).__name__}: {" ".join(e.message.split())[:200]});'
            ' the source dataset may be damaged: prepare it again.'
          ) from None
        os.replace(partial, out)
        logging.info(
          'Resized copy %s: %s shard %d/%d written (%.0f s so far).',
          name,
          split,
          k + 1,
          len(lengths),
          time.perf_counter() - start,
        )
      num_bytes += os.path.getsize(out)
      first += length
    split_infos.append(
      tfds.core.SplitInfo(
        name=split, shard_lengths=list(lengths), num_bytes=num_bytes
      )
    )
  tfds.folder_dataset.write_metadata(
    data_dir=path,
    features=features,
    split_infos=split_infos,
    version=str(source.info.version),
    check_data=False,
    description=(
      f'{source.info.full_name} resized to short side '
      f'{data.resized_short_side} ({data.resized_format}) by mnv2_flax.'
    ),
  )
