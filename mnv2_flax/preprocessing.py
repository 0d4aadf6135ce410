"""Pixels to model input, on the device: the normalisations of the configs.

The input pipeline delivers uint8 pixels; the jitted train and eval steps
call `normalize` first, so the host sends a quarter of float32's bytes and
does no float arithmetic on them. JAX only (no TensorFlow), for any caller.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Per channel mean and standard deviation in pixel units: torchvision/timm's
# ImageNet ones, and 'inception' (TF-slim, Keras) mapping [0, 255] to [-1, 1].
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
STATISTICS = {
  'inception': ((127.5,) * 3, (127.5,) * 3),
  'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
}


def normalize(images: jax.Array, normalization: str) -> jax.Array:
  """Pixels in [0, 255] (any dtype) as float32 model input.

  `(pixels - mean) * (1 / std)` in float32, with `normalization`
  (`config.data.normalization`) naming the statistics. Written with the
  reciprocal because XLA turns a division by a constant into that product:
  this way the result is the formula's on every backend.
  """
  if normalization not in STATISTICS:
    raise ValueError(
      f'normalization={normalization!r}: expected one of '
      f'{", ".join(STATISTICS)}.'
    )
  mean, std = (np.asarray(v, np.float32) for v in STATISTICS[normalization])
  return (jnp.asarray(images, jnp.float32) - mean) * (1 / std)
