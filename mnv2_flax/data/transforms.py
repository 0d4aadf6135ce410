"""Per-example transforms (TensorFlow, on the host): Inception-style random
resized crop and flip for training, a central crop for evaluation, then a
bilinear resize to `config.data.image_size`, rounded to uint8 and given 3
channels. JPEGs decode only their crop window, and with
`config.data.jpeg_scaled_decode` at 1/2, 1/4 or 1/8 scale where the window
is that many times the output size on both sides (libjpeg's scaled inverse
DCT: what decoding costs at low resolution; docs/input_pipeline.md).
"""

import ml_collections
import tensorflow as tf


def decode_and_random_crop(data, shape, seed, config):
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
    return decode_window(data[0], window, shape, config)
  # crop_to_bounding_box's pixels without its checks (a tenth of the
  # per-image cost at 96 px from a resized copy): the box is inside.
  return tf.ensure_shape(
    tf.slice(data, begin, size), (None, None) + data.shape[-1:]
  )


SCALES = (1, 2, 4, 8)  # the reductions libjpeg's scaled decoding has


def decode_window(jpeg, window, shape, config):
  """The (y, x, height, width) `window` of `jpeg`, decoded: with
  `config.data.jpeg_scaled_decode` at the smallest scale that keeps it at
  least `config.data.image_size` on both sides (`scaled_decode`)."""
  if not config.data.jpeg_scaled_decode:
    return tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return scaled_decode(jpeg, window, shape, config.data.image_size)


def scaled_decode(jpeg, window, shape, size):
  """The `window` of `jpeg` decoded at the largest 1/r of `SCALES` at which
  both its sides stay at least `size`.

  The window's ends in the 1/r image (ceil(H/r) x ceil(W/r)) are its ends
  over r rounded to the nearest pixel: at most half a pixel of the 1/r
  image off, under half an output pixel.
  """
  y, x, height, width = tf.unstack(window)
  smaller = tf.minimum(height, width)
  index = tf.add_n([tf.cast(smaller >= r * size, tf.int32) for r in SCALES[1:]])

  def at(r):
    def decode():
      if r == 1:
        return tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
      top, left = (y + r // 2) // r, (x + r // 2) // r
      bottom = tf.minimum((y + height + r // 2) // r, (shape[0] + r - 1) // r)
      right = tf.minimum((x + width + r // 2) // r, (shape[1] + r - 1) // r)
      scaled = tf.stack([top, left, bottom - top, right - left])
      return tf.image.decode_and_crop_jpeg(jpeg, scaled, channels=3, ratio=r)

    return decode

  return tf.switch_case(index, [at(r) for r in SCALES])


def central_crop(data, shape, fraction, config):
  height, width = shape[0], shape[1]
  side = tf.cast(
    fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32
  )
  offset_y, offset_x = (height - side + 1) // 2, (width - side + 1) // 2
  if isinstance(data, tuple):
    window = tf.stack([offset_y, offset_x, side, side])
    return decode_window(data[0], window, shape, config)
  return tf.image.crop_to_bounding_box(data, offset_y, offset_x, side, side)


def finish(image: tf.Tensor, config: ml_collections.ConfigDict):
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


def preprocess(example, seed, *, train, jpeg, config):
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
    image = decode_and_random_crop(data, shape, crop_seed, config)
    if config.data.random_flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  else:
    image = central_crop(data, shape, config.data.eval_crop_fraction, config)
  return finish(image, config), tf.cast(example['label'], tf.int32)


def augments_per_batch(builder, config, jpeg: bool) -> bool:
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


def preprocess_batch(examples, seeds, *, config):
  """`preprocess` (train) of a batch of same-size images, crop-free.

  The flip of each example is the low bit of its first seed (uniform: the
  seeds are Philox outputs).
  """
  image = examples['image']
  if config.data.random_flip:
    flip = tf.equal(tf.bitwise.bitwise_and(seeds[:, 0], 1), 1)
    image = tf.where(flip[:, None, None, None], tf.reverse(image, [2]), image)
  return {
    'image': finish(image, config),
    'label': tf.cast(examples['label'], tf.int32),
  }
