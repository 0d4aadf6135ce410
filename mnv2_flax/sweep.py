"""Runs a sweep of training runs, resumably, and summarises it.

  python -m mnv2_flax.sweep --config=configs/ablation.py:fashion_mnist \
      --root=sweeps/fashion_mnist [--parallel=N | --shard=i/n |
      --submit=slurm --submit_params=...] [--dry_run] [--summarize_only]
      [--pack=N] [--set=train.num_epochs=2 ...]

The config file provides `get_sweep(arg) -> [point arg, ...]` and
`get_config(point arg)`; a point's `seed=N` key marks its seed. Every point
trains in `<root>/<point name>` through the same
`train_lib.train_and_evaluate` as `train.py`:

- every point's config is built and checked before anything runs;
- a point whose `results.json` says `finished` is skipped; one with
  checkpoints resumes from them; a point that fails has its error recorded
  (`<workdir>/error.txt` and the summary) and the sweep goes on;
- on a GPU or TPU the seeds of a point train together as one program, a
  pack (`train_lib.train_seeds`: the same files and results as one seed at
  a time); `--pack=N` caps a pack at N seeds (memory), `--pack=1` trains
  one seed at a time (the default on the CPU, where packs were slower),
  `--pack=0` packs all of a point's seeds;
- `--parallel=N` runs N worker processes, each on its share of the devices
  (GPUs through CUDA_VISIBLE_DEVICES, on the CPU a share of the cores); a
  worker trains one pack after another in the same process (imports, JAX
  start-up and the compilation cache paid once) and writes its log to its
  first point's `<workdir>/log.txt`; a worker that crashes has its points
  recorded as failed (retried by the next run) and is replaced;
- `--shard=i/n` runs points i, i+n, i+2n, ... so n machines split a sweep;
- `--submit=slurm` submits the unfinished points as one Slurm array job
  (submitit; `--submit=local` runs them as local processes), one task per
  pack, waits for it and summarises; rerunning the command
  resubmits what is not finished;
- after every point, and with `--summarize_only`, the root gets the summary
  of `mnv2_flax.summary`: seeds pooled into means and 95% intervals, paired
  comparisons, tables and a figure.
"""

