"""A sweep's points: their workdirs, configs, records and summary.

A point is one training run of a sweep, named by its config argument
('width=0.5,res=24,seed=0') and trained in `<root>/<point name>`. What it
records there (`sweep.json`: its wall time over every attempt and its
error; the run's own `results.json`) is what `point_status` reads back, in
any process: the sweep's, a worker's or a Slurm task's.
"""

import ast
from collections.abc import Callable
import contextlib
import dataclasses
import difflib
import importlib.util
import os
import sys
import time
import traceback
from typing import Any

from absl import logging
import ml_collections

from mnv2_flax import defaults
from mnv2_flax.runtime import files
from mnv2_flax.runtime import hardware
from mnv2_flax.runtime import preemption
from mnv2_flax.runtime import workdir_lock

# JAX, TensorFlow and the training code load in the processes that train
# (`_train`), SciPy with the summary: the sweep's flags and every point's
# config are checked before either.


@dataclasses.dataclass(frozen=True)
class Point:
  arg: str  # 'width=0.5,res=24'
  workdir: str

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)


def point_name(arg: str) -> str:
  """'width=0.5,res=24' -> 'width-0.5_res-24' (a shell-safe directory name)."""
  name = arg.replace('=', '-').replace(',', '_')
  safe = all(c.isalnum() or c in '-_.' for c in name)
  if not name or not safe:
    raise ValueError(f'point argument {arg!r} gives no valid directory name.')
  return name


def load_config_module(path: str):
  """Imports a config file by path, as `ml_collections.config_flags` does."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config: no config file at {path!r}.')
  # A config inside a package (configs/ablation.py imports configs.default)
  # needs the package's parent importable, wherever the command runs from.
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(folder, '__init__.py')):
    parent = os.path.dirname(folder)
    if parent not in sys.path:
      sys.path.insert(0, parent)
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'--config: {path} defines no get_sweep(arg).')
  return module


GPU_DETERMINISTIC = 'train.gpu_deterministic_ops'


def gpu_deterministic_ops(overrides: dict[str, str]) -> bool:
  """Whether the overrides turn on `config.train.gpu_deterministic_ops`:
  a worker sets it before JAX starts, once for all the points it trains
  (the sweep adds the override where a point's config sets it)."""
  if GPU_DETERMINISTIC not in overrides:
    return False
  config = apply_overrides(
    defaults.get_config(), {GPU_DETERMINISTIC: overrides[GPU_DETERMINISTIC]}
  )
  return bool(config.train.gpu_deterministic_ops)


def _field_paths(config, prefix: str = '') -> list[str]:
  """Every field of `config` as a dotted path ('train.num_epochs')."""
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += _field_paths(value, f'{prefix}{key}.')
    else:
      paths.append(f'{prefix}{key}')
  return paths


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, str]
) -> ml_collections.ConfigDict:
  """Sets `{'train.num_epochs': '2'}` on `config`, typed like the default."""
  for key, text in overrides.items():
    *sections, field = key.split('.')
    node = config
    for section in sections:
      node = (
        node.get(section)
        if isinstance(node, dict | ml_collections.ConfigDict)
        else None
      )
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      close = difflib.get_close_matches(key, _field_paths(config), n=1)
      raise ValueError(
        f'--set {key}={text}: the config has no field {key}'
        + (f'; did you mean {close[0]}?' if close else '.')
      )
    kind = node.get_ref(field).get_type()  # a placeholder's type too
    if text == 'None' and node[field] is None:
      value = None
    elif kind is str:
      value = text
    elif kind is bool:
      if text not in ('True', 'False', 'true', 'false'):
        raise ValueError(f'--set {key}={text}: expected True or False.')
      value = text in ('True', 'true')
    elif kind in (int, float):
      try:
        value = kind(text)
      except ValueError:
        raise ValueError(
          f'--set {key}={text}: expected a {kind.__name__}.'
        ) from None
    elif kind in (tuple, list):
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = None
      if not isinstance(value, tuple | list):
        raise ValueError(
          f'--set {key}={text}: expected a tuple, e.g. (40,) or (40, 48).'
        )
      value = tuple(value)  # its items are checked with the config
    else:
      raise ValueError(
        f'--set {key}: a {kind.__name__} field cannot be set here.'
      )
    node[field] = value
  return config


