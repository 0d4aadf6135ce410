"""MobileNetV2 on ImageNet with torchvision's recipe (V2 weights' recipe).

  python train.py --config=configs/torchvision.py --workdir=workdirs/tv

SGD momentum 0.9, learning rate 0.5 at batch 1024 (scaled with the batch),
5 linear warm-up epochs then cosine over 600 epochs, weight decay 2e-5 on all
parameters but BatchNorm's, label smoothing 0.1, EMA, torchvision's numerics
(symmetric padding, BN epsilon 1e-5 and momentum 0.1, kaiming init) and input
normalisation (ImageNet mean/std, crop area 0.08-1). torchvision reports
72.154% top-1 with TrivialAugment, random erasing, mixup and cutmix, which
this pipeline does not implement; not run here.
"""

from configs import default


def get_config(arg=None):
  """Returns the torchvision-recipe config."""
  config = default.get_config(arg)
  config.model.padding = 'torch'
  config.model.bn_epsilon = 1e-5
  config.model.bn_momentum = 0.9  # torch momentum 0.1
  config.model.init_scheme = 'torchvision'

  config.data.normalization = 'imagenet'
  config.data.crop_area_range = (0.08, 1.0)
  config.data.crop_min_object_covered = 0.0

  config.optim.optimizer = 'sgd'
  config.optim.learning_rate = 0.5
  config.optim.lr_reference_batch = 1024
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 5.0
  config.optim.weight_decay = 2e-5
  config.optim.weight_decay_mask = 'no_norm'
  config.optim.ema_decay = 0.99998

  config.train.num_epochs = 600.0
  return config
