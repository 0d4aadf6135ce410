"""tensorflow-datasets builders, prepared once in `config.data.data_dir`.

Fashion-MNIST is prepared from local idx files and scikit-learn's digits from
the copy scikit-learn ships; any other registered tfds dataset is prepared
only with `config.data.download=True` (ImageNet from its tars in
`downloads/manual/`). A process that finds another preparing the same
dataset waits for it; a failed preparation leaves no empty directory.
"""

import contextlib
import dataclasses
import os

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax.data import digits  # registers the tfds dataset sklearn_digits
from mnv2_flax.data import fashion_mnist
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
  """The tfds builder of `config.data.name`, prepared in the data_dir.

  Fashion-MNIST is prepared from local idx files on first use; other datasets
  are prepared only with `config.data.download=True`.

  Raises:
    DataError: unknown dataset, or data that is not there (with what to do).
  """
  defaults.check_data(config)
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
  # collide (tfds renames its incomplete directory into place).
  created = not os.path.isdir(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  try:
    with workdir_lock.hold(
      data_dir, 'dataset directory', wait=True, file=f'.{name}.lock'
    ):
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
  if name.startswith('imagenet2012') and not os.path.exists(
    os.path.join(manual_dir, 'ILSVRC2012_img_train.tar')
  ):
    raise DataError(
      f'{name} is not prepared in {data_dir}. '
      + IMAGENET_HOW_TO.format(manual_dir=manual_dir, data_dir=data_dir)
    )
  if not config.data.download and not name.startswith('imagenet2012'):
    raise DataError(
      f'{name} is not prepared in {data_dir}. Set config.data.download=True '
      'on a machine with internet access to download and prepare it once, '
      'or point config.data.data_dir to where it is prepared.'
    )
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
  except Exception as e:  # network errors come in many types
    raise DataError(
      f'{name} could not be downloaded and prepared in {data_dir} '
      f'({type(e).__name__}: {str(e)[:200]}). Without internet access, '
      'provide the files locally (see README: Data).'
    ) from None
  return builder


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
