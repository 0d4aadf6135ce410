"""Loads torchvision-layout MobileNetV2 weights into the Flax model.

torchvision's module tree (`features.0` stem, `features.1`..`features.17`
blocks, `features.18` head, `classifier.1`) maps one to one onto
`MobileNetV2`'s (`stem_*`, `block_01`..`block_17`, `head_*`, `classifier`).
Only numpy is needed: pass `{name: np.ndarray}` (torch tensors on the CPU also
work, through `np.asarray`).

  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  model = convert.torchvision_model(num_classes=1000, width_multiplier=1.0)
  variables = convert.from_torchvision(state_dict, num_classes=1000,
                                       width_multiplier=1.0)
  logits = model.apply(variables, images_nhwc)  # == torch_model(images_nchw)

Inputs follow torchvision's preprocessing (ImageNet mean/std), laid out NHWC.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnv2_flax import models

# The MobileNetV2 fields that reproduce torchvision's numerics: symmetric
# padding, BN epsilon 1e-5 and torch momentum 0.1 (Flax 0.9), its initialisers.
TORCHVISION_KWARGS: dict[str, Any] = dict(
  padding='torch', bn_epsilon=1e-5, bn_momentum=0.9, init_scheme='torchvision'
)

# Keys of a torch state dict that hold no model state.
_IGNORED_SUFFIXES = ('.num_batches_tracked',)


def torchvision_model(**kwargs: Any) -> models.MobileNetV2:
  """A MobileNetV2 with torchvision's numerics (`TORCHVISION_KWARGS`)."""
  return models.MobileNetV2(**{**TORCHVISION_KWARGS, **kwargs})


def _torch_prefixes(params: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
  """Yields (flax layer path, torch module prefix) for every layer."""
  yield 'stem_conv', 'features.0.0'
  yield 'stem_bn', 'features.0.1'
  blocks = sorted(k for k in params if k.startswith('block_'))
  for i, block in enumerate(blocks, start=1):
    layers = ['depthwise', 'project']
    if 'expand_conv' in params[block]:
      layers.insert(0, 'expand')
    # Conv-BN-ReLU6 groups are Sequentials (`conv.j.0`, `conv.j.1`); the
    # projection conv and its BN follow as plain `conv.j` and `conv.j+1`.
    for j, layer in enumerate(layers[:-1]):
      yield f'{block}/{layer}_conv', f'features.{i}.conv.{j}.0'
      yield f'{block}/{layer}_bn', f'features.{i}.conv.{j}.1'
    j = len(layers) - 1
    yield f'{block}/project_conv', f'features.{i}.conv.{j}'
    yield f'{block}/project_bn', f'features.{i}.conv.{j + 1}'
  yield 'head_conv', f'features.{len(blocks) + 1}.0'
  yield 'head_bn', f'features.{len(blocks) + 1}.1'
  if 'classifier' in params:
    yield 'classifier', 'classifier.1'


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Torch layout of a Flax shape: HWIO -> OIHW, (in, out) -> (out, in)."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape))


def _layer_entries(path: str, prefix: str):
  """Yields (collection, flax path, torch key, to_flax) for one layer."""
  if path.endswith('_bn'):
    for flax_name, torch_name in (('scale', 'weight'), ('bias', 'bias')):
      yield (
        'params',
        (*path.split('/'), flax_name),
        f'{prefix}.{torch_name}',
        (lambda a: a),
      )
    for flax_name, torch_name in (
      ('mean', 'running_mean'),
      ('var', 'running_var'),
    ):
      yield (
        'batch_stats',
        (*path.split('/'), flax_name),
        (f'{prefix}.{torch_name}'),
        lambda a: a,
      )
  elif path == 'classifier':
    yield (
      'params',
      ('classifier', 'kernel'),
      f'{prefix}.weight',
      (lambda a: a.T),
    )  # Linear (out, in) -> Dense (in, out).
    yield 'params', ('classifier', 'bias'), f'{prefix}.bias', lambda a: a
  else:
    # Conv OIHW -> HWIO; a depthwise (C, 1, 3, 3) becomes (3, 3, 1, C).
    yield (
      'params',
      (*path.split('/'), 'kernel'),
      f'{prefix}.weight',
      (lambda a: a.transpose(2, 3, 1, 0)),
    )


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def from_torchvision(
  state_dict: Mapping[str, Any], **model_kwargs: Any
) -> dict[str, Any]:
  """Converts a torchvision-layout MobileNetV2 state dict to Flax variables.

  Args:
    state_dict: torchvision parameter and buffer names mapped to arrays.
    **model_kwargs: `MobileNetV2` fields (at least `num_classes` and
      `width_multiplier` when they differ from 1000 and 1.0); torchvision's
      numerics (`TORCHVISION_KWARGS`) are the defaults.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of float32 numpy arrays for
    `torchvision_model(**model_kwargs)`.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped entry.
  """
  model = torchvision_model(**model_kwargs)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
    )
  )
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  problems, used = [], set()
  for path, prefix in _torch_prefixes(shapes['params']):
    for collection, flax_path, key, to_flax in _layer_entries(path, prefix):
      expected = tuple(_get(shapes[collection], flax_path).shape)
      if key not in state_dict:
        problems.append(
          f'missing {key!r} (for {"/".join(flax_path)}, '
          f'expected shape {_torch_shape(expected)})'
        )
        continue
      used.add(key)
      value = to_flax(np.asarray(state_dict[key], dtype=np.float32))
      if value.shape != expected:
        problems.append(
          f'{key!r} has shape {tuple(np.shape(state_dict[key]))}, expected '
          f'{_torch_shape(expected)} for {"/".join(flax_path)} '
          f'of width_multiplier={model.width_multiplier}, '
          f'num_classes={model.num_classes}'
        )
        continue
      _set(variables[collection], flax_path, value)
  unexpected = sorted(
    k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES)
  )
  problems += [f'unexpected {k!r}' for k in unexpected]
  if problems:
    raise ValueError(
      'state dict does not match a torchvision MobileNetV2: '
      + '; '.join(problems)
    )
  return variables
