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

or let the first run do it (prepare it ahead for multi-host runs, and
before evaluating or exporting on another machine: a run that finds no copy
makes one). It lives beside the source, in
`<data_dir>/resized/<name>[/<config>]/<S>px_<format>/<version>`, with
`copy.json`, written last, naming the source it was made from: a copy (or
part of one) of another source, re-prepared or made by another recipe, is
refused, not read.
"""

import os
import re
import time
import uuid

from absl import logging
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax.data import transforms
from mnv2_flax.runtime import files
from mnv2_flax.runtime import workdir_lock

FORMATS = defaults.RESIZED_FORMATS
JPEG_QUALITY = 90  # FFCV's, for its JPEG copies
# What a copy's pixels depend on besides its source and side: a copy made
# by another recipe is not reused.
RECIPE = f'scaled decode, area resize, JPEG quality {JPEG_QUALITY}'
_MARKER = 'copy.json'
_STARTED = 'copy.started.json'


class CopyError(ValueError):
  """The copy cannot be made or read; the message says what to do."""


def directory(data_dir: str, source, config: ml_collections.ConfigDict) -> str:
  """Where the copy of `source` (a prepared tfds builder) is."""
  data = config.data
  return os.path.join(
    data_dir,
    'resized',
    *source.info.full_name.split('/')[:-1],  # name[/config]
    f'{data.resized_short_side}px_{data.resized_format}',
    str(source.info.version),
  )


def _fingerprint(source, config) -> dict:
  """What the copy is made from: compared with its `copy.json`."""
  return dict(
    source=source.info.full_name,
    source_splits={
      name: dict(shard_lengths=list(s.shard_lengths), num_bytes=s.num_bytes)
      for name, s in source.info.splits.items()
    },
    short_side=config.data.resized_short_side,
    format=config.data.resized_format,
    recipe=RECIPE,
  )


def get_builder(source, config: ml_collections.ConfigDict, data_dir: str):
  """The tfds builder of the copy of `source` that `config` asks for,
  prepared first if it is not (under the dataset lock: one process
  prepares, the others wait).

  Raises:
    CopyError: the copy was made from another source or recipe, cannot be
      written where it belongs, or its source cannot be read.
  """
  path = directory(data_dir, source, config)
  want = _fingerprint(source, config)
  if not _ready(path, want):
    if '://' in data_dir:
      raise CopyError(
        f'config.data.resized_short_side={config.data.resized_short_side}: '
        f'a copy is made in a local data_dir, not in {data_dir}; prepare it '
        'with `python -m mnv2_flax.prepare_data` on a local data_dir and '
        'copy it there.'
      )
    lock = f'.{_file_prefix(path)}.lock'
    try:
      with workdir_lock.hold(
        data_dir, 'dataset directory', wait=True, file=lock
      ):
        if not _ready(path, want):
          _prepare_in(source, config, path, data_dir)
    except OSError as e:
      raise CopyError(
        f'config.data.resized_short_side={config.data.resized_short_side}: '
        f'the copy cannot be written in {data_dir} ({e}); run `python -m '
        'mnv2_flax.prepare_data` where the data_dir is writable.'
      ) from None
  return tfds.builder_from_directory(path)


def _ready(path: str, want: dict) -> bool:
  """Whether the copy at `path` is whole and made as `want` says."""
  have = files.read_json(os.path.join(path, _MARKER))
  if not have:
    return False
  if have != want:
    raise CopyError(
      f'{path} was made from another source or recipe than this run reads '
      f'({_difference(have, want)}); delete that directory to make the copy '
      'again.'
    )
  return True


def _difference(have: dict, want: dict) -> str:
  key = next(k for k in want if have.get(k) != want[k])
  return f'{key}: {have.get(key)!r} there, {want[key]!r} now'


def _file_prefix(path: str) -> str:
  """The copy's file name prefix: a tfds dataset name (no '-')."""
  parts = os.path.normpath(path).split(os.sep)
  start = len(parts) - 1 - parts[::-1].index('resized')
  return re.sub(r'[^a-z0-9_]', '_', '_'.join(parts[start + 1 : -1]).lower())


def _prepare_in(source, config, path: str, data_dir: str) -> None:
  """`_prepare` in `path`; a failure before any shard is written leaves no
  directory it made."""
  made, parent = [], path
  while not os.path.exists(parent) and parent != data_dir:
    made.append(parent)
    parent = os.path.dirname(parent)
  os.makedirs(path, exist_ok=True)
  try:
    _prepare(source, config, path)
  except BaseException:
    if os.listdir(path) == [_STARTED]:  # no shard written
      os.remove(os.path.join(path, _STARTED))
    for directory_made in made:  # empty unless shards were written
      try:
        os.rmdir(directory_made)
      except OSError:
        break
    raise


