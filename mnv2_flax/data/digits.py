"""scikit-learn's handwritten digits as the tfds dataset `sklearn_digits`.

The 1,797 8x8 scans of UCI's "Optical Recognition of Handwritten Digits"
test set (43 writers, pixels 0..16), which scikit-learn ships: a small real
task for fine-tuning on a machine without internet. Pixels are scaled to
0..255; the split is fixed: 50 images of each digit for `test` (500), the
other 1,297 for `train`.

  python train.py --config=configs/finetune_digits.py --workdir=...
"""

import numpy as np
import tensorflow_datasets as tfds

TEST_PER_CLASS = 50


def read() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train' | 'test': (uint8 images (N, 8, 8), int labels (N,))}."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(0).permutation(len(labels))
  test = np.zeros(len(labels), bool)
  for digit in range(10):
    test[order[labels[order] == digit][:TEST_PER_CLASS]] = True
  return {
    'train': (images[~test], labels[~test]),
    'test': (images[test], labels[test]),
  }


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (UCI optdigits test set)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Fixed split: 50 test images per digit.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(8, 8, 1)),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # scikit-learn ships the data
    splits = read()
    return {
      name: self._generate_examples(*data) for name, data in splits.items()
    }

  def _generate_examples(self, images, labels):
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield index, {'image': image[..., None], 'label': int(label)}
