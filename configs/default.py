"""MobileNetV2 on ImageNet at width 1.0, resolution 224 (TF-slim's setup).

  python -m mnv2_flax.input_pipeline --config=configs/default.py --benchmark

The data and model sections; ImageNet needs ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in `<data_dir>/downloads/manual` (or
`config.data.manual_dir`), prepared once by tfds.
"""

import ml_collections


def get_config(arg=None):
  """Returns the default config."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.width_multiplier = 1.0  # the single source of width
  config.model.dropout_rate = 0.2
  config.model.bn_momentum = 0.997  # TF-slim's BN decay
  config.model.bn_epsilon = 1e-3
  config.model.padding = 'tf'  # 'tf' (SAME) or 'torch' (symmetric)
  config.model.init_scheme = 'tf_slim'
  config.model.bottleneck_activation = 'linear'  # Fig. 6a: or 'relu6'
  config.model.shortcut = 'bottleneck'  # Fig. 6b: 'expansion', 'none'
  config.model.expand_ratio = 6.0  # t of the bottleneck rows

  config.data = ml_collections.ConfigDict()
  config.data.name = 'imagenet2012'  # any tfds image-classification dataset
  config.data.data_dir = None  # tfds data_dir; None: ~/tensorflow_datasets
  config.data.manual_dir = None  # None: <data_dir>/downloads/manual
  config.data.download = False  # allow tfds to download (needs internet)
  config.data.image_size = 224  # the single source of resolution
  config.data.batch_size = 1024  # global, over all processes and devices
  config.data.eval_batch_size = 1024
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  # Inception crop; TF-slim: area (0.05, 1), torchvision: (0.08, 1) with
  # min_object_covered 0.
  config.data.crop_area_range = (0.05, 1.0)
  config.data.crop_aspect_range = (3 / 4, 4 / 3)
  config.data.crop_min_object_covered = 0.1
  config.data.eval_crop_fraction = 0.875
  config.data.normalization = 'inception'  # [-1, 1]; 'imagenet': mean/std
  config.data.shuffle_buffer = 16_384
  config.data.cache = False  # keep decoded examples in memory
  return config
