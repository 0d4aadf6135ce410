"""Small ILSVRC2012 tars as ImageNet distributes them, which the tests write
themselves: the train tar holds one tar per synset of that synset's JPEGs,
the val tar the validation JPEGs, each a crop of one of scikit-learn's two
sample photos (natural content that decodes and resizes like a photo)."""

import dataclasses
import io
import os
import tarfile

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
# Spread over tfds's label list, so that a label index is not its position.
SYNSET_INDICES = (0, 1, 217, 640, 999)


def label_names() -> list[str]:
  """tfds's 1000 synset ids; a label is an index into this list."""
  with open(imagenet_common.label_names_file()) as f:
    return f.read().split()


def validation_labels() -> list[str]:
  """tfds's synset of ILSVRC2012_val_00000001.JPEG, ...002, ... in order."""
  path = os.path.join(
    os.path.dirname(imagenet_common.label_names_file()),
    'validation_labels.txt',
  )
  with open(path) as f:
    return f.read().split()


def val_name(index: int) -> str:
  """ImageNet's file name of validation image `index` (from 1)."""
  return f'ILSVRC2012_val_{index:08d}.JPEG'


def _photo_crops(count: int, seed: int):
  """`count` JPEG crops, 60-120 pixels a side, of the sample photos."""
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  for i in range(count):
    photo = photos[i % len(photos)]
    h, w = rng.integers(60, 121, size=2)
    top = rng.integers(0, photo.shape[0] - h + 1)
    left = rng.integers(0, photo.shape[1] - w + 1)
    out = io.BytesIO()
    Image.fromarray(photo[top : top + h, left : left + w]).save(
      out, 'JPEG', quality=90
    )
    yield out.getvalue()


def _add(tar: tarfile.TarFile, name: str, content: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(content)
  info.mode = 0o644
  tar.addfile(info, io.BytesIO(content))


def tar_bytes(files: dict[str, bytes]) -> bytes:
  """An uncompressed tar of `files` (name: content), in that order."""
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode='w', format=tarfile.GNU_FORMAT) as tar:
    for name, content in files.items():
      _add(tar, name, content)
  return out.getvalue()


@dataclasses.dataclass(frozen=True)
class Tars:
  """What `write_tars` wrote: paths and the synset ids in the train tar."""

  train: str
  val: str
  synsets: tuple[str, ...]
  per_synset: int
  num_val: int


def write_tars(
  directory: str, per_synset: int = 20, num_val: int = 10, seed: int = 0
) -> Tars:
  """ILSVRC2012_img_{train,val}.tar in `directory`, structured as the real
  ones: train holds nXXXXXXXX.tar per synset (of nXXXXXXXX_<k>.JPEG), val
  holds ILSVRC2012_val_00000001.JPEG to the `num_val`th."""
  os.makedirs(directory, exist_ok=True)
  names = label_names()
  synsets = tuple(names[i] for i in SYNSET_INDICES)
  images = _photo_crops(len(synsets) * per_synset + num_val, seed)
  inner = {
    f'{synset}.tar': tar_bytes(
      {f'{synset}_{k}.JPEG': next(images) for k in range(per_synset)}
    )
    for synset in synsets
  }
  train = os.path.join(directory, TRAIN_TAR)
  write_tar(train, inner)
  val = os.path.join(directory, VAL_TAR)
  write_tar(val, {val_name(i): next(images) for i in range(1, num_val + 1)})
  return Tars(train, val, synsets, per_synset, num_val)


def read_tar(path: str) -> dict[str, bytes]:
  """{name: content} of the tar at `path`, in its order."""
  with tarfile.open(path) as tar:
    return {m.name: tar.extractfile(m).read() for m in tar}


def write_tar(path: str, files: dict[str, bytes]) -> None:
  """Replaces the tar at `path` by one of `files` (name: content)."""
  with open(path, 'wb') as f:
    f.write(tar_bytes(files))