# The status of a point another process holds (another sweep on the root).
RUNNING_ELSEWHERE = 'running elsewhere'


def point_status(point: Point) -> dict[str, Any]:
  """The point's results, wall time and status from its workdir."""
  from mnv2_flax.sweep import summary  # pylint: disable=g-import-not-at-top

  results = files.read_json(os.path.join(point.workdir, 'results.json'))
  sweep = files.read_json(os.path.join(point.workdir, 'sweep.json'))
  row = {k: results.get(k) for k in summary.COLUMNS}
  row['wall_seconds'] = sweep.get('wall_seconds')
  for key in ('at_resolution', 'at_resolution_bn'):
    if results.get(key):  # {test size: metrics}: not a CSV column
      row[key] = results[key]
  if row['wall_seconds'] is not None and row['train_seconds'] is not None:
    # The point's whole cost (its wall time over every attempt) minus
    # training and evaluation.
    row['fixed_seconds'] = (
      row['wall_seconds'] - row['train_seconds'] - (row['eval_seconds'] or 0)
    )
  if results.get('finished'):
    row['status'] = 'finished'
  elif sweep.get('error'):
    row['status'], row['error'] = 'failed', sweep['error']
  elif holder := workdir_lock.in_use_by(point.workdir):
    # Another sweep (or train.py) on this root is training it now.
    row['status'], row['held_by'] = RUNNING_ELSEWHERE, holder
  elif os.path.isdir(os.path.join(point.workdir, 'checkpoints')):
    row['status'] = 'interrupted'
  else:
    row['status'] = 'pending'
  return row


def record(point: Point, wall_seconds: float, error: str | None) -> None:
  path = os.path.join(point.workdir, 'sweep.json')
  previous = files.read_json(path)
  files.write_json(
    path,
    dict(
      arg=point.arg,
      wall_seconds=previous.get('wall_seconds', 0.0) + wall_seconds,
      error=error,
    ),
  )


def point_configs(
  module, points: list[Point], overrides: dict[str, str] | None = None
) -> dict[Point, ml_collections.ConfigDict]:
  """Every point's config, overrides applied and checked: one clear error
  naming the point before anything runs."""
  configs = {}
  for point in points:
    try:
      config = apply_overrides(module.get_config(point.arg), overrides or {})
      defaults.check(config)
    except ValueError as e:
      raise ValueError(f'sweep point {point.arg!r}: {e}') from None
    configs[point] = config
  return configs


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`train_lib.train_and_evaluate`, imported when a point first trains."""
  from mnv2_flax.train import train_lib  # pylint: disable=g-import-not-at-top

  return train_lib.train_and_evaluate(config, workdir)


def train_pack(
  configs: list[ml_collections.ConfigDict], workdirs: list[str]
) -> list[dict | Exception]:
  """`train_lib.train_seeds`, imported when a pack first trains."""
  from mnv2_flax.train import train_lib  # pylint: disable=g-import-not-at-top

  return train_lib.train_seeds(configs, workdirs)


# The point keys a pack's members may differ in: the seed and the train
# step's hyperparameter arguments (configs/ablation.py's names for
# `train.members.MEMBER_FIELDS`). Runs that differ only in them share a program.
MEMBER_KEYS = ('seed', 'lr', 'wd', 'ls', 'ema')


def pack_key(arg: str) -> str:
  """A point's argument without its `MEMBER_KEYS`: what the runs that may
  share a pack (and their compiled programs) have in common."""
  return ','.join(k for k in arg.split(',') if not _member_item(k))


def _member_item(item: str) -> bool:
  """Whether `key=value` is a member's own: not `wd=0` (no decay step in
  the optimizer, whose state then differs from decaying members')."""
  key, _, value = item.partition('=')
  if key == 'wd':
    try:
      return float(value) != 0
    except ValueError:
      return True
  return key in MEMBER_KEYS


