"""Fashion-MNIST, the longer run: width 1.0, resolution 32, output stride 8.

  python train.py --config=configs/fashion_mnist_long.py \
      --workdir=workdirs/fashion_mnist_long

Hardware: a 2-core CPU, no accelerator. Time: 66 min 29 s wall, compile
included. Result: 92.2% test top-1 (EMA 92.3%) after 15 epochs at batch 128
with mild crops (area 0.8-1), flips, label smoothing, dropout and an EMA;
short of the public MobileNet figure on Fashion-MNIST (95.0%). Per-epoch
figures and the plain-network comparison: docs/quickstart_recipe.md.
"""

from configs import quickstart


def get_config(arg=None):
  """Returns the longer Fashion-MNIST config."""
  config = quickstart.get_config(arg)
  config.model.width_multiplier = 1.0
  config.model.dropout_rate = 0.2
  config.model.output_stride = 8

  config.data.batch_size = 128
  config.data.crop_area_range = (0.8, 1.0)

  config.optim.learning_rate = 0.1
  config.optim.lr_reference_batch = 256
  config.optim.warmup_epochs = 0.5
  config.optim.weight_decay = 4e-5
  config.optim.weight_decay_mask = 'tf_slim'  # as measured (docstring)
  config.optim.label_smoothing = 0.1
  config.optim.ema_decay = 0.999

  config.train.num_epochs = 15.0
  config.train.eval_every_steps = 1_407  # every 3 epochs at batch 128
  config.checkpoint.every_steps = 469  # every epoch
  return config
