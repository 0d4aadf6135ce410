"""Photo-like JPEGs of ImageNet's sizes, made from the photos scikit-learn
ships (its two sample images, 427x640): random crops of them, resized to
ImageNet's usual sizes, colour-shifted, mirrored, JPEG-encoded at quality 90.

Photos decode unlike smooth synthetic images or noise (entropy decoding is
most of a JPEG's decode time, and it depends on the content), so the input
pipeline is measured on these.
"""

import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# ImageNet's commonest sizes (height, width): most train images are about
# 500 px on the long side.
SIZES = ((375, 500), (333, 500), (500, 375), (500, 333), (400, 500))


@functools.cache
def _sources() -> tuple[np.ndarray, ...]:
  from sklearn.datasets import load_sample_images  # noqa: PLC0415

  return tuple(load_sample_images().images)


def photo(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
  """One uint8 (height, width, 3) image of `size`."""
  source = _sources()[rng.integers(len(_sources()))]
  height, width = source.shape[:2]
  crop_h = int(height * rng.uniform(0.6, 1.0))
  crop_w = min(width, int(crop_h * size[1] / size[0] * rng.uniform(0.9, 1.1)))
  top = rng.integers(height - crop_h + 1)
  left = rng.integers(width - crop_w + 1)
  image = source[top : top + crop_h, left : left + crop_w].astype(np.float32)
  image = tf.image.resize(image, size, antialias=True).numpy()
  image = image * rng.uniform(0.75, 1.25, 3) + rng.uniform(-20, 20, 3)
  if rng.integers(2):
    image = image[:, ::-1]
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def jpegs(count: int, seed: int = 0, sizes=SIZES) -> list[bytes]:
  """`count` JPEG-encoded photos (quality 90, 4:2:0 chroma), sizes cycled."""
  rng = np.random.default_rng(seed)
  return [
    tf.io.encode_jpeg(photo(rng, sizes[i % len(sizes)]), quality=90).numpy()
    for i in range(count)
  ]


def write_dataset(
  data_dir: str,
  name: str = 'photos',
  num_train: int = 256,
  num_eval: int = 64,
  num_classes: int = 10,
  shard_size: int = 128,
) -> str:
  """A tfds dataset `name` of `jpegs` (labels cycled) in `data_dir`, with
  splits train and validation, as ImageNet's builder stores it (JPEG bytes,
  several shards); returns its directory. Read it with
  `tfds.builder(name, data_dir=data_dir)`."""
  path = os.path.join(data_dir, name, '1.0.0')
  if os.path.exists(os.path.join(path, 'dataset_info.json')):
    return path
  os.makedirs(path, exist_ok=True)
  features = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(encoding_format='jpeg'),
      'label': tfds.features.ClassLabel(num_classes=num_classes),
    }
  )
  infos = []
  for seed, (split, count) in enumerate(
    (('train', num_train), ('validation', num_eval))
  ):
    images = jpegs(count, seed=seed)
    shards = [images[i : i + shard_size] for i in range(0, count, shard_size)]
    for k, shard in enumerate(shards):
      file = f'{name}-{split}.tfrecord-{k:05d}-of-{len(shards):05d}'
      with tf.io.TFRecordWriter(os.path.join(path, file)) as writer:
        for i, image in enumerate(shard):
          label = (k * shard_size + i) % num_classes
          writer.write(
            features.serialize_example({'image': image, 'label': label})
          )
    infos.append(
      tfds.core.SplitInfo(
        name=split, shard_lengths=[len(s) for s in shards], num_bytes=0
      )
    )
  tfds.folder_dataset.write_metadata(
    data_dir=path, features=features, split_infos=infos, check_data=False
  )
  return path
