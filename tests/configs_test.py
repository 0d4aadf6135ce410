"""Every shipped config passes the checks that run before training starts."""

import importlib

import pytest

from mnv2_flax import defaults
from mnv2_flax import train_lib

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
