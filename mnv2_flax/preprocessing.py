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


def resize_for_eval(
  pixels: np.ndarray | jax.Array, image_size: int, crop_fraction: float = 1.0
) -> jax.Array:
  """Images as a dataset stores them to the uint8 batch evaluation feeds.

  `pixels`: one image (H, W[, C]) or a batch (N, H, W[, C]), 1 or 3 channels,
  values in [0, 255], any size. As the eval pipeline does
  (`data.transforms.central_crop` and `finish`): the central square of
  `crop_fraction` of the shorter side, a bilinear resize to `image_size`
  (half-pixel centres, no antialiasing), rounded to uint8, grey repeated to
  RGB. Equal to the pipeline's pixels but for rare off-by-one roundings
  (JAX's and TensorFlow's resize differ in float rounding).
  """
  x = jnp.asarray(pixels, jnp.float32)
  if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] not in (1, 3)):
    x = x[..., None]  # (H, W) or (N, H, W): one channel
  single = x.ndim == 3
  if single:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(
      f'pixels of shape {tuple(np.shape(pixels))}: expected (H, W), '
      '(H, W, C) or (N, H, W, C) with C 1 or 3.'
    )
  height, width = x.shape[1], x.shape[2]
  side = int(np.float32(crop_fraction) * np.float32(min(height, width)))
  top, left = (height - side + 1) // 2, (width - side + 1) // 2
  x = x[:, top : top + side, left : left + side]
  x = jax.image.resize(
    x,
    (x.shape[0], image_size, image_size, x.shape[3]),
    method='linear',
    antialias=False,
  )
  x = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return x[0] if single else x


def eval_input(pixels, config) -> jax.Array:
  """A dataset's pixels (see `resize_for_eval`) as the model's eval input:
  resized and cropped as `config.data` says, then normalised."""
  images = resize_for_eval(
    pixels, config.data.image_size, config.data.eval_crop_fraction
  )
  return normalize(images, config.data.normalization)
