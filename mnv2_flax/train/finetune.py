"""Starts a run from pretrained weights: `config.init_from`.

`init_from` names one of:
- a workdir or one step directory of this project (its EMA parameters with
  `config.init_from_ema`, else the raw ones, and its BN statistics);
- a `keras.applications.MobileNetV2` file (`.keras`, or `.h5` weights of
  the config's width);
- a torchvision or timm MobileNetV2 state dict as `.safetensors` (or
  `.npz`), told apart by its names.

Every parameter and BN statistic of the run's model is loaded from it and
checked by shape; a mismatch stops the run before anything is compiled, with
every entry that differs named. The classifier is re-initialised when its
class count differs from the run's (or the source has none), and so is any
parameter matching the regex `config.init_reset`; both are logged. Only a
fresh run loads: a run that resumes takes its own checkpoint.
"""

import os
import re
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnv2_flax import checkpointing
from mnv2_flax import convert
from mnv2_flax import defaults
from mnv2_flax.runtime import tree_diff

# (padding, bn_epsilon) each source was trained with.
_NUMERICS = {
  'keras': ('tf', 1e-3),
  'torchvision': ('torch', 1e-5),
  'timm': ('torch', 1e-5),
}


class InitFromError(ValueError):
  """`config.init_from` cannot be read or does not fit the run's model."""


def read(
  init_from: str, config: ml_collections.ConfigDict
) -> tuple[str, dict[str, Any], tuple[str, float], str]:
  """(what it is, {'params', 'batch_stats'}, its (padding, bn_epsilon),
  how its model config differs from `config.model`: '' where unknown)."""
  path = os.path.expanduser(init_from)
  where = f'config.init_from={init_from!r}'
  if not os.path.exists(path):
    raise InitFromError(
      f'{where} does not exist; expected {defaults.INIT_FROM_KINDS}.'
    )
  width = config.model.width_multiplier
  try:
    if os.path.isdir(path):
      saved, variables = checkpointing.restore(path)
      which = 'ema_params' if config.init_from_ema else 'params'
      model = defaults.with_defaults(saved).model
      differs = ', '.join(
        f'{k}={model[k]!r} there, {config.model[k]!r} here'
        for k in model
        if k in config.model and model[k] != config.model[k]
      )
      return (
        f'checkpoint of this project ({which})',
        dict(params=variables[which], batch_stats=variables['batch_stats']),
        (model.padding, model.bn_epsilon),
        differs,
      )
    if path.endswith(('.keras', '.h5')):
      kwargs = {} if path.endswith('.keras') else {'width_multiplier': width}
      variables = convert.from_keras(path, **kwargs)
      return 'Keras', variables, _NUMERICS['keras'], ''
    state_dict = convert.load_state_dict(path)
    if 'conv_stem.weight' in state_dict:
      kind, loader = 'timm', convert.from_timm
    elif 'features.0.0.weight' in state_dict:
      kind, loader = 'torchvision', convert.from_torchvision
    else:
      raise InitFromError(
        f'{where} holds neither a timm (conv_stem.weight) nor a torchvision '
        f'(features.0.0.weight) MobileNetV2 state dict; its first names: '
        f'{sorted(state_dict)[:5]}.'
      )
    variables = loader(state_dict, width_multiplier=width)
    return f'{kind} state dict', variables, _NUMERICS[kind], ''
  except InitFromError:
    raise
  except (ValueError, OSError, checkpointing.CheckpointError) as e:
    raise InitFromError(f'{where}: {e}') from None


def _flat(tree) -> dict[str, Any]:
  return {
    '/'.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()
  }


def merge(
  target: dict[str, Any],
  source: dict[str, Any],
  reset: str = '',
  where: str = 'init_from',
  hint: str = '',
) -> tuple[dict[str, Any], list[str]]:
  """`target`'s variables with `source`'s values where they belong.

  Args:
    target: {'params', 'batch_stats'} of the run's model (fresh values).
    source: the same collections read from `init_from`.
    reset: a regex; parameters whose path ('block_01/expand_conv/kernel')
      it matches keep their fresh values.
    where: how errors name the source.
    hint: what else errors should say (how the source's config differs).

  Returns:
    (merged variables, the paths that kept their fresh values).

  Raises:
    InitFromError: naming every entry missing from `source` or of another
      shape, outside the classifier.
  """
  pattern = re.compile(reset) if reset else None
  source_classes = _flat(source['params']).get('classifier/kernel')
  target_classes = _flat(target['params']).get('classifier/kernel')
  swap_head = target_classes is not None and (
    source_classes is None or source_classes.shape != target_classes.shape
  )
  merged, fresh, want, have = {}, [], {}, {}
  for collection in ('params', 'batch_stats'):
    found = _flat(source[collection])
    out = {}
    for path, value in _flat(target[collection]).items():
      if (swap_head and path.startswith('classifier/')) or (
        pattern and pattern.search(path)
      ):
        out[path], _ = value, fresh.append(path)
        continue
      want[f'{collection}/{path}'] = value.shape
      if path in found:
        have[f'{collection}/{path}'] = np.shape(found[path])
        out[path] = jnp.asarray(found[path], value.dtype)
    merged[collection] = traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in out.items()}
    )
  problems = tree_diff.diff(want, have)
  if problems:
    shown = tree_diff.summarize(
      problems, 6, shape='{path} has shape {actual}, this run {expected}'
    )
    hint = f' Its config.model differs: {hint}.' if hint else ''
    raise InitFromError(
      f"{where} does not fit this run's model: {shown}.{hint} Set "
      'config.model (width_multiplier, expand_ratio, ...) to the '
      "pretrained model's."
    )
  return merged, fresh


def load(state: Any, config: ml_collections.ConfigDict) -> Any:
  """`state` (freshly initialised) with the weights of `config.init_from`."""
  what, source, (padding, epsilon), differs = read(config.init_from, config)
  where = f'config.init_from={config.init_from!r} ({what})'
  target = dict(params=state.params, batch_stats=state.batch_stats)
  merged, fresh = merge(target, source, config.init_reset, where, differs)
  loaded = sum(len(_flat(tree)) for tree in merged.values()) - len(fresh)
  logging.info('Initialised from %s: %d arrays loaded.', where, loaded)
  kernel = _flat(source['params']).get('classifier/kernel')
  classes = state.params.get('classifier', {}).get('bias')
  swapped = classes is not None and (
    kernel is None or kernel.shape[-1] != classes.shape[-1]
  )
  if swapped:
    logging.info(
      'Re-initialised the classifier: %s has %s, this run %d classes.',
      what,
      f'{kernel.shape[-1]} classes' if kernel is not None else 'none',
      classes.shape[-1],
    )
  others = [p for p in fresh if not (swapped and p.startswith('classifier/'))]
  if others:
    logging.info('Kept fresh (config.init_reset): %s', ', '.join(others))
  if (config.model.padding, config.model.bn_epsilon) != (padding, epsilon):
    logging.warning(
      '%s was trained with padding=%r, bn_epsilon=%g; this run has '
      'config.model.padding=%r, bn_epsilon=%g: its features start slightly '
      'off. Set them to match unless that is intended.',
      where,
      padding,
      epsilon,
      config.model.padding,
      config.model.bn_epsilon,
    )
  return state.replace(
    params=merged['params'],
    # Distinct buffers: the train step donates both trees.
    ema_params=jax.tree.map(jnp.copy, merged['params']),
    batch_stats=merged['batch_stats'],
    opt_state=state.tx.init(merged['params']),
  )
