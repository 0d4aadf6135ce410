"""The resized copy of a dataset (`config.data.resized_short_side`), made
from a tfds dataset of photo-like JPEGs of ImageNet's sizes."""

import os
import signal
import subprocess
import sys
import time

from fake_data import area_resize
from fake_data import psnr
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax.data import input_pipeline as ip
from mnv2_flax.data import photos
from mnv2_flax.data import prepare
from mnv2_flax.data import resized
from mnv2_flax.data import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_EVAL, SHARD = 96, 32, 16


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  photos.write_dataset(
    path, num_train=NUM_TRAIN, num_eval=NUM_EVAL, shard_size=SHARD
  )
  return path


def photos_config(data_dir, size=96, side=0, fmt='jpeg'):
  config = defaults.get_config()
  config.data.update(
    name='photos',
    data_dir=data_dir,
    image_size=size,
    batch_size=8,
    eval_batch_size=NUM_EVAL,
    resized_short_side=side,
    resized_format=fmt,
  )
  return config


def examples(builder, split):
  decoders = (
    {'image': tfds.decode.SkipDecoding()}
    if getattr(builder.info.features['image'], 'encoding_format', '')
    else None
  )
  return list(tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders)))


def shape_of(image):
  if isinstance(image, bytes):
    return tuple(tf.image.extract_jpeg_shape(image).numpy()[:2])
  return image.shape[:2]


@pytest.mark.parametrize('fmt', resized.FORMATS)
def test_the_copy_keeps_splits_shards_order_and_labels(data_dir, fmt):
  source = prepare.get_builder(photos_config(data_dir))
  copy = prepare.get_builder(photos_config(data_dir, side=110, fmt=fmt))
  assert copy.data_dir == resized.directory(
    data_dir, source, photos_config(data_dir, side=110, fmt=fmt)
  )
  for split in ('train', 'validation'):
    assert (
      copy.info.splits[split].shard_lengths
      == source.info.splits[split].shard_lengths
    )
    original, small = examples(source, split), examples(copy, split)
    assert [e['label'] for e in small] == [e['label'] for e in original]
    for a, b in zip(original, small, strict=True):
      (h, w), (sh, sw) = shape_of(a['image']), shape_of(b['image'])
      assert min(sh, sw) == 110
      assert abs(sh / sw - h / w) < 0.01  # the aspect ratio kept
  # Example by example: the copy holds the source's images, resized.
  jpeg = fmt == 'jpeg'
  for a, b in list(zip(original, small, strict=True))[::7]:
    want = resized.resize(
      {'image': tf.constant(a['image']), 'label': 0},
      jpeg=True,
      short_side=110,
      fmt=fmt,
    )['image'].numpy()
    assert (want == b['image']) if jpeg else np.array_equal(want, b['image'])
  config = photos_config(data_dir, side=110, fmt=fmt)
  assert prepare.dataset_meta(copy, config).num_classes == 10


def test_images_no_larger_than_the_side_are_kept(data_dir):
  source = prepare.get_builder(photos_config(data_dir))
  copy = prepare.get_builder(photos_config(data_dir, size=224, side=512))
  for a, b in zip(
    examples(source, 'validation'), examples(copy, 'validation'), strict=True
  ):
    assert a['image'] == b['image']  # the same JPEG bytes, not re-encoded


def eval_images(config):
  ds = ip.create_eval_dataset(prepare.get_builder(config), config)
  return next(iter(tfds.as_numpy(ds)))['image'][0]


@pytest.mark.parametrize('size', [64, 96])
@pytest.mark.parametrize('fmt', resized.FORMATS)
def test_eval_crops_from_the_copy_stay_close_to_the_originals(
  data_dir, size, fmt, monkeypatch
):
  # The measure: PSNR against an alias-free reference (the original fully
  # decoded, its centre crop area-resized), for the copy at the smallest
  # side that covers `size`, beside the original's own eval images. Most
  # of the copy's difference is a sub-pixel shift: its rounded width moves
  # the centre crop by up to ~0.7 output pixels.
  side = defaults.covering_short_side(size, 0.875)
  copy = eval_images(photos_config(data_dir, size, side, fmt))
  original = eval_images(photos_config(data_dir, size))
  config = photos_config(data_dir, size)
  config.data.jpeg_scaled_decode = False
  monkeypatch.setattr(transforms, 'finish', area_resize)
  reference = eval_images(config)
  to_ref = [psnr(a, r) for a, r in zip(copy, reference, strict=True)]
  original_to_ref = np.median(
    [psnr(a, r) for a, r in zip(original, reference, strict=True)]
  )
  assert np.median(to_ref) >= 25 and min(to_ref) >= 20
  assert np.median(to_ref) >= original_to_ref - 8


def test_covering_short_side():
  assert defaults.covering_short_side(128, 0.875) == 147
  assert defaults.covering_short_side(96, 0.875) == 110
  assert defaults.covering_short_side(32, 1.0) == 32


