"""Per-example transforms (TensorFlow, on the host): Inception-style random
resized crop and flip for training, a central crop for evaluation, then a
bilinear resize to `config.data.image_size`, rounded to uint8 and given 3
channels. JPEGs decode only their crop window.
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
    return tf.image.decode_and_crop_jpeg(data[0], window, channels=3)
  return tf.image.crop_to_bounding_box(data, offset_y, offset_x, height, width)


def central_crop(data, shape, fraction):
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
    image = central_crop(data, shape, config.data.eval_crop_fraction)
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
