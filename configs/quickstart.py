"""Fashion-MNIST on CPU: width 0.35, resolution 32.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart

Fashion-MNIST is prepared offline on first use from the idx files of Debian's
`dataset-fashion-mnist` package (or `config.data.manual_dir`).
"""

from configs import default


def get_config(arg=None):
  """Returns the quickstart config."""
  config = default.get_config(arg)
  config.model.width_multiplier = 0.35
  config.model.dropout_rate = 0.1
  config.model.bn_momentum = 0.9

  config.data.name = 'fashion_mnist'
  config.data.image_size = 32
  config.data.batch_size = 256
  config.data.eval_batch_size = 500
  config.data.eval_split = 'test'
  # Centred 28x28 objects: mild crops only.
  config.data.crop_area_range = (0.6, 1.0)
  config.data.crop_min_object_covered = 0.0
  config.data.eval_crop_fraction = 1.0
  config.data.shuffle_buffer = 60_000
  config.data.cache = True

  config.optim.optimizer = 'sgd'
  config.optim.nesterov = True
  config.optim.learning_rate = 0.1
  config.optim.lr_reference_batch = 256
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 0.2
  config.optim.weight_decay = 5e-5
  config.optim.label_smoothing = 0.0
  config.optim.ema_decay = 0.99

  config.train.num_epochs = 3.0
  config.train.dtype = 'float32'
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 100_000  # at the end only

  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 2
  return config