def cost(config: ml_collections.ConfigDict) -> float:
  """A run's relative training cost, to order points (not a time).

  Steps x images x width x pixels: the layers that set the step time on the
  CPU (depthwise convs, BatchNorm, activations) and on accelerators (memory
  bound at these sizes) scale with channels x pixels; the 1x1 matmuls grow
  faster with width but are a minority. On 2 CPU cores, w0.75 at 48 px took
  4.9x the step of w0.35 at 32 px (this gives 4.8x; width^2 would give 10x).
  """
  return (
    config.train.num_epochs
    * config.model.width_multiplier
    * config.data.image_size**2
    * (config.model.expand_ratio or 6)
  )


def default_pack() -> int:
  """`--pack`'s default: 0 (all of a point's seeds in one pack) where JAX
  runs on a GPU or TPU, 1 (no packs) on the CPU, where packs were measured
  not to pay (`docs/packs.md`: `make sweep` took 17:38 with packs of 5
  against 9:57 without, 2026-12-04; a pack's working set outgrows the
  cache)."""
  return 0 if hardware.accelerator_expected() else 1


def make_packs(points: list[Point], cap: int = 0) -> list[list[Point]]:
  """`points` grouped into packs: the runs whose arguments are equal but
  for `MEMBER_KEYS` (a point's seeds, and its hyperparameter values), in
  the order of their first point, cut into packs of at most `cap` members
  (0: all of them; 1: one run each)."""
  if cap < 0:
    raise ValueError(
      f'--pack={cap}: expected 0 (all the seeds of a point), 1 (no packs) '
      'or more.'
    )
  groups = {}
  for point in points:
    groups.setdefault(pack_key(point.arg), []).append(point)
  size = cap or max(map(len, groups.values()), default=1)
  return [
    group[i : i + size]
    for group in groups.values()
    for i in range(0, len(group), size)
  ]


def run_pack(
  points: list[Point],
  configs: dict[Point, ml_collections.ConfigDict],
  train_fn: Callable[..., dict] = train,
  train_pack_fn: Callable[..., list] = train_pack,
) -> list[str | None]:
  """Trains (or resumes) the seeds `points` of one point as one pack
  (`train_lib.train_seeds`); records and returns each one's error, if any.

  A point whose workdir another process holds is left to it (None). One
  point left trains as `run_point`. Seeds that cannot resume together
  (saved at different steps) train one after another instead. Each point
  records its share of the pack's wall time.
  """
  if len(points) == 1:
    return [run_point(points[0], configs[points[0]], train_fn)]
  errors = {}
  with contextlib.ExitStack() as held:
    mine = []
    for point in points:
      os.makedirs(point.workdir, exist_ok=True)
      try:
        held.enter_context(workdir_lock.hold(point.workdir))
      except workdir_lock.DirectoryInUseError as e:
        logging.warning('Sweep point %s left alone: %s', point.arg, e)
        errors[point] = None
      else:
        mine.append(point)
    if len(mine) == 1:
      errors[mine[0]] = _run_point(mine[0], configs[mine[0]], train_fn)
    elif mine:
      errors.update(_run_pack(mine, configs, train_fn, train_pack_fn))
  return [errors[p] for p in points]


def _run_pack(points, configs, train_fn, train_pack_fn):
  from mnv2_flax.train import train_lib  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  _enable_compilation_cache(configs[points[0]])
  try:
    results = train_pack_fn(
      [configs[p] for p in points], [p.workdir for p in points]
    )
  except train_lib.PackStartError as e:
    logging.warning('%s One seed at a time instead.', e)
    return {p: _run_point(p, configs[p], train_fn) for p in points}
  except preemption.Stopped:
    _record_shares(points, time.perf_counter() - start, {})
    raise  # saved, not failed: the next run resumes them
  except Exception as e:  # pylint: disable=broad-except
    results = [e] * len(points)
  errors = {}
  for point, result in zip(points, results, strict=True):
    errors[point] = None
    if isinstance(result, Exception):
      errors[point] = _failed(point, result)
  _record_shares(points, time.perf_counter() - start, errors)
  return errors


