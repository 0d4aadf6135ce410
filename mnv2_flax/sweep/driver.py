"""The sweep's driver: checks every point's config, then trains the points
not finished (here, in `--parallel` workers, or one shard of them) and
summarises after each.

The command line is `python -m mnv2_flax.sweep` (`__main__.py`, which lists
what a sweep does); `run` is its library entry.
"""

from collections.abc import Callable
import concurrent.futures
import contextlib
import os
import shlex
import signal
import time
from typing import Any

from absl import logging
import ml_collections

from mnv2_flax.runtime import hardware
from mnv2_flax.runtime import preemption
from mnv2_flax.sweep import grid
from mnv2_flax.sweep import workers


def parse_shard(shard: str) -> tuple[int, int]:
  """'1/4' -> (1, 4), checked."""
  index, _, count = shard.partition('/')
  try:
    index, count = int(index), int(count)
  except ValueError:
    index, count = -1, 0
  if not 0 <= index < count:
    raise ValueError(
      f'--shard={shard!r}: expected i/n with 0 <= i < n, e.g. 0/4.'
    )
  return index, count


def run(
  module,
  point_args: list[str],
  root: str,
  overrides: dict[str, str] | None = None,
  shard: tuple[int, int] = (0, 1),
  train_fn: Callable[..., dict] = grid.train,
  parallel: int = 1,
  pack: int | None = None,
) -> list[dict[str, Any]]:
  """Runs this shard's unfinished points; returns the summary's run rows.

  The seeds of a point train as packs of at most `pack` seeds (0: all of
  them; 1: one run at a time, through `train_fn`; None:
  `grid.default_pack()`). With `parallel` > 1
  the packs run in `parallel` worker processes (`python -m mnv2_flax.sweep
  --worker`, train_fn is not used) on `hardware.shares`, each training one
  pack after another.
  """
  start = time.perf_counter()
  points = grid.make_points(point_args, root)
  configs = grid.point_configs(module, points[shard[0] :: shard[1]], overrides)
  todo = [p for p in configs if grid.point_status(p)['status'] != 'finished']
  if pack is None:
    pack = grid.default_pack()
  packs = grid.make_packs(todo, pack)
  largest = max(map(len, packs), default=1)
  logging.info(
    'Sweep: %d runs, %d in this shard, %d to run%s%s.',
    len(points),
    len(configs),
    len(todo),
    f' as {len(packs)} packs of up to {largest} seeds' if largest > 1 else '',
    f', {parallel} at a time' if parallel > 1 else '',
  )
  stopped = None
  if parallel > 1:
    todo_configs = [configs[p] for p in todo]
    with _kernels_built(todo_configs):
      _prepare_datasets(todo_configs)
    if any(c.train.gpu_deterministic_ops for c in configs.values()):
      # Workers set XLA's flag before JAX starts, from their overrides.
      overrides = {**(overrides or {}), grid.GPU_DETERMINISTIC: 'True'}
    stopped = workers.run_workers(
      module,
      packs,
      root,
      overrides or {},
      parallel,
      point_args,
      {grid.pack_key(p.arg): grid.cost(configs[p]) for p in todo},
    )
  else:
    progress = grid.Progress(len(todo))
    for group in packs:
      progress.log(group)
      pack_start = time.perf_counter()
      try:
        errors = grid.run_pack(group, configs, train_fn)
      except preemption.Stopped as e:
        stopped = e.signum
        break
      for error in errors:
        progress.done(error, (time.perf_counter() - pack_start) / len(group))
      grid.summarize(module, point_args, root)
  rows = grid.summarize(module, point_args, root)
  if stopped is not None:
    raise preemption.Stopped(
      stopped,
      f'sweep stopped by {signal.Signals(stopped).name}: the running points '
      f'saved their last step ({tally(rows)}); run the same command again '
      'to resume.',
    )
  logging.info(
    'Sweep done: %d finished, %d failed, %d not run here. Summary: %s',
    sum(r['status'] == 'finished' for r in rows),
    sum(r['status'] == 'failed' for r in rows),
    sum(r['status'] not in ('finished', 'failed') for r in rows),
    os.path.join(root, 'results.md'),
  )
  _log_fixed_cost(rows, todo, time.perf_counter() - start, parallel)
  return rows


