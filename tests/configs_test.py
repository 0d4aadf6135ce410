"""Every shipped config passes the checks that run before training starts."""

import importlib

import pytest

from mnv2_flax import defaults
from mnv2_flax.train import train_lib

NAMES = ('default', 'torchvision', 'quickstart', 'fashion_mnist_long')


@pytest.mark.parametrize('name', NAMES)
def test_shipped_configs_are_valid(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  train_lib.check_config(config)
  assert config.optim.optimizer in defaults.OPTIMIZERS


@pytest.mark.parametrize('mode', ['finetune', 'scratch', 'probe'])
def test_finetune_digits_modes(mode, tmp_path):
  from configs import finetune_digits

  config = finetune_digits.get_config(mode)
  assert config.data.name == 'sklearn_digits'
  if mode == 'scratch':
    assert not config.init_from
    train_lib.check_config(config)
    return
  assert config.init_from == 'workdirs/quickstart'
  assert config.optim.freeze_backbone == (mode == 'probe')
  config.init_from = str(tmp_path / 'absent')
  with pytest.raises(ValueError, match='config.init_from=.*does not exist'):
    train_lib.check_config(config)
  config.init_from = str(tmp_path)
  train_lib.check_config(config)


def test_finetune_digits_names_a_bad_mode():
  from configs import finetune_digits

  with pytest.raises(ValueError, match='not a mode; expected one of finetune'):
    finetune_digits.get_config('linear')


def test_config_bounds_are_the_models():
  from mnv2_flax import models  # pylint: disable=g-import-not-at-top

  assert defaults.MIN_IMAGE_SIZE == models.MIN_RESOLUTION
  config = defaults.with_defaults(
    importlib.import_module('configs.quickstart').get_config()
  )
  config.data.image_size = models.MIN_RESOLUTION - 1
  with pytest.raises(ValueError, match=r'image_size.*\[32, 4096\]'):
    defaults.check(config)


# Values each model field is probed with: valid, invalid, and a neighbour.
_PROBES = {
  'width_multiplier': [0.35, 1, 0, -1.0, '1.0', None],
  'num_classes': [0, 10, -1, 2.5, '10'],
  'dropout_rate': [0.0, 0.2, 1.0, -0.1],
  'bn_momentum': [0.0, 0.997, 1.0, 1.5, -0.1],
  'bn_epsilon': [1e-3, 0.0, -1e-5],
  'expand_ratio': [None, 6.0, 1, 0, -2.0],
  'padding': ['tf', 'torch', 'same'],
  'init_scheme': ['tf_slim', 'torchvision', 'keras'],
  'shortcut': ['bottleneck', 'expansion', 'none', 'all'],
  'output_stride': [None, 8, 16, 32, 3, 64],
  'bottleneck_activation': ['linear', 'relu6', 'relu'],
}


def test_config_checks_of_model_fields_are_the_models_own():
  # model_fields checks config.model before JAX loads; the model checks
  # itself when built (models.py imports flax, jax and numpy only): both
  # accept and refuse the same values, with the same message.
  from mnv2_flax import model_fields  # pylint: disable=g-import-not-at-top
  from mnv2_flax import models  # pylint: disable=g-import-not-at-top

  assert set(_PROBES) == set(model_fields.RULES) | set(model_fields.CHOICES)
  for name in (
    'PADDINGS',
    'SHORTCUTS',
    'BOTTLENECK_ACTIVATIONS',
    'INIT_SCHEMES',
    'OUTPUT_STRIDES',
    'MIN_RESOLUTION',
  ):
    assert getattr(model_fields, name) == getattr(models, name), name
  for field, values in _PROBES.items():
    for value in values:
      by_model = _error(models.MobileNetV2, **{field: value})
      by_config = _error(model_fields.check, {field: value})
      assert by_model == by_config, (field, value, by_model, by_config)


def _error(fn, *args, **kwargs) -> str | None:
  try:
    fn(*args, **kwargs)
  except ValueError as e:
    return str(e)
  return None


@pytest.mark.parametrize(
  'field, value',
  [
    ('crop_area_range', (0.1, 0.5, 1.0)),
    ('crop_area_range', ('0.1', 1.0)),
    ('crop_aspect_range', (0.75, None)),
  ],
)
def test_a_range_field_that_is_not_two_numbers_gets_one_clear_error(
  field, value
):
  config = defaults.get_config()
  config.data[field] = value
  with pytest.raises(ValueError, match=rf'config.data.{field}=.* \(min, max\)'):
    defaults.check_data(config)
