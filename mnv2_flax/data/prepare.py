"""tensorflow-datasets builders, prepared once in `config.data.data_dir`.

Fashion-MNIST is prepared from local idx files and scikit-learn's digits from
the copy scikit-learn ships; any other registered tfds dataset is prepared
only with `config.data.download=True` (ImageNet from its tars in
`downloads/manual/`, whose structure `imagenet_tars` checks first). A
process that finds another preparing the same dataset waits for it; a failed
preparation leaves no directory it made.
"""

import contextlib
import dataclasses
import os
import re
import shutil

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax.data import digits  # registers the tfds dataset sklearn_digits
from mnv2_flax.data import fashion_mnist
from mnv2_flax.data import imagenet_tars
from mnv2_flax.data import resized
from mnv2_flax.runtime import workdir_lock

# TensorFlow only prepares and feeds the data: keep it off the accelerators.
tf.config.set_visible_devices([], 'GPU')

IMAGENET_HOW_TO = (
  'ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar '
  'and ILSVRC2012_img_val.tar in {manual_dir} (or set config.data.manual_dir '
  'to their directory) and run again; they are prepared once into '
  '{data_dir}.'
)


class DataError(ValueError):
  """The configured data cannot be read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What the rest of the code needs to know about a dataset."""

  num_classes: int
  num_train_examples: int
  num_eval_examples: int


def _data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.data.data_dir or '~/tensorflow_datasets')


def get_builder(config: ml_collections.ConfigDict):
  """The tfds builder of `config.data.name`, prepared in the data_dir, or of
  its copy at `config.data.resized_short_side` (`resized`), prepared from it.

  Fashion-MNIST is prepared from local idx files on first use; other datasets
  are prepared only with `config.data.download=True`.

  Raises:
    DataError: unknown dataset, or data that is not there (with what to do).
  """
  defaults.check_data(config)
  builder = _source_builder(config)
  if not config.data.resized_short_side:
    return builder
  return resized.get_builder(builder, config, _data_dir(config))


