"""Parameter and multiply-accumulate (MAC) counts of a MobileNetV2.

Counted from the actual Flax model: its variables give the parameters and the
output shapes of its layers (traced with `jax.eval_shape`, nothing is
computed) give the MACs. Conventions:

* `params`: trainable parameters including BatchNorm scale and bias
  (torchvision's convention; 3,504,872 for width 1.0 with 1000 classes).
* `params_no_bn`: conv and dense kernels plus the dense bias, without BatchNorm
  (TF-slim's "Parameters" column; 3.47M for width 1.0 with 1001 classes).
* `batch_stats`: BatchNorm running means and variances (Keras adds these to
  its parameter count).
* `macs`: multiply-accumulates of convolutions and the dense layer for one
  image; BatchNorm, activations, additions and pooling are not counted
  (TF-slim's "MACs" column; 300.78M for width 1.0 at 224).

Command line:
  python -m mnv2_flax.stats --width_multiplier=0.75 --resolution=160 \
      --num_classes=1001 --json
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

from absl import flags
from absl import logging

from mnv2_flax import cli

# JAX and Flax load when something is counted: the command line checks its
# flags first.
if TYPE_CHECKING:
  from mnv2_flax import models


@dataclasses.dataclass(frozen=True)
class Layer:
  """One parameterised layer: its path, output shape, parameters and MACs."""

  name: str
  kind: str
  output_shape: tuple[int, ...]
  params: int
  macs: int


@dataclasses.dataclass(frozen=True)
class ModelStats:
  """Totals over the model, and the per-layer rows they are summed from."""

  params: int
  params_no_bn: int
  batch_stats: int
  macs: int
  layers: tuple[Layer, ...]

  def as_dict(self) -> dict[str, int]:
    return dict(
      params=self.params,
      params_no_bn=self.params_no_bn,
      batch_stats=self.batch_stats,
      macs=self.macs,
    )


def _size(tree: Any) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree.get(key, {})
  return tree


def count(
  model: models.MobileNetV2, resolution: int | tuple[int, int] = 224
) -> ModelStats:
  """Counts parameters and MACs of `model` on one image of `resolution`.

  Args:
    model: any MobileNetV2 (width, classes and ablation knobs are read from
      the module itself).
    resolution: input size, an int for square inputs or (height, width).

  Returns:
    The totals and the per-layer rows.
  """
  import jax  # pylint: disable=g-import-not-at-top

  height, width = (
    (resolution, resolution) if isinstance(resolution, int) else resolution
  )
  # A shape, not an array: any resolution is counted without memory.
  images = jax.ShapeDtypeStruct((1, height, width, 3), model.dtype)
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False), images
  )

  # The filter runs while tracing, in call order; it records that order,
  # which the returned (key-sorted) pytree does not keep.
  call_order = []

  def is_counted(module, method_name: str) -> bool:
    # The layers: modules that hold parameters themselves (any conv or norm
    # implementation the model was built with), not through submodules.
    params = module.variables.get('params', {})
    counted = (
      method_name == '__call__'
      and bool(params)
      and not any(isinstance(v, dict) for v in params.values())
    )
    if counted:
      call_order.append(tuple(module.scope.path))
    return counted

  _, state = jax.eval_shape(
    lambda v, x: model.apply(
      v,
      x,
      train=False,
      capture_intermediates=is_counted,
      mutable=['intermediates'],
    ),
    variables,
    images,
  )

  layers = []
  for path in call_order:
    (output,) = _lookup(state['intermediates'], path)['__call__']
    layer_params = _lookup(variables['params'], path)
    kernel = layer_params.get('kernel')
    # A conv's kernel (kh, kw, in/groups, out) is applied once per output
    # position; a dense kernel (in, out) once per image.
    macs = (
      math.prod(output.shape[1:-1]) * math.prod(kernel.shape)
      if kernel is not None
      else 0
    )
    kind = (
      'BatchNorm' if kernel is None else 'Dense' if kernel.ndim == 2 else 'Conv'
    )
    layers.append(
      Layer(
        '/'.join(path), kind, tuple(output.shape[1:]), _size(layer_params), macs
      )
    )

  params = _size(variables['params'])
  bn_params = sum(layer.params for layer in layers if layer.kind == 'BatchNorm')
  return ModelStats(
    params=params,
    params_no_bn=params - bn_params,
    batch_stats=_size(variables.get('batch_stats', {})),
    macs=sum(layer.macs for layer in layers),
    layers=tuple(layers),
  )


def format_table(stats: ModelStats) -> str:
  """A readable per-layer table with the totals."""
  rows = [
    f'{"layer":<32} {"kind":<10} {"output":>16} {"params":>10} {"MACs":>12}'
  ]
  for layer in stats.layers:
    shape = 'x'.join(str(d) for d in layer.output_shape)
    rows.append(
      f'{layer.name:<32} {layer.kind:<10} {shape:>16} '
      f'{layer.params:>10,} {layer.macs:>12,}'
    )
  rows.append('-' * len(rows[0]))
  rows.append(f'params (with BN scale/bias): {stats.params:,}')
  rows.append(f'params without BN:           {stats.params_no_bn:,}')
  rows.append(f'BN running statistics:       {stats.batch_stats:,}')
  rows.append(
    f'MACs per image:              {stats.macs:,} ({stats.macs / 1e6:.2f}M)'
  )
  return '\n'.join(rows)


def main(argv: Sequence[str]) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(
      f'unexpected arguments {argv[1:]}; flags take the form --name=value.'
    )
  for flag in (_WIDTH, _RESOLUTION, _NUM_CLASSES):
    if not flag.value > 0:
      raise ValueError(
        f'--{flag.name}: {flag.name}={flag.value} is not valid; expected a '
        'number > 0.'
      )
  # pylint: disable=g-import-not-at-top
  from mnv2_flax import defaults
  from mnv2_flax import models
  # pylint: enable=g-import-not-at-top

  fields = defaults.get_config().model.to_dict()
  fields['width_multiplier'] = _WIDTH.value
  model = models.MobileNetV2(num_classes=_NUM_CLASSES.value, **fields)
  stats = count(model, _RESOLUTION.value)
  if _JSON.value:
    print(
      json.dumps(
        dict(
          width_multiplier=_WIDTH.value,
          resolution=_RESOLUTION.value,
          num_classes=_NUM_CLASSES.value,
          **stats.as_dict(),
        )
      )
    )
  else:
    print(format_table(stats))


if __name__ == '__main__':
  # Flags live here so that importing the library defines none.
  _WIDTH = flags.DEFINE_float('width_multiplier', 1.0, 'Width multiplier.')
  _RESOLUTION = flags.DEFINE_integer(
    'resolution', 224, 'Input height and width.'
  )
  _NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', 1000, 'Classifier outputs (TF-slim checkpoints: 1001).'
  )
  _JSON = flags.DEFINE_bool(
    'json', False, 'Print one JSON object instead of the table.'
  )
  cli.run(main)