from collections.abc import Callable
import concurrent.futures
import contextlib
import os
import shlex
import signal
import time
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from mnv2_flax import cli
from mnv2_flax import hardware
from mnv2_flax import preemption
from mnv2_flax import sweep_points
from mnv2_flax import sweep_submit
from mnv2_flax import sweep_workers


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
  train_fn: Callable[..., dict] = sweep_points.train,
  parallel: int = 1,
  pack: int | None = None,
) -> list[dict[str, Any]]:
  """Runs this shard's unfinished points; returns the summary's run rows.

  The seeds of a point train as packs of at most `pack` seeds (0: all of
  them; 1: one run at a time, through `train_fn`; None:
  `sweep_points.default_pack()`). With `parallel` > 1
  the packs run in `parallel` worker processes (`python -m mnv2_flax.sweep
  --worker`, train_fn is not used) on `hardware.shares`, each training one
  pack after another.
  """
  start = time.perf_counter()
  points = sweep_points.make_points(point_args, root)
  configs = sweep_points.point_configs(
    module, points[shard[0] :: shard[1]], overrides
  )
  todo = [
    p for p in configs if sweep_points.point_status(p)['status'] != 'finished'
  ]
  if pack is None:
    pack = sweep_points.default_pack()
  packs = sweep_points.make_packs(todo, pack)
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
      overrides = {**(overrides or {}), sweep_points.GPU_DETERMINISTIC: 'True'}
    stopped = sweep_workers.run_workers(
      module,
      packs,
      root,
      overrides or {},
      parallel,
      point_args,
      {
        sweep_points.seedless(p.arg): sweep_points.cost(configs[p])
        for p in todo
      },
    )
  else:
    progress = sweep_points.Progress(len(todo))
    for group in packs:
      progress.log(group)
      pack_start = time.perf_counter()
      try:
        errors = sweep_points.run_pack(group, configs, train_fn)
      except preemption.Stopped as e:
        stopped = e.signum
        break
      for error in errors:
        progress.done(error, (time.perf_counter() - pack_start) / len(group))
      sweep_points.summarize(module, point_args, root)
  rows = sweep_points.summarize(module, point_args, root)
  if stopped is not None:
    raise preemption.Stopped(
      stopped,
      f'sweep stopped by {signal.Signals(stopped).name}: the running points '
      f'saved their last step ({_tally(rows)}); run the same command again '
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


def _tally(rows: list[dict[str, Any]]) -> str:
  """'18 of 20 runs finished, 1 failed, 1 not finished' (and the runs that
  another process is training: which, by whom)."""
  counts = {}
  for row in rows:
    counts[row['status']] = counts.get(row['status'], 0) + 1
  text = f'{counts.get("finished", 0)} of {len(rows)} runs finished'
  if counts.get('failed'):
    text += f', {counts["failed"]} failed'
  elsewhere = [r for r in rows if r['status'] == sweep_points.RUNNING_ELSEWHERE]
  unfinished = len(rows) - sum(
    counts.get(s, 0)
    for s in ('finished', 'failed', sweep_points.RUNNING_ELSEWHERE)
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
    key = (config.data.name, config.data.data_dir, config.data.manual_dir)
    if key in seen:
      continue
    seen.add(key)
    from mnv2_flax import input_pipeline  # pylint: disable=g-import-not-at-top

    try:
      input_pipeline.get_builder(config)
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
  ran = [sweep_points.point_status(p) for p in todo]
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
    for p in sweep_points.make_points(point_args, root)[shard[0] :: shard[1]]
  ]


# ------------------------------------------------------------------------ CLI


def main(argv):
  del argv
  if _PARALLEL.value < 1:
    raise ValueError(f'--parallel={_PARALLEL.value}: expected 1 or more.')
  if _PARALLEL.value > 1 and (_SUBMIT.value or _WORKER.value):
    raise ValueError('--parallel runs points here; not with --submit/--worker.')
  path, _, sweep_arg = _CONFIG.value.partition(':')
  module = sweep_points.load_config_module(path)
  overrides = dict(s.split('=', 1) if '=' in s else (s, '') for s in _SET.value)
  if _WORKER.value:  # a --parallel worker: the points come on stdin
    sweep_workers.work(module, _ROOT.value, overrides)
    return
  point_args = module.get_sweep(sweep_arg or None)
  shard = parse_shard(_SHARD.value)
  configs = sweep_points.point_configs(
    module, sweep_points.make_points(point_args, _ROOT.value), overrides
  )
  required = any(c.train.require_accelerator for c in configs.values())
  if _DRY_RUN.value:
    for command in dry_run_commands(
      path, point_args, _ROOT.value, overrides, shard
    ):
      print(command)
    return
  if _SUMMARIZE_ONLY.value:
    rows = sweep_points.summarize(module, point_args, _ROOT.value)
  elif _SUBMIT.value:
    if _SUBMIT.value not in ('slurm', 'local'):
      raise ValueError(f'--submit={_SUBMIT.value!r}: valid are slurm or local.')
    rows = sweep_submit.submit(
      module,
      point_args,
      _ROOT.value,
      overrides,
      _SUBMIT.value,
      sweep_submit.parse_params(_SUBMIT_PARAMS.value),
      pack=_PACK.value,
    )
  else:
    if _PARALLEL.value > 1:
      # This process leaves the devices to its workers: no JAX here.
      hardware.shares(_PARALLEL.value)  # checked before anything runs
      if required and not hardware.accelerator_expected():
        raise hardware.AcceleratorMissingError(
          'config.train.require_accelerator=True, but no GPU or TPU is '
          f'expected here; {hardware.INSTALL}.'
        )
    else:
      cli.start_jax(
        gpu_deterministic_ops=any(
          c.train.gpu_deterministic_ops for c in configs.values()
        )
      )
      hardware.check_accelerator(required)
    rows = run(
      module,
      point_args,
      _ROOT.value,
      overrides,
      shard,
      parallel=_PARALLEL.value,
      pack=_PACK.value,
    )
  from mnv2_flax import summary  # pylint: disable=g-import-not-at-top

  keys = [k for k in rows[0] if k not in summary.COLUMNS] if rows else []
  if rows:
    print(summary.points_table(summary.group(rows, keys)))
  # The last line says whether every run finished, and so does the status.
  # (rows are in the sweep's order; this command's are its shard's)
  mine = (
    rows
    if _SUBMIT.value or _SUMMARIZE_ONLY.value
    else rows[shard[0] :: shard[1]]
  )
  results = os.path.join(_ROOT.value, 'results.md')
  if all(
    r['status'] in ('finished', sweep_points.RUNNING_ELSEWHERE) for r in mine
  ):
    # Two sweeps on one root share its points: nothing failed here.
    print(f'{_tally(mine)}; summary: {results}')
  else:
    cli.fail(
      f'{_tally(mine)}; the same command retries and resumes the others. '
      f'Summary and errors: {results}'
    )


if __name__ == '__main__':
  # Flags live here so that importing the library (a submitit job does)
  # defines none.
  _CONFIG = flags.DEFINE_string('config', None, 'path/to/config.py:sweep_arg')
  _ROOT = flags.DEFINE_string(
    'root', None, 'Directory of the sweep (one workdir per point).'
  )
  _SHARD = flags.DEFINE_string('shard', '0/1', 'i/n: run points i, i+n, ...')
  _PARALLEL = flags.DEFINE_integer(
    'parallel', 1, 'Worker processes, each training one point at a time.'
  )
  _PACK = flags.DEFINE_integer(
    'pack',
    None,
    'The most seeds of a point trained together as one program (a pack); '
    '0: all of them; 1: one at a time; default: 0 on a GPU or TPU, 1 on '
    'the CPU.',
  )
  _SUBMIT = flags.DEFINE_string(
    'submit', '', "'slurm' (one array job via submitit) or 'local'."
  )
  _SUBMIT_PARAMS = flags.DEFINE_string(
    'submit_params',
    '',
    'submitit parameters, e.g. timeout_min=240,slurm_partition=gpu,'
    'gpus_per_node=1,cpus_per_task=8,slurm_array_parallelism=16.',
  )
  _WORKER = flags.DEFINE_bool(
    'worker',
    False,
    'Train the point arguments read from stdin, one per line, in this '
    'process (how --parallel runs its workers).',
  )
  _DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print one train.py command per point.'
  )
  _SUMMARIZE_ONLY = flags.DEFINE_bool(
    'summarize_only', False, 'Only write the summaries.'
  )
  _SET = flags.DEFINE_multi_string(
    'set', [], 'key=value config override for every point.'
  )
  flags.mark_flags_as_required(['config', 'root'])
  cli.run(main)
