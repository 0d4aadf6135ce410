"""What each field of `models.MobileNetV2` may be, in plain Python.

The module checks its fields with `check` when it is built; `defaults.check`
checks `config.model` with the same function before JAX, Flax or TensorFlow
load, so that a bad value is refused in a fraction of a second and before a
workdir is touched.
"""

from collections.abc import Callable, Sequence
from typing import Any

MIN_RESOLUTION = 32  # the input's smallest side (five stride-2 stages)
PADDINGS = ('tf', 'torch')
SHORTCUTS = ('bottleneck', 'expansion', 'none')
BOTTLENECK_ACTIVATIONS = ('linear', 'relu6')
INIT_SCHEMES = ('tf_slim', 'torchvision')
OUTPUT_STRIDES = (None, 1, 2, 4, 8, 16, 32)


def _number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


# field: (whether a value is valid, what is valid)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
  'width_multiplier': (
    lambda v: _number(v) and v > 0,
    'a number > 0 (published: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)',
  ),
  'num_classes': (
    lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    'an integer >= 0 (0 = no classifier)',
  ),
  'dropout_rate': (
    lambda v: _number(v) and 0 <= v < 1,
    '0 <= dropout_rate < 1',
  ),
  'bn_momentum': (lambda v: _number(v) and 0 <= v <= 1, 'a value in [0, 1]'),
  'bn_epsilon': (lambda v: _number(v) and v > 0, 'a value > 0'),
  'expand_ratio': (
    lambda v: v is None or (_number(v) and v > 0),
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
