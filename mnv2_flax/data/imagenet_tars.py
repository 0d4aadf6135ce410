"""ImageNet's tars, checked before tfds prepares them: a damaged, truncated
or wrong `ILSVRC2012_img_train.tar` or `ILSVRC2012_img_val.tar` is named,
with what is wrong with it, in seconds rather than after hours of
preparation (only the outer tars' headers are read; tarfile seeks over the
data). `damaged_synset_tar` finds the damaged synset tar inside a train tar
whose preparation failed.
"""

import itertools
import os
import re
import tarfile

from absl import logging
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common


class TarError(ValueError):
  """A tar in the manual directory is not ImageNet's; the message says which
  and what is wrong."""


# ImageNet's tars and their sizes (tfds's imagenet2012/checksums.tsv).
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
_IMAGENET_BYTES = {
  TRAIN_TAR: 147_897_477_120,
  VAL_TAR: 6_744_924_160,
}
VAL_IMAGES = 50_000
_SYNSET_TAR = re.compile(r'n\d{8}\.tar')
_VAL_IMAGE = re.compile(r'ILSVRC2012_val_(\d{8})\.JPEG')


class _Damaged(Exception):
  """What is wrong with a tar archive, in words that follow its name."""


def _copy_again(path: str) -> str:
  base = os.path.basename(path)
  return (
    f"ImageNet's {base} is {_IMAGENET_BYTES[base]:,} bytes; copy it again "
    'and run again.'
  )


def _tar_members(fileobj) -> list[tarfile.TarInfo]:
  """The members of the uncompressed tar `fileobj`, read from its headers
  (tarfile seeks over the data), checked to end in an end-of-archive block.

  Raises:
    _Damaged: not a tar, truncated, or a damaged header.
  """
  size = fileobj.seek(0, os.SEEK_END)
  fileobj.seek(0)
  start = fileobj.read(2)
  fileobj.seek(0)
  try:
    tar = tarfile.open(fileobj=fileobj, mode='r:')
  except tarfile.ReadError as e:
    reason = (
      'it is empty'
      if not size
      else 'it is gzip-compressed'
      if start == b'\x1f\x8b'
      else f'its first header is not a tar header: {e}'
    )
    raise _Damaged(f'is not a tar archive ({reason})') from None
  members = []
  try:
    for member in tar:
      members.append(member)
  except tarfile.ReadError:
    pass  # found below, with where
  last = members[-1] if members else None
  if last is not None and size < last.offset_data + last.size:
    raise _Damaged(
      f'is truncated: it ends at byte {size:,} inside member {last.name!r} '
      f'(whose data ends at byte {last.offset_data + last.size:,})'
    )
  fileobj.seek(tar.offset)
  block = fileobj.read(tarfile.BLOCKSIZE)
  after = f'after member {last.name!r}' if last else 'at its start'
  if len(block) < tarfile.BLOCKSIZE:
    raise _Damaged(
      f'is truncated: it ends at byte {size:,}, {after}, where the next '
      'member or the end of the archive should be'
    )
  if block.strip(b'\0'):
    raise _Damaged(
      f'is damaged at byte {tar.offset:,}: {after} comes no valid tar header'
    )
  return members


def check_train(path: str) -> None:
  """ILSVRC2012_img_train.tar is a complete tar of nXXXXXXXX.tar, one per
  ImageNet synset (tfds labels each image by its synset tar's name)."""
  with open(imagenet_common.label_names_file()) as f:
    synsets = set(f.read().split())
  with open(path, 'rb') as f:
    try:
      members = _tar_members(f)
    except _Damaged as e:
      raise TarError(f'{path} {e}; {_copy_again(path)}') from None
  if not members:
    raise TarError(
      f"{path} holds no members; ImageNet's {TRAIN_TAR} holds a "
      'tar per synset (n01440764.tar, ...). Put that file there.'
    )
  for member in members:
    if not (member.isreg() and _SYNSET_TAR.fullmatch(member.name)):
      raise TarError(
        f'{path}: member {member.name!r} is not a per-synset tar '
        f"nXXXXXXXX.tar; ImageNet's {TRAIN_TAR} holds only those "
        '(n01440764.tar, ...). Put that file there.'
      )
    if member.name[:-4] not in synsets:
      raise TarError(
        f'{path}: member {member.name!r} is not the tar of one of '
        "ImageNet's 1,000 synsets (tfds's imagenet2012/labels.txt). Put "
        f"ImageNet's {TRAIN_TAR} there."
      )
  if len(members) < len(synsets):  # a subset: it prepares, but say so
    logging.warning(
      '%s holds %d of the %d synset tars: the train split has only their '
      'images, and top-1 is not comparable with ImageNet results.',
      path,
      len(members),
      len(synsets),
    )


def check_val(path: str) -> None:
  """ILSVRC2012_img_val.tar is a complete tar of ILSVRC2012_val_00000001.JPEG
  onwards, without gaps: tfds gives the validation labels by position in
  the sorted names, so one missing image would shift every label after it."""
  with open(path, 'rb') as f:
    try:
      members = _tar_members(f)
    except _Damaged as e:
      raise TarError(f'{path} {e}; {_copy_again(path)}') from None
  indices = []
  for member in members:
    match = _VAL_IMAGE.fullmatch(member.name)
    if not (member.isreg() and match):
      raise TarError(
        f'{path}: member {member.name!r} is not a validation image '
        f"ILSVRC2012_val_NNNNNNNN.JPEG; ImageNet's {VAL_TAR} holds "
        'only those. Put that file there.'
      )
    indices.append(int(match.group(1)))
  indices.sort()
  twice = next((i for i, j in itertools.pairwise(indices) if i == j), None)
  if twice:
    raise TarError(
      f"{path} holds ILSVRC2012_val_{twice:08d}.JPEG twice. Put ImageNet's "
      f'{VAL_TAR} there.'
    )
  first = next(
    (i for i, j in enumerate(indices, 1) if i != j), None if indices else 1
  )
  if first:
    raise TarError(
      f'{path} holds {len(indices):,} validation images but not '
      f'ILSVRC2012_val_{first:08d}.JPEG: tfds labels '
      'them by their position among the sorted names, so the images after '
      f"it would get wrong labels. Put ImageNet's {VAL_TAR} "
      f'({VAL_IMAGES:,} images) there.'
    )
  if len(indices) > VAL_IMAGES:
    raise TarError(
      f'{path} holds {len(indices):,} validation images; ImageNet has '
      f"{VAL_IMAGES:,} (tfds labels only those). Put ImageNet's "
      f'{VAL_TAR} there.'
    )
  if len(indices) < VAL_IMAGES:  # a cut at an image's end: labels hold
    logging.warning(
      '%s holds %s of the %s validation images (the first ones): '
      'evaluation on the validation split uses only these.',
      path,
      f'{len(indices):,}',
      f'{VAL_IMAGES:,}',
    )


def damaged_synset_tar(path: str) -> str | None:
  """Which synset tar inside the train tar `path` is damaged, and how, as
  an error message; None if all are complete tars. Reads every header of
  every synset tar: for a failed preparation only."""
  with open(path, 'rb') as f, tarfile.open(fileobj=f, mode='r:') as outer:
    for member in filter(tarfile.TarInfo.isreg, outer):
      try:
        _tar_members(outer.extractfile(member))
      except _Damaged as e:
        return (
          f'{path}: its synset tar {member.name!r} {e}. The outer tar is '
          "complete, so its content is damaged: compare the file's sha256 "
          "with tfds's imagenet2012/checksums.tsv, copy it again and run "
          'again.'
        )
  return None
