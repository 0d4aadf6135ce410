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
  of `mnv2_flax.sweep.summary`:
  seeds pooled into means and 95% intervals, paired
  comparisons, tables and a figure.
"""

import os

from absl import flags

from mnv2_flax import cli
from mnv2_flax.runtime import hardware
from mnv2_flax.sweep import driver
from mnv2_flax.sweep import grid
from mnv2_flax.sweep import slurm
from mnv2_flax.sweep import workers


def main(argv):
  del argv
  if _PARALLEL.value < 1:
    raise ValueError(f'--parallel={_PARALLEL.value}: expected 1 or more.')
  if _PARALLEL.value > 1 and (_SUBMIT.value or _WORKER.value):
    raise ValueError('--parallel runs points here; not with --submit/--worker.')
  path, _, sweep_arg = _CONFIG.value.partition(':')
  module = grid.load_config_module(path)
  overrides = dict(s.split('=', 1) if '=' in s else (s, '') for s in _SET.value)
  if _WORKER.value:  # a --parallel worker: the points come on stdin
    workers.work(module, _ROOT.value, overrides)
    return
  point_args = module.get_sweep(sweep_arg or None)
  shard = driver.parse_shard(_SHARD.value)
  configs = grid.point_configs(
    module, grid.make_points(point_args, _ROOT.value), overrides
  )
  required = any(c.train.require_accelerator for c in configs.values())
  if _DRY_RUN.value:
    for command in driver.dry_run_commands(
      path, point_args, _ROOT.value, overrides, shard
    ):
      print(command)
    return
  if _SUMMARIZE_ONLY.value:
    rows = grid.summarize(module, point_args, _ROOT.value)
  elif _SUBMIT.value:
    if _SUBMIT.value not in ('slurm', 'local'):
      raise ValueError(f'--submit={_SUBMIT.value!r}: valid are slurm or local.')
    rows = slurm.submit(
      module,
      point_args,
      _ROOT.value,
      overrides,
      _SUBMIT.value,
      slurm.parse_params(_SUBMIT_PARAMS.value),
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
    rows = driver.run(
      module,
      point_args,
      _ROOT.value,
      overrides,
      shard,
      parallel=_PARALLEL.value,
      pack=_PACK.value,
    )

  from mnv2_flax.sweep import summary  # pylint: disable=g-import-not-at-top
  from mnv2_flax.sweep import verdicts  # pylint: disable=g-import-not-at-top

  keys = [k for k in rows[0] if k not in summary.COLUMNS] if rows else []
  if rows:
    print(summary.points_table(verdicts.group(rows, keys)))
  # The last line says whether every run finished, and so does the status.
  # (rows are in the sweep's order; this command's are its shard's)
  mine = (
    rows
    if _SUBMIT.value or _SUMMARIZE_ONLY.value
    else rows[shard[0] :: shard[1]]
  )
  results = os.path.join(_ROOT.value, 'results.md')
  if all(r['status'] in ('finished', grid.RUNNING_ELSEWHERE) for r in mine):
    # Two sweeps on one root share its points: nothing failed here.
    print(f'{driver.tally(mine)}; summary: {results}')
  else:
    cli.fail(
      f'{driver.tally(mine)}; the same command retries and resumes the others. '
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
    'The most runs trained together as one program (a pack): runs that '
    'differ only in seed=, lr=, wd=, ls= or ema= (the seeds of a point and '
    'its hyperparameter values); 0: all of them; 1: one at a time; '
    'default: 0 on a GPU or TPU, 1 on the CPU.',
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