def _record_shares(points, wall_seconds, errors):
  """Each point of a pack records an equal share of its wall time."""
  for point in points:
    record(point, wall_seconds / len(points), errors.get(point))


def _failed(point: Point, error: Exception) -> str:
  """Logs a point's error and writes its traceback to `error.txt`."""
  text = f'{type(error).__name__}: {error}'
  logging.error('Sweep point %s failed: %s', point.arg, text)
  lines = traceback.format_exception(error)
  with open(os.path.join(point.workdir, 'error.txt'), 'w') as f:
    f.write(''.join(lines))
  return text


def _enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
  if config.train.compilation_cache_dir:
    from mnv2_flax.runtime import compilation_cache  # pylint: disable=g-import-not-at-top

    compilation_cache.enable(config)


def run_point(
  point: Point,
  config: ml_collections.ConfigDict,
  train_fn: Callable[..., dict] = train,
) -> str | None:
  """Trains (or resumes) one point; records and returns its error, if any.

  A point that another process trains (its workdir's lock is held) is left
  to it, nothing written. A signal's `preemption.Stopped` is raised after
  the point's record.
  """
  os.makedirs(point.workdir, exist_ok=True)
  try:
    with workdir_lock.hold(point.workdir):
      return _run_point(point, config, train_fn)
  except workdir_lock.DirectoryInUseError as e:
    logging.warning('Sweep point %s left alone: %s', point.arg, e)
    return None


def _run_point(point, config, train_fn) -> str | None:
  start = time.perf_counter()
  error = None
  try:
    _enable_compilation_cache(config)
    train_fn(config, point.workdir)
  except preemption.Stopped:
    raise  # saved, not failed: the next run resumes it
  except Exception as e:  # pylint: disable=broad-except
    error = _failed(point, e)
  finally:  # an interrupted point keeps its wall time too
    record(point, time.perf_counter() - start, error)
  return error


class Progress:
  """One log line per event: ended (finished, failed, stopped), running, ETA."""

  def __init__(self, total: int, parallel: int = 1):
    self.total, self.parallel = total, parallel
    self.durations, self.failed, self.stopped = [], 0, 0

  def done(self, error: str | None, seconds: float, stopped: bool = False):
    """A run ended: with `error`, failed; `stopped` by a signal, saved to
    resume (its time does not count towards the ETA)."""
    if stopped:
      self.stopped += 1
      return
    self.durations.append(seconds)
    self.failed += error is not None

  def log(self, running: list[Point]) -> None:
    left = self.total - len(self.durations)
    eta = '?'
    if self.durations:
      from mnv2_flax.sweep import summary  # pylint: disable=g-import-not-at-top

      mean = sum(self.durations) / len(self.durations)
      eta = summary.format_duration(mean * left / self.parallel)
    logging.info(
      'Sweep: %d of %d runs ended (%d failed%s); running %s; ETA %s.',
      len(self.durations),
      self.total,
      self.failed,
      f', {self.stopped} stopped to resume' if self.stopped else '',
      ', '.join(p.arg for p in running) or 'none',
      eta,
    )


def make_points(point_args: list[str], root: str) -> list[Point]:
  points = [Point(a, os.path.join(root, point_name(a))) for a in point_args]
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f'the sweep has repeated points: {names}.')
  return points


def _args(arg: str) -> dict[str, str]:
  return dict(item.split('=', 1) for item in arg.split(',') if item)


def summarize(module, point_args: list[str], root: str) -> list[dict]:
  """Writes the summary files (`summary`); returns the run rows."""
  from mnv2_flax.sweep import summary  # pylint: disable=g-import-not-at-top

  os.makedirs(root, exist_ok=True)
  points = make_points(point_args, root)
  keys = []
  for point in points:
    keys += [k for k in _args(point.arg) if k not in keys]
  rows = [
    {**{k: _args(p.arg).get(k, '') for k in keys}, **point_status(p)}
    for p in points
  ]
  published = None
  if any(r.get('data') == 'imagenet' for r in rows):
    published = getattr(module, 'PUBLISHED', None)
  summary.write(rows, keys, root, published)
  return rows
