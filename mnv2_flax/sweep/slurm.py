"""Sweeps on Slurm (or submitit's local executor): one array job.

`python -m mnv2_flax.sweep ... --submit=slurm` submits the unfinished points
as one array job of one task per point and its seeds (trained in packs,
`grid.make_packs`), waits for it and summarises.
"""

import os
import signal
import time
from typing import Any

from absl import logging

from mnv2_flax import cli
from mnv2_flax.runtime import files
from mnv2_flax.runtime import preemption
from mnv2_flax.sweep import grid

SUBMITIT = (
  'submitit is not installed: `make setup-slurm` '
  '(pip install -r requirements-slurm.txt)'
)


class PointTask:
  """The seeds of a point as one submitit job, trained in packs of at most
  `pack` seeds (`grid.run_pack`) one after another in its process:
  picklable (the config file's path, not the module) and requeued where
  Slurm preempts or times it out (`checkpoint`); the rerun skips finished
  points and resumes the others from their checkpoints."""

  def __init__(
    self,
    config_path: str,
    root: str,
    overrides: dict[str, str],
    pack: int | None = None,
  ):
    self.config_path, self.root, self.overrides = config_path, root, overrides
    self.pack = pack

  def __call__(self, point_args: list[str]) -> list[str | None]:
    logging.set_verbosity(logging.INFO)  # the task's log: as train.py's
    module = grid.load_config_module(self.config_path)
    points = [
      grid.Point(a, os.path.join(self.root, grid.point_name(a)))
      for a in point_args
    ]
    configs = grid.point_configs(module, points, self.overrides)
    cli.start_jax(
      gpu_deterministic_ops=any(
        c.train.gpu_deterministic_ops for c in configs.values()
      )
    )
    todo = [p for p in points if grid.point_status(p)['status'] != 'finished']
    errors = dict.fromkeys(points)
    try:
      cap = self.pack
      if cap is None:  # decided where the task runs (a GPU node, ...)
        cap = grid.default_pack()
      for pack in grid.make_packs(todo, cap):
        errors.update(zip(pack, grid.run_pack(pack, configs), strict=True))
    except preemption.Stopped as stop:
      # The points are saved. Now submitit's own handler of the signal: on
      # SIGUSR2 it checkpoints this task and requeues it (and exits), on
      # SIGTERM it does nothing; the requeued task resumes the points.
      logging.warning('%s', stop)
      handler = signal.getsignal(stop.signum)
      if callable(handler):
        handler(stop.signum, None)
    return [errors[p] for p in points]

  def checkpoint(self, *args, **kwargs):
    import submitit  # pylint: disable=g-import-not-at-top

    return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _job_alive(submitit, root: str, cluster: str, job_id: str) -> bool:
  """Whether a job submitted earlier is still queued or running."""
  if cluster == 'local':  # a local job's id is its process id
    try:
      os.kill(int(job_id), 0)
    except (OSError, ValueError):
      return False
    return True
  job = submitit.SlurmJob(
    folder=os.path.join(root, 'submitit', '%j'), job_id=job_id
  )
  return not job.done()


def submit(
  module,
  point_args: list[str],
  root: str,
  overrides: dict[str, str],
  cluster: str,
  params: dict[str, Any],
  poll_seconds: float = 10.0,
  pack: int | None = None,
) -> list[dict[str, Any]]:
  """Submits the unfinished points as one array job, waits, summarises.

  `cluster` is 'slurm' or 'local' (submitit's local executor: real
  processes on this host); `params` go to `executor.update_parameters`
  (timeout_min, slurm_partition, gpus_per_node, cpus_per_task,
  slurm_array_parallelism, ...). Job ids are kept in
  `<root>/submitit/jobs.json`: a rerun submits only points that are
  neither finished nor still queued or running, and waits for all of them.
  A task trains a point's seeds in packs of at most `pack` (0: all; None:
  `grid.default_pack()`).
  """
  try:
    import submitit  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f'--submit={cluster}: {SUBMITIT}.') from None
  points = grid.make_points(point_args, root)
  grid.point_configs(module, points, overrides)
  registry = os.path.join(root, 'submitit', 'jobs.json')
  earlier = files.read_json(registry)
  waiting = {}  # point: a function that says whether its job is done
  for point in points:
    job_id = earlier.get(point.arg)
    if job_id and _job_alive(submitit, root, cluster, job_id):
      logging.info('Sweep point %s is still job %s.', point.arg, job_id)
      waiting[point] = lambda j=job_id: (
        not _job_alive(submitit, root, cluster, j)
      )
  todo = [
    p
    for p in points
    if p not in waiting and grid.point_status(p)['status'] != 'finished'
  ]
  jobs = []
  if todo:
    executor = submitit.AutoExecutor(
      folder=os.path.join(root, 'submitit', '%j'), cluster=cluster
    )
    try:
      executor.update_parameters(
        name=f'mnv2_sweep_{os.path.basename(os.path.abspath(root))}',
        **params,
      )
    except (ValueError, TypeError, NameError, AssertionError) as e:
      raise ValueError(
        f'--submit_params: {str(e).splitlines()[0]} Shared parameters: '
        'timeout_min, cpus_per_task, gpus_per_node, mem_gb, nodes, '
        'tasks_per_node; Slurm ones start with slurm_ (slurm_partition, '
        'slurm_array_parallelism, ...).'
      ) from None
    task = PointTask(os.path.abspath(module.__file__), root, overrides, pack)
    groups = grid.make_packs(todo, 0)  # a task per point
    jobs = executor.map_array(task, [[p.arg for p in g] for g in groups])
    for group, job in zip(groups, jobs, strict=True):
      earlier.update({p.arg: job.job_id for p in group})
      waiting.update({p: job.done for p in group})
    files.write_json(registry, earlier)
    logging.info(
      'Submitted %d runs to %s as array job %s of %d tasks; logs in %s.',
      len(todo),
      cluster,
      jobs[0].job_id.split('_')[0],
      len(jobs),
      os.path.dirname(registry),
    )
  seen = -1
  while True:
    done = sum(is_done() for is_done in waiting.values())
    if done != seen:
      logging.info('Sweep: %d of %d jobs done.', done, len(waiting))
      seen = done
    if done == len(waiting):
      break
    time.sleep(poll_seconds)
  for job, group in zip(jobs, groups if jobs else [], strict=True):
    if job.exception() is None:
      continue
    for point in group:  # what the task could not record itself
      if grid.point_status(point)['status'] in (
        'pending',
        'interrupted',
      ):
        error = f'job {job.job_id} {job.state}: see {job.paths.stderr}'
        logging.error('Sweep point %s failed: %s', point.arg, error)
        grid.record(point, 0.0, error)
  return grid.summarize(module, point_args, root)


def parse_params(text: str) -> dict[str, Any]:
  """'timeout_min=60,slurm_partition=gpu' -> typed keyword arguments."""
  params = {}
  for item in filter(None, (i.strip() for i in text.split(','))):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(
        f'--submit_params: {item!r} is not key=value (e.g. timeout_min=60).'
      )
    for kind in (int, float):
      try:
        value = kind(value)
        break
      except ValueError:
        pass
    params[key.strip()] = value
  return params
