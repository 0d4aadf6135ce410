"""Keras weights into the Flax model: logits equal real Keras's.

Keras (tensorflow-cpu's) builds `keras.applications.MobileNetV2` with
`weights=None`; every weight and BatchNorm statistic is then set at random,
so a wrong mapping, transpose or padding shows in the logits.
"""

import jax
import numpy as np
import pytest

from mnv2_flax import convert

keras = pytest.importorskip('keras')


def _random_keras(alpha, size, classes, seed):
  net = keras.applications.MobileNetV2(
    input_shape=(size, size, 3),
    alpha=alpha,
    weights=None,
    classes=classes,
    classifier_activation=None,
  )
  rng = np.random.default_rng(seed)
  for layer in net.layers:
    values = []
    for w in layer.get_weights():
      if type(layer).__name__ == 'BatchNormalization' and len(values) == 3:
        values.append(rng.uniform(0.5, 2.0, w.shape))  # variances > 0
      elif type(layer).__name__ == 'BatchNormalization':
        values.append(rng.normal(0.0, 0.5, w.shape) + (len(values) == 0))
      else:
        fan_in = np.prod(w.shape[:-1]) if w.ndim > 1 else 1
        values.append(rng.normal(0.0, 1.0 / np.sqrt(fan_in), w.shape))
    layer.set_weights([v.astype(np.float32) for v in values])
  return net


@pytest.mark.parametrize(
  'alpha, size', [(0.35, 32), (0.5, 48), (1.0, 33), (1.4, 40)]
)
@pytest.mark.slow
def test_logits_equal_keras(alpha, size):
  net = _random_keras(alpha, size, classes=7, seed=int(alpha * 100) + size)
  variables = convert.from_keras(net)  # alpha and classes read off the net
  model = convert.keras_model(num_classes=7, width_multiplier=alpha)
  images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3))
  images = images.astype(np.float32)
  expected = np.asarray(net(images, training=False))
  got = np.asarray(jax.jit(model.apply)(variables, images))
  assert np.abs(expected).max() > 1.0  # logits of a real scale
  assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.slow
def test_a_keras_file_converts_and_a_mismatch_names_the_layers(tmp_path):
  net = _random_keras(0.35, 32, classes=5, seed=1)
  path = str(tmp_path / 'net.keras')
  net.save(path)
  from_file = convert.from_keras(path)
  from_live = convert.from_keras(net)
  jax.tree.map(np.testing.assert_array_equal, from_file, from_live)
  # Weights only (as keras.applications downloads them): built, then loaded.
  weights = str(tmp_path / 'net.weights.h5')
  net.save_weights(weights)
  from_weights = convert.from_keras(
    weights, width_multiplier=0.35, num_classes=5
  )
  jax.tree.map(np.testing.assert_array_equal, from_weights, from_live)
  with pytest.raises(ValueError) as error:
    convert.from_keras(net, num_classes=10)
  assert (
    "'predictions/kernel' has shape (1280, 5), expected (1280, 10) for "
    'classifier/kernel' in str(error.value)
  )
  with pytest.raises(FileNotFoundError, match='no Keras file'):
    convert.from_keras(str(tmp_path / 'missing.keras'))


class _Layer:
  def __init__(self, name, weights):
    self.name, self._weights = name, weights

  def get_weights(self):
    return self._weights


def test_missing_and_unexpected_weights_are_named():
  net = _random_keras(0.35, 32, classes=5, seed=2)
  layers = [
    _Layer(layer.name, layer.get_weights())
    for layer in net.layers
    if layer.name != 'block_3_project_BN'
  ]
  layers.append(_Layer('extra_conv', [np.zeros((1, 1, 8, 8), np.float32)]))
  fake = type('Net', (), {'layers': layers})()
  with pytest.raises(ValueError) as error:
    convert.from_keras(fake)
  message = str(error.value)
  assert message.startswith(
    'Keras model does not match keras.applications.MobileNetV2 of '
    'width_multiplier=0.35, num_classes=5: '
  )
  assert (
    "missing 'block_3_project_BN/gamma' (for block_04/project_bn/scale, "
    'expected shape (16,))' in message
  )
  assert "missing 'block_3_project_BN/moving_variance'" in message
  assert "unexpected 'extra_conv/0'" in message
