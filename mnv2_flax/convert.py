"""Loads torchvision, timm and Keras MobileNetV2 weights into the Flax model.

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

timm's `mobilenetv2_035` ... `_140` have torchvision's numerics and their own
names; state dicts come as `.safetensors` files (pickled `.pth` files are
refused):

  variables = convert.from_timm('mobilenetv2_100.safetensors')
  model = convert.torchvision_model(num_classes=1000)

`keras.applications.MobileNetV2` (any alpha; a live model or a `.keras` /
`.h5` file) maps the same way, with Keras's numerics (TF 'SAME' padding,
which its stride-2 `correct_pad` equals; BN epsilon 1e-3):

  variables = convert.from_keras(keras_model)   # or 'mobilenet_v2.h5'
  model = convert.keras_model(num_classes=1000, width_multiplier=1.0)
  logits = model.apply(variables, images)  # == keras_model(images), inputs in
                                           # [-1, 1] (Inception scaling)
"""

from collections.abc import Callable, Iterator, Mapping
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnv2_flax import models
from mnv2_flax.runtime import tree_diff

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


def _variable_shapes(model: models.MobileNetV2) -> dict[str, Any]:
  """The model's variables as shapes, computing nothing."""
  return jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
    )
  )


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _assemble(
  entries: Mapping[str, tuple[str, tuple[str, ...], tuple[int, ...], Any]],
  found: Mapping[str, Any],
  what: str,
  model: models.MobileNetV2,
) -> dict[str, Any]:
  """`model`'s variables from `found` ({source name: array}), checked first.

  `entries` maps each source name the model needs (a torch key,
  'Conv1/kernel') to (collection, Flax path, shape in the source's layout,
  to_flax). Raises a ValueError starting with `what` and naming every
  missing, unexpected or mis-shaped name.
  """
  problems = tree_diff.diff(
    {key: entry[2] for key, entry in entries.items()},
    {key: np.shape(value) for key, value in found.items()},
  )
  if problems:
    raise ValueError(
      f'{what} of width_multiplier={model.width_multiplier}, '
      f'num_classes={model.num_classes}: '
      + tree_diff.summarize(
        problems,
        missing='missing {path!r} (for {name}, expected shape {expected})',
        unexpected='unexpected {path!r}',
        shape='{path!r} has shape {actual}, expected {expected} for {name}',
        names={key: '/'.join(entry[1]) for key, entry in entries.items()},
      )
    )
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key, (collection, flax_path, _, to_flax) in entries.items():
    value = to_flax(np.asarray(found[key], dtype=np.float32))
    _set(variables[collection], flax_path, value)
  return variables


# ------------------------------------------------------------------ timm

# Blocks per stage of timm's mobilenetv2_035 ... _140 (the paper's n column);
# its deeper `_110d` / `_120d` variants are another architecture.
TIMM_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)