def _source_builder(config: ml_collections.ConfigDict):
  name, data_dir = config.data.name, _data_dir(config)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
      f'config.data.name={name!r} is not a tfds dataset; use a registered '
      'image-classification dataset such as fashion_mnist, cifar10, '
      'imagenette or imagenet2012.'
    ) from None
  if _is_prepared(builder):
    return builder
  if '://' in data_dir:  # a bucket: no file locks there
    return _prepare(builder, config)
  # One process prepares, the others wait for it: two preparing at once
  # collide (tfds renames its incomplete directory into place). One lock per
  # dataset, whatever its config or version ('imagenet2012_subset/1pct'):
  # they share tfds's download directory, and the lock is one file.
  created = not os.path.isdir(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  lock = f'.{re.split(r"[/:]", name)[0]}.lock'
  try:
    with workdir_lock.hold(data_dir, 'dataset directory', wait=True, file=lock):
      builder = tfds.builder(name, data_dir=data_dir)
      if _is_prepared(builder):  # by the process this one waited for
        return builder
      return _prepare(builder, config)
  except BaseException:
    if created:  # nothing prepared: no empty directory left behind
      with contextlib.suppress(OSError):
        os.rmdir(data_dir)
    raise


def _prepare(builder, config: ml_collections.ConfigDict):
  """Prepares `builder`'s dataset if it can (see `get_builder`)."""
  name, data_dir = config.data.name, _data_dir(config)
  manual_dir = config.data.manual_dir or os.path.join(
    data_dir, 'downloads', 'manual'
  )
  if name == 'fashion_mnist':
    try:
      fashion_mnist.prepare(data_dir, config.data.manual_dir)
      return tfds.builder(name, data_dir=data_dir)
    except fashion_mnist.IdxError as e:
      if not config.data.download:  # else: tfds' own download below
        raise DataError(
          f'fashion_mnist is not prepared in {data_dir} and cannot be: {e} '
          "Install Debian's dataset-fashion-mnist (`make data`), set "
          'config.data.manual_dir to the four idx files, or set '
          'config.data.download=True on a machine with internet access.'
        ) from None
  if name == digits.SklearnDigits.name:  # scikit-learn ships the data
    builder.download_and_prepare()
    return builder
  if name.startswith('imagenet2012'):
    return _prepare_imagenet(builder, config, manual_dir)
  if not config.data.download:
    raise DataError(
      f'{name} is not prepared in {data_dir}. Set config.data.download=True '
      'on a machine with internet access to download and prepare it once, '
      'or point config.data.data_dir to where it is prepared.'
    )
  try:
    _download_and_prepare(builder, data_dir, manual_dir)
  except Exception as e:  # network errors come in many types
    raise DataError(
      f'{name} could not be downloaded and prepared in {data_dir} '
      f'({type(e).__name__}: {str(e)[:200]}). Without internet access, '
      'provide the files locally (see README: Data).'
    ) from None
  return builder


def _download_and_prepare(builder, data_dir: str, manual_dir: str) -> None:
  """`builder.download_and_prepare`; a failure leaves nothing it made: no
  incomplete directory, no directory that was not there before."""
  made = [d for d in _tfds_dirs(builder, data_dir) if not os.path.exists(d)]
  before = set(_incomplete(builder))
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except BaseException:
    if '://' not in data_dir:
      _remove_unfinished(builder, made, before)
    raise


def _tfds_dirs(builder, data_dir: str) -> list[str]:
  """The directories tfds makes in `data_dir` to prepare `builder`, deepest
  first: the dataset's (and its config's) above the version directory, and
  the download directory."""
  top, dirs = os.path.abspath(data_dir), []
  path = os.path.dirname(os.path.abspath(os.fspath(builder.data_dir)))
  while path != top and path.startswith(top + os.sep):
    dirs.append(path)
    path = os.path.dirname(path)
  downloads = os.path.join(top, 'downloads')
  return dirs + [os.path.join(downloads, 'extracted'), downloads]


def _incomplete(builder) -> list[str]:
  """tfds's incomplete directories of `builder`'s version
  (`incomplete.<hex>.<version>` beside the version directory)."""
  parent = os.path.dirname(os.path.abspath(os.fspath(builder.data_dir)))
  pattern = re.compile(
    rf'incomplete\.[0-9a-f]+\.{re.escape(str(builder.version))}'
  )
  try:
    entries = os.listdir(parent)
  except OSError:
    return []
  return [os.path.join(parent, e) for e in entries if pattern.fullmatch(e)]


def _remove_unfinished(builder, made: list[str], before: set[str]) -> None:
  """Removes the incomplete directories of `builder`'s version that this
  preparation made (tfds removes them itself unless killed; one there
  before it is left), then the directories of `made` that are empty: never
  a prepared version, another config's or a user's file."""
  for path in set(_incomplete(builder)) - before:
    shutil.rmtree(path, ignore_errors=True)
  for directory in made:
    with contextlib.suppress(OSError):
      os.rmdir(directory)


def _prepare_imagenet(
  builder, config: ml_collections.ConfigDict, manual_dir: str
):
  """Prepares an imagenet2012 dataset from ImageNet's tars in `manual_dir`.

  Their structure is checked first (the headers of the outer tars only:
  seconds, even for ImageNet's 150 GB), so that a damaged or wrong tar is
  named before hours of preparation; a failure of the preparation itself is
  traced to the damaged synset tar where there is one. Nothing
  half-prepared is left behind.
  """
  name, data_dir = config.data.name, _data_dir(config)
  train = os.path.join(manual_dir, imagenet_tars.TRAIN_TAR)
  val = os.path.join(manual_dir, imagenet_tars.VAL_TAR)
  needed = [train] + ([val] if _reads_validation(config) else [])
  missing = [os.path.basename(p) for p in needed if not os.path.exists(p)]
  if missing:
    raise DataError(
      f'{name} is not prepared in {data_dir} and {manual_dir} has no '
      f'{" or ".join(missing)}. '
      + IMAGENET_HOW_TO.format(manual_dir=manual_dir, data_dir=data_dir)
    )
  try:
    imagenet_tars.check_train(train)  # there: checked just above
    if os.path.exists(val):
      imagenet_tars.check_val(val)
  except imagenet_tars.TarError as e:
    raise DataError(str(e)) from None
  try:
    _download_and_prepare(builder, data_dir, manual_dir)
  except OSError:  # the disk (full, not writable), not the tars: as it is
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _tars_error(e, name, data_dir, manual_dir, train) from None
  return builder


def _tars_error(e, name, data_dir, manual_dir, train) -> DataError:
  """The error of a preparation from the tars that failed with `e`: the
  damaged synset tar if there is one."""
  damaged = None
  with contextlib.suppress(Exception):
    damaged = imagenet_tars.damaged_synset_tar(train)
  if damaged:
    return DataError(damaged)
  return DataError(
    f'{name} could not be prepared in {data_dir} from the tars in '
    f'{manual_dir} ({type(e).__name__}: {" ".join(str(e).split())[:300]}). '
    'Their tar structure is complete, so a file inside them may be '
    "damaged: compare their sha256 with tfds's imagenet2012/checksums.tsv "
    'or copy them again.'
  )


def _reads_validation(config: ml_collections.ConfigDict) -> bool:
  data = config.data
  return any(
    'validation' in split
    for split in (data.train_split, data.eval_split, data.minival_split)
  )


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json'))


def check_split(builder, split: str, field: str) -> None:
  base = split.split('[')[0]
  if base not in builder.info.splits:
    raise DataError(
      f'{field}={split!r}: {builder.info.name} has no split '
      f'{base!r}; it has {sorted(builder.info.splits)}.'
    )


def _example_ranges(builder, split: str) -> list[tuple[str, int, int]]:
  """(split name, first, end) of the examples a split expression reads."""
  splits = builder.info.splits
  instruction = tfds.core.ReadInstruction.from_spec(split)
  return [
    (
      a.splitname,
      a.from_ or 0,
      splits[a.splitname].num_examples if a.to is None else a.to,
    )
    for a in instruction.to_absolute(splits)
  ]


def _check_minival(builder, config: ml_collections.ConfigDict) -> None:
  """The minival split exists, holds examples and shares none with
  train_split (it is there to choose on data never trained on)."""
  minival, train = config.data.minival_split, config.data.train_split
  check_split(builder, minival, 'config.data.minival_split')
  held = _example_ranges(builder, minival)
  if not any(end > first for _, first, end in held):
    raise DataError(f'config.data.minival_split={minival!r} holds no examples.')
  for name, first, end in held:
    for other, t_first, t_end in _example_ranges(builder, train):
      shared = min(end, t_end) - max(first, t_first)
      if other == name and shared > 0:
        raise DataError(
          f'config.data.minival_split={minival!r} shares {shared} examples '
          f'with config.data.train_split={train!r}; they must be disjoint '
          f"(e.g. train_split='{name}[:90%]', minival_split='{name}[90%:]')."
        )


def dataset_meta(builder, config: ml_collections.ConfigDict) -> DatasetMeta:
  """Classes and example counts, from the dataset's info."""
  check_split(builder, config.data.train_split, 'config.data.train_split')
  check_split(builder, config.data.eval_split, 'config.data.eval_split')
  if config.data.minival_split:
    _check_minival(builder, config)
  return DatasetMeta(
    num_classes=builder.info.features['label'].num_classes,
    num_train_examples=builder.info.splits[
      config.data.train_split
    ].num_examples,
    num_eval_examples=builder.info.splits[config.data.eval_split].num_examples,
  )