def _features(source, config):
  label = source.info.features['label']
  channels = source.info.features['image'].shape[-1] or 3
  if config.data.resized_format == 'jpeg':
    image = tfds.features.Image(
      shape=(None, None, channels), encoding_format='jpeg'
    )
  else:
    image = tfds.features.Tensor(
      shape=(None, None, channels),
      dtype=tf.uint8,
      encoding=tfds.features.Encoding.BYTES,
    )
  return tfds.features.FeaturesDict({'image': image, 'label': label})


def resize(example, *, jpeg: bool, short_side: int, fmt: str):
  """One example's image at short side `short_side` (not enlarged): JPEG
  bytes or uint8 pixels. A source JPEG is decoded at the smallest scale
  that keeps its short side at least `short_side`, then area-resized; one
  already no larger is kept (a source JPEG as its bytes)."""
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
    if jpeg:
      kept = lambda: data  # noqa: E731
    else:
      kept = lambda: tf.io.encode_jpeg(data, quality=JPEG_QUALITY)  # noqa: E731
    image = tf.cond(
      small,
      kept,
      lambda: tf.io.encode_jpeg(resized(), quality=JPEG_QUALITY),
    )
  else:
    image = tf.cond(small, pixels, resized)
  return {'image': image, 'label': example['label']}


def _prepare(source, config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the copy shard by shard (each renamed into place once whole and
  counted), then `copy.json`, which marks it whole. The caller holds the
  lock: temporary files left by a killed preparation are removed first."""
  data = config.data
  features = _features(source, config)
  prefix = _file_prefix(path)
  for name in os.listdir(path):
    if '.incomplete' in name:
      os.remove(os.path.join(path, name))
  started = os.path.join(path, _STARTED)
  want = _fingerprint(source, config)
  have = files.read_json(started)
  if have and have != want:  # its shards are another source's
    raise CopyError(
      f'{path} holds part of a copy of another source or recipe '
      f'({_difference(have, want)}); delete that directory to make the copy '
      'again.'
    )
  files.write_json(started, want)
  jpeg = getattr(source.info.features['image'], 'encoding_format', '') == 'jpeg'
  decoders = {'image': tfds.decode.SkipDecoding()} if jpeg else None
  split_infos, start = [], time.perf_counter()
  for split, info in source.info.splits.items():
    lengths, first, num_bytes = list(info.shard_lengths), 0, 0
    for k, length in enumerate(lengths):
      out = os.path.join(
        path, f'{prefix}-{split}.tfrecord-{k:05d}-of-{len(lengths):05d}'
      )
      if not os.path.exists(out):
        examples = _read(source, split, first, length, decoders, jpeg, data)
        _write(out, examples, features, length, f'{split} shard {k}')
        logging.info(
          'Resized copy %s: %s shard %d/%d written (%.0f s so far).',
          prefix,
          split,
          k + 1,
          len(lengths),
          time.perf_counter() - start,
        )
      num_bytes += os.path.getsize(out)
      first += length
    split_infos.append(
      tfds.core.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=num_bytes
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
  files.write_json(os.path.join(path, _MARKER), want)
  os.remove(started)


def _read(source, split, first, length, decoders, jpeg, data):
  """The resized examples [first, first + length) of `split`, in order;
  a source that cannot be read raises `CopyError` naming them."""
  if not length:  # an empty shard: tfds reads no instruction
    return
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
  examples = iter(tfds.as_numpy(ds))
  while True:
    try:
      yield next(examples)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise CopyError(
        f'{source.info.full_name}: the resized copy could not be made from '
        f'examples [{first}, {first + length}) of its {split!r} split '
        f'({type(e).__name__}: {" ".join(e.message.split())[:200]}); the '
        'source dataset may be damaged: prepare it again.'
      ) from None


def _write(out: str, examples, features, length: int, what: str) -> None:
  """`examples` serialised into the TFRecord file `out`, whole or not at
  all: written under a name of this process's, synced, counted, renamed."""
  partial = f'{out}.incomplete-{uuid.uuid4().hex}'
  try:
    count = 0
    with tf.io.TFRecordWriter(partial) as writer:
      for example in examples:
        writer.write(features.serialize_example(example))
        count += 1
    if count != length:
      raise CopyError(
        f'{what}: the source gave {count} examples where its dataset_info '
        f'says {length}; prepare the source again.'
      )
    with open(partial, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(partial, out)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
