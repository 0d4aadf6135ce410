"""JPEG decoding at reduced scale (`config.data.jpeg_scaled_decode`) against
the full decode, on photo-like JPEGs of ImageNet's sizes."""

from fake_data import area_resize
from fake_data import psnr
from fake_data import tiny_config
import numpy as np
import pytest
import tensorflow as tf

from mnv2_flax.data import photos
from mnv2_flax.data import transforms

NUM_PHOTOS = 24


@pytest.fixture(scope='module')
def jpegs():
  return photos.jpegs(NUM_PHOTOS)


def preprocessed(jpegs, size, *, train, scaled):
  config = tiny_config('unused')
  config.data.update(image_size=size, jpeg_scaled_decode=scaled)
  images = []
  for i, jpeg in enumerate(jpegs):
    example = {'image': tf.constant(jpeg), 'label': 0}
    seed = tf.constant([i, 1], tf.int64) if train else None
    image, _ = transforms.preprocess(
      example, seed, train=train, jpeg=True, config=config
    )
    images.append(image.numpy())
  return images


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_windows_under_twice_the_size_decode_exactly_as_before(jpegs, train):
  # At 224 px: no window of these photos (short side <= 400) is 448 px on
  # both sides, so scaled decoding changes nothing.
  full = preprocessed(jpegs, 224, train=train, scaled=False)
  scaled = preprocessed(jpegs, 224, train=train, scaled=True)
  for a, b in zip(full, scaled, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('size', [64, 96])
@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_scaled_decoding_stays_close_to_the_full_decode(
  jpegs, size, train, monkeypatch
):
  # The measure: PSNR of the uint8 outputs. Against the full decode +
  # bilinear resize of today (which aliases: it does not low-pass), and
  # against an alias-free reference (full decode, area resize), to which
  # the scaled decode must stay as close as the full one, within 4 dB.
  full = preprocessed(jpegs, size, train=train, scaled=False)
  scaled = preprocessed(jpegs, size, train=train, scaled=True)
  to_full = [psnr(a, b) for a, b in zip(full, scaled, strict=True)]
  assert sum(np.isfinite(to_full)) >= NUM_PHOTOS // 3  # scaled decodes ran
  assert np.median(to_full) >= 25 and min(to_full) >= 18
  monkeypatch.setattr(transforms, 'finish', area_resize)
  ref = preprocessed(jpegs, size, train=train, scaled=False)
  full_ref = np.median([psnr(a, r) for a, r in zip(full, ref, strict=True)])
  scaled_ref = np.median([psnr(a, r) for a, r in zip(scaled, ref, strict=True)])
  assert scaled_ref >= 30 and scaled_ref >= full_ref - 4


def test_scaled_windows_stay_inside_the_scaled_image():
  # Windows at the far edges of odd-sized images, at every scale.
  rng = np.random.default_rng(1)
  config = tiny_config('unused')
  config.data.update(image_size=8, jpeg_scaled_decode=True)
  for height, width in ((63, 65), (121, 97), (64, 64)):
    jpeg = tf.io.encode_jpeg(photos.photo(rng, (height, width)))
    shape = tf.image.extract_jpeg_shape(jpeg)
    for h, w in ((8, 8), (17, 40), (33, 17), (63, 63), (40, 64)):
      for y, x in ((0, 0), (height - h, width - w), (1, 3)):
        window = tf.constant([y, x, h, w])
        image = transforms.decode_window(jpeg, window, shape, config)
        r = max(s for s in transforms.SCALES if min(h, w) >= s * 8)
        got = image.shape[:2]
        assert abs(got[0] - h / r) <= 1 and abs(got[1] - w / r) <= 1, (
          (height, width),
          (y, x, h, w),
          got,
        )
        assert min(got) >= 8  # never below the output size


def test_train_stream_with_scaled_decoding_is_reproducible(jpegs):
  config = tiny_config('unused')
  config.data.update(image_size=64, jpeg_scaled_decode=True)

  def stream():
    ds = tf.data.Dataset.from_tensor_slices({'image': jpegs, 'label': [0] * 24})
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=3).batch(2))
    ds = ds.map(
      lambda ex, seed: transforms.preprocess(
        ex, seed, train=True, jpeg=True, config=config
      )[0],
      num_parallel_calls=4,
      deterministic=True,
    )
    return np.stack(list(ds.as_numpy_iterator()))

  first = stream()
  np.testing.assert_array_equal(first, stream())
  assert len({a.tobytes() for a in first}) == NUM_PHOTOS
