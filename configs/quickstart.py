"""Fashion-MNIST on CPU: width 0.35, resolution 32.

  python -m mnv2_flax.input_pipeline --config=configs/quickstart.py --benchmark

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
  return config