def _timm_prefixes(params: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
  """Yields (flax layer path, timm module prefix) for every layer.

  timm's `mobilenetv2_*` (its EfficientNet builder): `conv_stem`/`bn1`,
  stages `blocks.S.J`, `conv_head`/`bn2`, `classifier`. The first block is a
  DepthwiseSeparableConv (`conv_dw`, `bn1`, `conv_pw`, `bn2`); the others are
  InvertedResiduals (`conv_pw`, `bn1`, `conv_dw`, `bn2`, `conv_pwl`, `bn3`).
  """
  yield 'stem_conv', 'conv_stem'
  yield 'stem_bn', 'bn1'
  blocks = sorted(k for k in params if k.startswith('block_'))
  stage_block = [
    (s, j) for s, n in enumerate(TIMM_STAGE_DEPTHS) for j in range(n)
  ]
  for block, (stage, j) in zip(blocks, stage_block, strict=True):
    if 'expand_conv' in params[block]:
      layers = (
        ('expand', 'conv_pw', 'bn1'),
        ('depthwise', 'conv_dw', 'bn2'),
        ('project', 'conv_pwl', 'bn3'),
      )
    else:
      layers = (('depthwise', 'conv_dw', 'bn1'), ('project', 'conv_pw', 'bn2'))
    for layer, conv, bn in layers:
      yield f'{block}/{layer}_conv', f'blocks.{stage}.{j}.{conv}'
      yield f'{block}/{layer}_bn', f'blocks.{stage}.{j}.{bn}'
  yield 'head_conv', 'conv_head'
  yield 'head_bn', 'bn2'
  if 'classifier' in params:
    yield 'classifier', 'classifier'


# ------------------------------------------------------- torch state dicts

PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.pkl')


def load_state_dict(state_dict_or_path: Any) -> Mapping[str, Any]:
  """A `{name: array}` mapping from a mapping, a `.safetensors` or an `.npz`
  file. Pickled files (`.pth`) are refused: unpickling can run code."""
  if not isinstance(state_dict_or_path, (str, os.PathLike)):
    return state_dict_or_path
  path = os.fspath(state_dict_or_path)
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(
      f'{path!r} is a pickle file, which is not read here (unpickling can run '
      'code). Save the state dict as safetensors in PyTorch: '
      "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')."
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no state dict file at {path!r}.')
  if path.endswith('.safetensors'):
    from safetensors import numpy as safetensors_np  # pylint: disable=g-import-not-at-top

    return safetensors_np.load_file(path)
  if path.endswith('.npz'):
    with np.load(path) as data:
      return dict(data)
  raise ValueError(
    f'{path!r} is not a state dict file; expected .safetensors or .npz.'
  )


def _from_torch_layout(
  state_dict: Mapping[str, Any],
  prefixes: Callable[[Mapping[str, Any]], Iterator[tuple[str, str]]],
  source: str,
  model_kwargs: dict[str, Any],
) -> dict[str, Any]:
  """Converts a torch state dict whose module names `prefixes` gives."""
  model = torchvision_model(**model_kwargs)
  shapes = _variable_shapes(model)
  entries = {}  # torch key: (collection, Flax path, torch shape, to_flax)
  for path, prefix in prefixes(shapes['params']):
    for collection, flax_path, key, to_flax in _layer_entries(path, prefix):
      shape = _torch_shape(_get(shapes[collection], flax_path).shape)
      entries[key] = (collection, flax_path, shape, to_flax)
  found = {
    k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)
  }
  what = f'state dict does not match a {source} MobileNetV2'
  return _assemble(entries, found, what, model)


def _default_classes(state_dict, key: str, model_kwargs) -> None:
  """`num_classes` defaults to the classifier's rows (0 without one)."""
  rows = int(np.shape(state_dict[key])[0]) if key in state_dict else 0
  model_kwargs.setdefault('num_classes', rows)


def from_torchvision(state_dict: Any, **model_kwargs: Any) -> dict[str, Any]:
  """Converts a torchvision-layout MobileNetV2 state dict to Flax variables.

  Args:
    state_dict: torchvision parameter and buffer names mapped to arrays, or
      a `.safetensors` / `.npz` file of them.
    **model_kwargs: `MobileNetV2` fields (at least `width_multiplier` when it
      differs from 1.0; `num_classes` defaults to the classifier's);
      torchvision's numerics (`TORCHVISION_KWARGS`) are the defaults.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of float32 numpy arrays for
    `torchvision_model(**model_kwargs)`.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped entry.
  """
  state_dict = load_state_dict(state_dict)
  _default_classes(state_dict, 'classifier.1.weight', model_kwargs)
  return _from_torch_layout(
    state_dict, _torch_prefixes, 'torchvision', model_kwargs
  )


def from_timm(state_dict: Any, **model_kwargs: Any) -> dict[str, Any]:
  """Converts a timm `mobilenetv2_035` ... `_140` state dict to Flax variables.

  timm's numerics are torchvision's (symmetric padding, BN epsilon 1e-5):
  the model is `torchvision_model(**model_kwargs)`, and inputs follow timm's
  preprocessing (ImageNet mean/std), laid out NHWC.

  Args:
    state_dict: timm parameter and buffer names mapped to arrays, or a
      `.safetensors` (timm's and the Hugging Face Hub's format) or `.npz`
      file of them.
    **model_kwargs: `MobileNetV2` fields (at least `width_multiplier` when it
      differs from 1.0; `num_classes` defaults to the classifier's).

  Returns:
    `{'params': ..., 'batch_stats': ...}` of float32 numpy arrays.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped entry.
  """
  state_dict = load_state_dict(state_dict)
  _default_classes(state_dict, 'classifier.weight', model_kwargs)
  return _from_torch_layout(state_dict, _timm_prefixes, 'timm', model_kwargs)


# ------------------------------------------------------------------ Keras

# keras.applications.MobileNetV2's numerics: TF 'SAME' padding, BN epsilon
# 1e-3 and momentum 0.999, no dropout before the classifier.
KERAS_KWARGS: dict[str, Any] = dict(
  padding='tf', bn_epsilon=1e-3, bn_momentum=0.999, dropout_rate=0.0
)


def keras_model(**kwargs: Any) -> models.MobileNetV2:
  """A MobileNetV2 with Keras's numerics (`KERAS_KWARGS`)."""
  return models.MobileNetV2(**{**KERAS_KWARGS, **kwargs})


# Keras's weights of each kind of layer (the Flax name's last word), in order:
# (Keras name, collection, Flax leaf).
_KERAS_WEIGHTS = {
  'conv': (('kernel', 'params', 'kernel'),),
  'bn': (
    ('gamma', 'params', 'scale'),
    ('beta', 'params', 'bias'),
    ('moving_mean', 'batch_stats', 'mean'),
    ('moving_variance', 'batch_stats', 'var'),
  ),
  'classifier': (('kernel', 'params', 'kernel'), ('bias', 'params', 'bias')),
}


def _keras_layers(params: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
  """Yields (flax layer path, Keras layer name) for every layer."""
  yield 'stem_conv', 'Conv1'
  yield 'stem_bn', 'bn_Conv1'
  blocks = sorted(k for k in params if k.startswith('block_'))
  for i, block in enumerate(blocks):
    prefix = f'block_{i}_' if i else 'expanded_conv_'
    for layer in ('expand', 'depthwise', 'project'):
      if f'{layer}_conv' in params[block]:
        yield f'{block}/{layer}_conv', f'{prefix}{layer}'
        yield f'{block}/{layer}_bn', f'{prefix}{layer}_BN'
  yield 'head_conv', 'Conv_1'
  yield 'head_bn', 'Conv_1_bn'
  if 'classifier' in params:
    yield 'classifier', 'predictions'


def _load_keras(model_or_path: Any, model_kwargs: dict[str, Any]) -> Any:
  """A Keras model from a live model, a `.keras` file or a `.h5` file (a
  whole model, or Keras's weights-only files: built from `model_kwargs`)."""
  if not isinstance(model_or_path, str):
    return model_or_path
  import keras  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(model_or_path):
    raise FileNotFoundError(f'no Keras file at {model_or_path!r}.')
  try:
    return keras.models.load_model(model_or_path, compile=False)
  except (ValueError, OSError, KeyError, TypeError):
    if not model_or_path.endswith('.h5'):
      raise
  # Weights only (keras.applications' downloads): build, then load.
  num_classes = model_kwargs.get('num_classes', 1000)
  model = keras.applications.MobileNetV2(
    alpha=model_kwargs.get('width_multiplier', 1.0),
    include_top=num_classes > 0,
    weights=None,
    classes=num_classes or 1000,
    classifier_activation=None,
  )
  model.load_weights(model_or_path)
  return model


def from_keras(model_or_path: Any, **model_kwargs: Any) -> dict[str, Any]:
  """Converts a `keras.applications.MobileNetV2` to Flax variables.

  Args:
    model_or_path: the Keras model, or a `.keras` / `.h5` file of one.
    **model_kwargs: `MobileNetV2` fields; `width_multiplier` and
      `num_classes` default to the Keras model's (its alpha, and 0 without
      a top), Keras's numerics (`KERAS_KWARGS`) to the rest.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of float32 numpy arrays for
    `keras_model(**model_kwargs)`.

  Raises:
    ValueError: naming every missing, unexpected or mis-shaped layer.
  """
  keras_net = _load_keras(model_or_path, model_kwargs)
  weights = {
    layer.name: [np.asarray(w, np.float32) for w in layer.get_weights()]
    for layer in keras_net.layers
    if layer.get_weights()
  }
  if 'predictions' in weights:
    model_kwargs.setdefault('num_classes', weights['predictions'][1].shape[0])
  else:
    model_kwargs.setdefault('num_classes', 0)
  if 'width_multiplier' not in model_kwargs and 'Conv1' in weights:
    model_kwargs['width_multiplier'] = _keras_alpha(weights)
  model = keras_model(**model_kwargs)
  shapes = _variable_shapes(model)
  entries, names = {}, {}  # names: Keras layer -> its weights' names
  for path, layer in _keras_layers(shapes['params']):
    kind = _KERAS_WEIGHTS[path.rsplit('_')[-1]]
    names[layer] = [name for name, _, _ in kind]
    for name, collection, leaf in kind:
      flax_path = (*path.split('/'), leaf)
      shape, to_flax = _get(shapes[collection], flax_path).shape, np.asarray
      if path.endswith('depthwise_conv'):  # Keras (3, 3, C, 1)
        shape = (*shape[:2], shape[3], shape[2])
        to_flax = functools.partial(np.swapaxes, axis1=2, axis2=3)
      entries[f'{layer}/{name}'] = (collection, flax_path, shape, to_flax)
  found = {}
  for layer, values in weights.items():
    known = names.get(layer, [])
    for i, value in enumerate(values):  # other weights by their index
      found[f'{layer}/{known[i] if i < len(known) else i}'] = value
  what = 'Keras model does not match keras.applications.MobileNetV2'
  return _assemble(entries, found, what, model)


def _keras_alpha(weights: Mapping[str, list[np.ndarray]]) -> float:
  """The published alpha whose channel counts match the Keras weights:
  Keras stores no alpha, but the stem, each block's projection and the head
  tell them apart."""

  def channels(name, default):
    return weights[name][0].shape[-1] if name in weights else default

  projects = [channels('expanded_conv_project', None)] + [
    channels(f'block_{i}_project', None) for i in range(1, 17)
  ]
  found = (channels('Conv1', None), projects, channels('Conv_1', None))
  for alpha in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4):
    model = models.MobileNetV2(width_multiplier=alpha)
    expected = (
      model.stem_channels,
      [c for _, c, _ in model.block_configs()],
      model.head_channels,
    )
    if found == expected:
      return alpha
  raise ValueError(
    f'Keras model: stem, block and head channels {found} match no published '
    'alpha (0.35, 0.5, 0.75, 1.0, 1.3, 1.4); pass width_multiplier=.'
  )
