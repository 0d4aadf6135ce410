"""What each field of `models.MobileNetV2` may be, in plain Python.

`defaults.check` checks `config.model` with `check` before JAX, Flax or
TensorFlow load, so that a bad value is refused in a fraction of a second
and before a workdir is touched. The model checks its own fields when it
is built (`MobileNetV2.__post_init__`; models.py imports flax, jax and numpy
only): `tests/configs_test.py` holds the two to the same values, choices
and messages.
"""

from collections.abc import Callable, Sequence
from typing import Any

MIN_RESOLUTION = 32  # models.MIN_RESOLUTION
PADDINGS = ('tf', 'torch')
SHORTCUTS = ('bottleneck', 'expansion', 'none')
BOTTLENECK_ACTIVATIONS = ('linear', 'relu6')
INIT_SCHEMES = ('tf_slim', 'torchvision')
OUTPUT_STRIDES = (None, 1, 2, 4, 8, 16, 32)

# field: (whether a value is valid, what is valid), as the model checks it.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
  'width_multiplier': (
    lambda v: isinstance(v, int | float) and v > 0,
    'a number > 0 (published: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)',
  ),
  'num_classes': (
    lambda v: isinstance(v, int) and v >= 0,
    'an integer >= 0 (0 = no classifier)',
  ),
  'dropout_rate': (lambda v: 0 <= v < 1, '0 <= dropout_rate < 1'),
  'bn_momentum': (lambda v: 0 <= v <= 1, 'a value in [0, 1]'),
  'bn_epsilon': (lambda v: v > 0, 'a value > 0'),
  'expand_ratio': (
    lambda v: v is None or v > 0,
    "None (the paper's 6) or a number > 0",
  ),
}
CHOICES: dict[str, Sequence[Any]] = {
  'padding': PADDINGS,
  'init_scheme': INIT_SCHEMES,
  'shortcut': SHORTCUTS,
  'output_stride': OUTPUT_STRIDES,
  'bottleneck_activation': BOTTLENECK_ACTIVATIONS,
}


def check(fields: dict[str, Any], prefix: str = '') -> None:
  """Raises one ValueError naming the first invalid field of `fields` (any
  of the model's fields; others are ignored), its value and what is valid.
  `prefix` goes before the field's name ('config.model.')."""
  for field, (valid, expected) in RULES.items():
    if field in fields and not valid(fields[field]):
      raise ValueError(
        f'{prefix}{field}={fields[field]!r} is not valid; expected {expected}.'
      )
  for field, choices in CHOICES.items():
    if field in fields and fields[field] not in choices:
      raise ValueError(
        f'{prefix}{field}={fields[field]!r} is not valid; expected one of '
        f'{", ".join(repr(v) for v in choices)}.'
      )
