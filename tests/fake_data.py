"""Small Fashion-MNIST-format data that the tests write themselves."""

import gzip
import os

import numpy as np

from mnv2_flax import fashion_mnist

NUM_TRAIN, NUM_TEST = 40, 23


def write_idx(directory, split, images, labels):
  """Writes gzipped idx files as Fashion-MNIST distributes them."""
  os.makedirs(directory, exist_ok=True)
  n = len(images)
  with gzip.open(
    os.path.join(directory, fashion_mnist.FILES[f'{split}_images']), 'wb'
  ) as f:
    f.write(np.array([2051, n, 28, 28], '>u4').tobytes() + images.tobytes())
  with gzip.open(
    os.path.join(directory, fashion_mnist.FILES[f'{split}_labels']), 'wb'
  ) as f:
    f.write(np.array([2049, n], '>u4').tobytes() + labels.tobytes())


def make_idx_dir(directory):
  """Train: random textures. Test: image i is the constant i (its id)."""
  rng = np.random.default_rng(0)
  write_idx(
    directory,
    'train',
    rng.integers(0, 256, (NUM_TRAIN, 28, 28), dtype=np.uint8),
    rng.integers(0, 10, NUM_TRAIN, dtype=np.uint8),
  )
  write_idx(
    directory,
    'test',
    np.repeat(np.arange(NUM_TEST, dtype=np.uint8), 28 * 28).reshape(
      NUM_TEST, 28, 28
    ),
    (np.arange(NUM_TEST) % 10).astype(np.uint8),
  )
  return directory