def tally(rows: list[dict[str, Any]]) -> str:
  """'18 of 20 runs finished, 1 failed, 1 not finished' (and the runs that
  another process is training: which, by whom)."""
  counts = {}
  for row in rows:
    counts[row['status']] = counts.get(row['status'], 0) + 1
  text = f'{counts.get("finished", 0)} of {len(rows)} runs finished'
  if counts.get('failed'):
    text += f', {counts["failed"]} failed'
  elsewhere = [r for r in rows if r['status'] == grid.RUNNING_ELSEWHERE]
  unfinished = len(rows) - sum(
    counts.get(s, 0) for s in ('finished', 'failed', grid.RUNNING_ELSEWHERE)
  )
  if unfinished:
    text += f', {unfinished} not finished'
  if elsewhere:
    holders = sorted({r['held_by'] for r in elsewhere})
    text += (
      f', {len(elsewhere)} being trained by another process '
      f'({"; ".join(holders)}), whose sweep summarises them when they end'
    )
  return text


def _prepare_datasets(configs: list[ml_collections.ConfigDict]) -> None:
  """Prepares (or checks) each dataset the points read, once, before the
  workers start: two workers preparing one dataset at once collide (tfds
  renames its incomplete directory). A dataset that cannot be prepared is
  left to its points, which record the error."""
  seen = set()
  for config in configs:
    key = tuple(
      config.data[k]
      for k in (
        'name',
        'data_dir',
        'manual_dir',
        'resized_short_side',
        'resized_format',
      )
    )
    if key in seen:
      continue
    seen.add(key)
    from mnv2_flax.data import prepare  # pylint: disable=g-import-not-at-top

    try:
      prepare.get_builder(config)
    except ValueError as e:
      logging.warning('Dataset %s is not ready: %s', config.data.name, e)


@contextlib.contextmanager
def _kernels_built(configs: list[ml_collections.ConfigDict]):
  """Builds the C++ CPU kernels (if missing) in a thread meanwhile, once,
  where the workers will use them: each would otherwise build them at its
  start (28 s on one core)."""
  if hardware.expected_platform() != 'cpu' or not any(
    c.train.cpu_fast_path for c in configs
  ):
    yield
    return
  from mnv2_flax.cpu import kernels  # pylint: disable=g-import-not-at-top

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    built = pool.submit(kernels.build)
    yield
    built.result()


def _log_fixed_cost(rows, todo, wall: float, parallel: int) -> None:
  """How much of this invocation's time went to training and evaluation."""
  del rows
  ran = [grid.point_status(p) for p in todo]
  ran = [r for r in ran if r['status'] == 'finished' and r['train_seconds']]
  if not ran or not wall:
    return
  worked = sum(r['train_seconds'] + (r['eval_seconds'] or 0) for r in ran)
  logging.info(
    'Sweep wall %.0f s with %d worker(s): %.0f s of training and '
    'evaluation in %d runs, %.0f%% of the worker time outside them.',
    wall,
    parallel,
    worked,
    len(ran),
    100 * (1 - worked / (wall * parallel)),
  )


def dry_run_commands(
  config_path: str,
  point_args: list[str],
  root: str,
  overrides: dict[str, str] | None = None,
  shard: tuple[int, int] = (0, 1),
) -> list[str]:
  """One `train.py` command per point of the shard (for a scheduler)."""
  extra = ''.join(
    f' --config.{k}={shlex.quote(v)}' for k, v in (overrides or {}).items()
  )
  return [
    f'python train.py --config={config_path}:{p.arg} --workdir={p.workdir}'
    + extra
    for p in grid.make_points(point_args, root)[shard[0] :: shard[1]]
  ]
