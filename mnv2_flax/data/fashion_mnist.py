"""Fashion-MNIST prepared offline as the ordinary tfds `fashion_mnist` dataset.

tfds' own builder downloads the four idx files; this one reads them from a
local directory (by default where Debian's `dataset-fashion-mnist` package
installs them) and writes the same dataset (name, version, features) into a
tfds `data_dir`. Afterwards `tfds.builder('fashion_mnist', data_dir=...)`
reads it like any other prepared dataset, and no network is touched.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FILES = {
  'train_images': 'train-images-idx3-ubyte.gz',
  'train_labels': 'train-labels-idx1-ubyte.gz',
  'test_images': 't10k-images-idx3-ubyte.gz',
  'test_labels': 't10k-labels-idx1-ubyte.gz',
}
_MAGIC = {3: 2051, 1: 2049}  # idx magic numbers: uint8 images, uint8 labels

HOW_TO_GET = (
  'Install the Debian package (apt-get install dataset-fashion-mnist, which '
  f'puts the four files in {DEBIAN_DIR}) or set config.data.manual_dir to '
  'a directory holding ' + ', '.join(FILES.values()) + '.'
)


class IdxError(ValueError):
  """An idx file that is missing, truncated or not what it should be."""


def read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads a gzipped idx file of uint8 data with `ndim` dimensions.

  Args:
    path: the `.gz` file.
    ndim: 3 for images (N, 28, 28), 1 for labels (N,).

  Returns:
    The uint8 array.

  Raises:
    IdxError: the file is absent, not gzip, has the wrong header, or holds
      fewer or more bytes than its header announces.
  """
  if not os.path.exists(path):
    raise IdxError(f'{path} does not exist. {HOW_TO_GET}')
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise IdxError(
      f'{path} is not a complete gzip file ({e}). {HOW_TO_GET}'
    ) from None
  header = 4 * (1 + ndim)
  if len(data) < header:
    raise IdxError(
      f'{path} is truncated: {len(data)} bytes, shorter than '
      f'its {header}-byte idx header.'
    )
  magic, *dims = np.frombuffer(data[:header], dtype='>u4').tolist()
  if magic != _MAGIC[ndim]:
    raise IdxError(
      f'{path} has idx magic number {magic}, expected '
      f'{_MAGIC[ndim]} (uint8, {ndim} dimension(s)): it is '
      'not the right file.'
    )
  expected = int(np.prod(dims))
  if len(data) - header != expected:
    raise IdxError(
      f'{path} holds {len(data) - header} data bytes, but its '
      f'header announces shape {tuple(dims)} ({expected} '
      'bytes): the file is truncated or corrupt.'
    )
  return np.frombuffer(data[header:], dtype=np.uint8).reshape(dims)


def read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks the images (N, 28, 28) and labels (N,) of a split."""
  images = read_idx(os.path.join(directory, FILES[f'{split}_images']), 3)
  labels = read_idx(os.path.join(directory, FILES[f'{split}_labels']), 1)
  if images.shape[1:] != (28, 28):
    raise IdxError(
      f'{FILES[f"{split}_images"]} holds images of shape '
      f'{images.shape[1:]}, expected (28, 28).'
    )
  if len(images) != len(labels):
    raise IdxError(
      f'{split}: {len(images)} images but {len(labels)} labels in {directory}.'
    )
  if labels.max(initial=0) > 9:
    raise IdxError(
      f'{FILES[f"{split}_labels"]} holds label {labels.max()}, expected 0..9.'
    )
  return images, labels


class FashionMnistFromIdx(
  tfds.image_classification.FashionMNIST, skip_registration=True
):
  """tfds' `fashion_mnist`, generated from local idx files."""

  name = 'fashion_mnist'  # the registered dataset it writes, not a new one

  def __init__(self, *, idx_dir: str, **kwargs):
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return [
      tfds.core.SplitGenerator(name=split, gen_kwargs=dict(split=split))
      for split in ('train', 'test')
    ]

  def _generate_examples(self, split):  # pytype: disable=signature-mismatch
    images, labels = read_split(self._idx_dir, split)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield index, {'image': image[..., None], 'label': int(label)}


def prepare(data_dir: str, idx_dir: str | None = None) -> None:
  """Writes `fashion_mnist` into `data_dir` from the idx files in `idx_dir`.

  All four files are checked before anything is written, so a bad file
  leaves `data_dir` as it was.
  """
  idx_dir = idx_dir or DEBIAN_DIR
  if not os.path.isdir(idx_dir):
    raise IdxError(
      f'Fashion-MNIST idx directory {idx_dir} does not exist. {HOW_TO_GET}'
    )
  for split in ('train', 'test'):
    read_split(idx_dir, split)
  builder = FashionMnistFromIdx(idx_dir=idx_dir, data_dir=data_dir)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=idx_dir, try_download_gcs=False
    )
  )