@pytest.mark.parametrize(
  'fields,words',
  [
    (dict(resized_short_side=100), 'at least 110 for image_size 96'),
    (
      dict(resized_short_side=110, test_image_sizes=(128,)),
      'at least 147 for test_image_sizes 128',
    ),
    (dict(resized_short_side=-1), 'a whole number of pixels'),
    (dict(resized_short_side=146, resized_format='png'), "'jpeg' or 'raw'"),
  ],
)
def test_error_copy_that_does_not_cover_the_run(data_dir, fields, words):
  config = photos_config(data_dir)
  config.data.update(fields)
  field = (
    'resized_format' if 'resized_format' in fields else 'resized_short_side'
  )
  with pytest.raises(ValueError, match=f'config.data.{field}=') as error:
    prepare.get_builder(config)
  assert words in str(error.value)
  assert not os.path.exists(
    os.path.join(data_dir, 'resized', 'photos', '100px_jpeg')
  )


@pytest.mark.slow
def test_an_interrupted_preparation_resumes_where_it_stopped(
  data_dir, tmp_path
):
  # A real process, killed (SIGKILL) once it has written a shard; the
  # command run again finishes the copy, rewriting none of the shards
  # already there, and the copy equals one prepared without interruption.
  command = [
    sys.executable,
    '-m',
    'mnv2_flax.prepare_data',
    '--config=configs/default.py',
    '--config.data.name=photos',
    f'--config.data.data_dir={data_dir}',
    '--config.data.image_size=64',
    '--config.data.resized_short_side=80',
  ]
  config = photos_config(data_dir, size=64, side=80)
  path = resized.directory(
    data_dir, prepare.get_builder(photos_config(data_dir)), config
  )
  process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  written = []
  while not written and process.poll() is None:
    assert time.monotonic() < deadline
    if os.path.isdir(path):
      written = [f for f in os.listdir(path) if '-of-' in f and '.inc' not in f]
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, 'finished before the kill'
  assert not os.path.exists(os.path.join(path, 'dataset_info.json'))
  kept = {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in written}

  result = subprocess.run(
    command, cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert path in result.stdout
  for f, mtime in kept.items():
    assert os.stat(os.path.join(path, f)).st_mtime_ns == mtime
  assert not [f for f in os.listdir(path) if 'incomplete' in f]

  fresh_dir = str(tmp_path / 'fresh')
  photos.write_dataset(
    fresh_dir, num_train=NUM_TRAIN, num_eval=NUM_EVAL, shard_size=SHARD
  )
  fresh = prepare.get_builder(photos_config(fresh_dir, size=64, side=80))
  resumed = tfds.builder_from_directory(path)
  for split in ('train', 'validation'):
    a, b = examples(resumed, split), examples(fresh, split)
    assert [e['image'] for e in a] == [e['image'] for e in b]


def test_error_a_damaged_source_leaves_no_copy(tmp_path):
  # The source's JPEGs cut short: one error naming the examples read, and
  # no copy directory left (no shard was finished).
  data_dir = str(tmp_path)
  path = photos.write_dataset(data_dir, num_train=4, num_eval=4)
  features = tfds.builder_from_directory(path).info.features
  for split in ('train', 'validation'):
    file = os.path.join(path, f'photos-{split}.tfrecord-00000-of-00001')
    with tf.io.TFRecordWriter(file) as writer:
      for jpeg in photos.jpegs(4):
        example = {'image': jpeg[:500], 'label': 0}
        writer.write(features.serialize_example(example))
  config = photos_config(data_dir, side=110)
  with pytest.raises(resized.CopyError, match=r'examples \[0, 4\) of its'):
    prepare.get_builder(config)
  assert not os.path.exists(tmp_path / 'resized')


def test_error_a_copy_of_another_source_is_refused(tmp_path):
  # The source re-prepared (other shard lengths) after its copy was made:
  # the copy is refused, naming its directory, and nothing is deleted.
  data_dir = str(tmp_path)
  photos.write_dataset(data_dir, num_train=8, num_eval=4, shard_size=4)
  copy = prepare.get_builder(photos_config(data_dir, size=64, side=80))
  before = sorted(os.listdir(copy.data_dir))
  source = os.path.join(data_dir, 'photos')
  os.rename(source, str(tmp_path / 'old'))
  photos.write_dataset(data_dir, num_train=8, num_eval=4, shard_size=8)
  with pytest.raises(resized.CopyError, match='another source') as error:
    prepare.get_builder(photos_config(data_dir, size=64, side=80))
  assert copy.data_dir in str(error.value) and 'delete' in str(error.value)
  assert sorted(os.listdir(copy.data_dir)) == before


def test_error_a_copy_in_a_bucket_is_not_made(data_dir):
  source = prepare.get_builder(photos_config(data_dir))
  config = photos_config('gs://bucket/tfds', side=110)
  with pytest.raises(resized.CopyError, match='local data_dir'):
    resized.get_builder(source, config, 'gs://bucket/tfds')
