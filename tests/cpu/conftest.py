"""Tests of mnv2_flax.cpu: CPU-only paths, skipped on any other backend."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() == 'cpu':
    return
  skip = pytest.mark.skip(reason='mnv2_flax.cpu runs on the CPU backend only')
  for item in items:
    if f'{item.fspath}'.startswith(__file__.rsplit('/', 1)[0]):
      item.add_marker(skip)
