"""What a run logs and writes besides checkpoints: train and eval
summaries (TensorBoard events through clu), model statistics, results."""

import dataclasses
import os
import platform
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import jaxlib
import ml_collections
import numpy as np

from mnv2_flax import models
from mnv2_flax import stats
from mnv2_flax.cpu import kernels
from mnv2_flax.runtime import files

RESULTS_FILE = 'results.json'
MODEL_STATS_FILE = 'model_stats.json'


def write_json(path: str, data: dict[str, Any]) -> None:
  """`files.write_json` on process 0 only (the workdir is shared)."""
  if jax.process_index() == 0:
    files.write_json(path, data)


def create_writer(config: ml_collections.ConfigDict, workdir: str, step: int):
  """clu's writer (TensorBoard events on process 0, logs elsewhere); a
  fresh run (`step` 0) records the config's fields as hyperparameters."""
  # clu's writers import TensorFlow: here, not at the top of the module.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0
  )
  if step == 0:
    writer.write_hparams(flat_config(config))
  return writer


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's scalar fields, 'model.width_multiplier': 0.5, ..."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {
    k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))
  }


# By (the module's fields, resolution): a sweep worker's seeds of a point
# count one network (about 1 s of tracing a run on one core).
_COUNTS = {}


def _count(model: models.MobileNetV2, image_size: int) -> stats.ModelStats:
  key = (
    tuple(
      (f.name, getattr(model, f.name))
      for f in dataclasses.fields(model)
      if f.name not in ('parent', 'name')
    ),
    image_size,
  )
  if key not in _COUNTS:
    _COUNTS[key] = stats.count(model, image_size)
  return _COUNTS[key]


def write_model_stats(
  config: ml_collections.ConfigDict,
  model: models.MobileNetV2,
  num_classes: int,
  workdir: str,
) -> dict[str, Any]:
  """Parameter and MAC counts, logged and written to model_stats.json."""
  counts = _count(model.clone(bn_axis_name=None), config.data.image_size)
  logging.info(
    'Model: %s parameters, %s MACs per image',
    f'{counts.params:,}',
    f'{counts.macs:,}',
  )
  model_stats = dict(
    counts.as_dict(),
    num_classes=num_classes,
    image_size=config.data.image_size,
    width_multiplier=config.model.width_multiplier,
  )
  write_json(os.path.join(workdir, MODEL_STATS_FILE), model_stats)
  return model_stats


def per_step(metrics: list[dict]) -> list[dict]:
  """Host copies of `metrics`, one dict of floats per step (the programs of
  several steps return each metric stacked)."""
  out = []
  for m in jax.device_get(metrics):
    if np.ndim(m['loss']) == 0:
      out.append({k: float(v) for k, v in m.items()})
    else:
      out += [
        {k: float(v[i]) for k, v in m.items()} for i in range(len(m['loss']))
      ]
  return out


def log_train(
  writer, metrics, step, num_steps, steps_per_epoch, name: str = ''
) -> None:
  """Writes and logs the means of `metrics` (the steps since the last log);
  `name` prefixes the log line (a seed of a pack: 'seed 3: ')."""
  summary = {
    k: float(np.mean([m[k] for m in metrics]))
    for k in metrics[0]
    if k != 'finite'
  }
  writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
  logging.info(
    '%sstep %d/%d epoch %.2f loss %.4f acc %.4f lr %.4g',
    name,
    step,
    num_steps,
    step / steps_per_epoch,
    summary['loss'],
    summary['accuracy'],
    summary['learning_rate'],
  )


# results.json and eval logs: metrics of config.data.minival_split.
MINIVAL = 'minival_'


def log_eval(writer, step: int, metrics: dict[str, float], name: str = ''):
  """TensorBoard's eval/* (the eval split) and minival/* (held out of
  train), and one log line."""
  minival = {
    k[len(MINIVAL) :]: v for k, v in metrics.items() if k.startswith(MINIVAL)
  }
  metrics = {k: v for k, v in metrics.items() if not k.startswith(MINIVAL)}
  writer.write_scalars(
    step,
    {f'eval/{k}': v for k, v in metrics.items()}
    | {f'minival/{k}': v for k, v in minival.items()},
  )
  flip = (
    f'; flip-averaged top1 {metrics["flip_top1"]:.4f} '
    f'(EMA {metrics["ema_flip_top1"]:.4f})'
    if 'flip_top1' in metrics
    else ''
  )
  if minival:
    flip += (
      f'; minival top1 {minival["top1"]:.4f} (EMA {minival["ema_top1"]:.4f}) '
      f'on {minival["num_examples"]:.0f} held-out examples'
    )
  logging.info(
    '%seval step %d: top1 %.4f top5 %.4f (EMA top1 %.4f) on %d examples%s',
    name,
    step,
    metrics['top1'],
    metrics['top5'],
    metrics['ema_top1'],
    metrics['num_examples'],
    flip,
  )


def bits_depend_on() -> dict[str, str]:
  """What a run's bits depend on besides its config and seed, for
  results.json: the software, the processor XLA compiled for, the devices
  and XLA's flags. On the CPU, not the thread count."""
  device = jax.local_devices()[0]
  out = dict(
    jax=jax.__version__,
    jaxlib=jaxlib.__version__,
    backend=jax.default_backend(),
    device_kind=device.device_kind,
    devices=str(jax.device_count()),
    processes=str(jax.process_count()),
    xla_flags=os.environ.get('XLA_FLAGS', ''),
  )
  if out['backend'] == 'cpu':
    out['cpu'] = _cpu_model() or platform.processor()
    out['cpu_kernels'] = 'built' if kernels.available() else 'pure JAX'
  return out


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''
