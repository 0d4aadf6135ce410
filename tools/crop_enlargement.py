"""How much the train crops are enlarged, from the original or from a
resized copy: what a copy's short side changes in what the smallest random
crops see.

For a 375x500 image (ImageNet's commonest size) and copies of it at the
given short sides, samples the crop windows of `config.data`'s Inception
crop (configs/default.py: area 5-100%, aspect 3/4-4/3) and prints, per
output size, the share of crops smaller than the output (so enlarged by the
resize) and the median and 90th-percentile enlargement.

  python tools/crop_enlargement.py --sizes=96,128,160,224 \
      --sides=110,146,183,256,320
"""

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from mnv2_flax import defaults

_SIZES = flags.DEFINE_list('sizes', ['96', '128', '160', '224'], 'Outputs.')
_SIDES = flags.DEFINE_list(
  'sides', ['110', '146', '183', '256', '320'], 'Copy short sides.'
)
_SAMPLES = flags.DEFINE_integer('samples', 2000, 'Crops per image size.')
_SOURCE = (375, 500)


def crop_sides(shape: tuple[int, int], config, samples: int) -> np.ndarray:
  """The shorter side of `samples` train crop windows of an image."""
  bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  sides = []
  for i in range(samples):
    _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.constant([*shape, 3]),
      bounding_boxes=bbox,
      seed=[i, 0],
      min_object_covered=config.data.crop_min_object_covered,
      aspect_ratio_range=tuple(config.data.crop_aspect_range),
      area_range=tuple(config.data.crop_area_range),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    sides.append(min(int(size[0]), int(size[1])))
  return np.array(sides)


def main(argv):
  del argv
  config = defaults.get_config()
  fraction = config.data.eval_crop_fraction
  sources = {'original': _SOURCE}
  for side in map(int, _SIDES.value):
    sources[f'copy {side}'] = (side, round(_SOURCE[1] * side / _SOURCE[0]))
  crops = {k: crop_sides(v, config, _SAMPLES.value) for k, v in sources.items()}
  print('| px | source | crops enlarged | median | 90th percentile |')
  print('|---:|---|---:|---:|---:|')
  for size in map(int, _SIZES.value):
    for name, sides in crops.items():
      shape = sources[name]
      if min(shape) < defaults.covering_short_side(size, fraction):
        continue  # does not cover this size
      factor = np.maximum(size / sides, 1.0)
      print(
        f'| {size} | {name} | {np.mean(sides < size):.0%} | '
        f'x{np.median(factor):.2f} | x{np.percentile(factor, 90):.2f} |'
      )


if __name__ == '__main__':
  app.run(main)
