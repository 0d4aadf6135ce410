"""The schema of a run's config: every field, its default and its meaning.

The defaults are TF-slim's ImageNet recipe (`configs/default.py`); recipes in
`configs/` override what differs. `mnv2_flax.evaluate` fills fields that an
older checkpoint's saved config lacks from here.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Every field of a run's config, at TF-slim's ImageNet recipe."""
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
  # None: 32, the classifier. 8 or 16: later strides become atrous rates
  # (TF-slim's output_stride), denser final feature maps.
  config.model.output_stride = config_dict.placeholder(int)

  config.data = ml_collections.ConfigDict()
  config.data.name = 'imagenet2012'  # any tfds image-classification dataset
  # tfds data_dir; None: ~/tensorflow_datasets. Placeholders (None with a
  # type) can be set on the command line: --config.data.data_dir=/data.
  config.data.data_dir = config_dict.placeholder(str)
  # None: <data_dir>/downloads/manual
  config.data.manual_dir = config_dict.placeholder(str)
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
  config.data.random_flip = True  # horizontal, in training
  config.data.eval_crop_fraction = 0.875
  # Also report top-1/top-5 of the mean softmax over each eval image and its
  # mirror (metrics flip_*, ema_flip_*); the plain metrics stay single-view.
  config.data.eval_flip_average = False
  config.data.normalization = 'inception'  # [-1, 1]; 'imagenet': mean/std
  config.data.shuffle_buffer = 16_384
  config.data.cache = False  # keep decoded examples in memory
  # Multi-process input: 'files' (each process reads 1/N of the split) or
  # 'batch' (each reads the whole stream and keeps its rows of every global
  # batch: the same batches for any process count, N times the reading).
  config.data.process_sharding = 'files'
  # tf.data threads: 0 shares TensorFlow's pool (one per core); a small
  # private pool leaves the cores to XLA when the input is cheap.
  config.data.threadpool_size = 0

  config.optim = ml_collections.ConfigDict()
  config.optim.optimizer = 'rmsprop_tf'  # or 'sgd', 'adamw'
  config.optim.learning_rate = 0.045  # per lr_reference_batch images
  config.optim.lr_reference_batch = 96  # lr scales with batch / this
  config.optim.schedule = 'exponential'  # 'cosine', 'constant'
  config.optim.decay_rate = 0.98  # exponential: x0.98 ...
  config.optim.decay_epochs = 2.5  # ... every 2.5 epochs, staircase
  config.optim.warmup_epochs = 0.0  # linear warm-up from 0
  config.optim.momentum = 0.9
  config.optim.nesterov = False  # sgd only
  config.optim.adam_b2 = 0.999  # adamw only (b1 is optim.momentum)
  config.optim.rmsprop_decay = 0.9
  config.optim.rmsprop_epsilon = 1.0
  config.optim.weight_decay = 4e-5  # L2, added to the gradient
  config.optim.weight_decay_mask = 'tf_slim'  # or 'no_norm'
  config.optim.label_smoothing = 0.1
  config.optim.ema_decay = 0.9999  # TF-style warm-up min(d, (1+n)/(10+n))

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 420.0
  config.train.dtype = 'bfloat16'  # compute dtype; params stay float32
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 5000
  # Stop after this step as if preempted (0: never); the next run resumes.
  config.train.stop_after_step = 0
  # JAX persistent compilation cache; '' disables it.
  config.train.compilation_cache_dir = '~/.cache/mnv2_flax/jax'
  # On the CPU backend, plug mnv2_flax.cpu's layers (C++ kernels, fused
  # BatchNorm) into the model: same variables, faster steps. Ignored
  # elsewhere.
  config.train.cpu_fast_path = True

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5000
  config.checkpoint.keep = 3  # latest K, plus the best by eval top-1
  config.checkpoint.async_save = True
  # Resuming over an incomplete or unreadable step: False stops and names the
  # previous complete step; True moves the bad step to
  # <workdir>/corrupt_checkpoints/ and resumes from the newest readable one.
  config.checkpoint.skip_corrupt = False
  return config
