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
