"""MobileNetV2 on ImageNet at width 1.0, resolution 224: TF-slim's recipe.

  python train.py --config=configs/default.py --workdir=workdirs/imagenet

RMSProp (TF1 semantics: decay 0.9, momentum 0.9, epsilon 1.0 inside the square
root, accumulator starting at 1), learning rate 0.045 per 96 images scaled
with the global batch, x0.98 every 2.5 epochs, L2 weight decay 4e-5 on conv
and dense kernels (not depthwise, BN or biases), label smoothing 0.1,
parameter EMA 0.9999 for evaluation, dropout 0.2, BN decay 0.997 / epsilon
1e-3, bfloat16 compute on accelerators. TF-slim reports 71.8% top-1 after
about 420 epochs of 96-image clones; this config has not been run to the end
here (no ImageNet and no accelerator on this project's machines).

ImageNet needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
`<data_dir>/downloads/manual` (or `config.data.manual_dir`), prepared once by
tfds.
"""

import ml_collections

from mnv2_flax import defaults


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Returns the default config (every field: mnv2_flax/defaults.py)."""
  del arg
  config = defaults.get_config()
  # 1% of train (12,811 images) held out for choices, as big_vision's
  # 'minival'; results report ImageNet's 'validation' split.
  config.data.train_split = 'train[:99%]'
  config.data.minival_split = 'train[99%:]'
  return config
