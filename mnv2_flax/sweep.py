"""Runs a sweep of training runs, resumably, and summarises it.

  python -m mnv2_flax.sweep --config=configs/ablation.py:fashion_mnist \
      --root=sweeps/fashion_mnist [--parallel=N | --shard=i/n |
      --submit=slurm --submit_params=...] [--dry_run] [--summarize_only]
      [--set=train.num_epochs=2 ...]

The config file provides `get_sweep(arg) -> [point arg, ...]` and
`get_config(point arg)`; a point's `seed=N` key marks its seed. Every point
trains in `<root>/<point name>` through the same
`train_lib.train_and_evaluate` as `train.py`:

- every point's config is built and checked before anything runs;
- a point whose `results.json` says `finished` is skipped; one with
  checkpoints resumes from them; a point that fails has its error recorded
  (`<workdir>/error.txt` and the summary) and the sweep goes on;
- `--parallel=N` runs N worker processes, each on its share of the devices
  (GPUs through CUDA_VISIBLE_DEVICES, on the CPU a share of the cores); a
  worker trains one point after another in the same process (imports, JAX
  start-up and the compilation cache paid once) and writes each point's
  log to `<workdir>/log.txt`; a worker that crashes has its point recorded
  as failed (retried by the next run) and is replaced;
- `--shard=i/n` runs points i, i+n, i+2n, ... so n machines split a sweep;
- `--submit=slurm` submits the unfinished points as one Slurm array job
  (submitit; `--submit=local` runs them as local processes), one task per
  point and its seeds, waits for it and summarises; rerunning the command
  resubmits what is not finished;
- after every point, and with `--summarize_only`, the root gets the summary
  of `mnv2_flax.summary`: seeds pooled into means and 95% intervals, paired
  comparisons, tables and a figure.
"""

from collections.abc import Callable
import dataclasses
import importlib.util
import os
import select
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from mnv2_flax import cli
from mnv2_flax import defaults
from mnv2_flax import files
from mnv2_flax import hardware

# JAX, TensorFlow and the training code load in the processes that train
# (`_train`), SciPy with the summary: the sweep's flags and every point's
# config are checked before either.
SUBMITIT = (
  'submitit is not installed: `make setup-slurm` '
  '(pip install -r requirements-slurm.txt)'
)


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
      raise ValueError(f'--set {key}={text}: the config has no field {key}.')
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
    else:
      raise ValueError(
        f'--set {key}: a {kind.__name__} field cannot be set here.'
      )
    node[field] = value
  return config


def point_status(point: Point) -> dict[str, Any]:
  """The point's results, wall time and status from its workdir."""
  from mnv2_flax import summary  # pylint: disable=g-import-not-at-top

  results = files.read_json(os.path.join(point.workdir, 'results.json'))
  sweep = files.read_json(os.path.join(point.workdir, 'sweep.json'))
  row = {k: results.get(k) for k in summary.COLUMNS}
  row['wall_seconds'] = sweep.get('wall_seconds')
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
  elif os.path.isdir(os.path.join(point.workdir, 'checkpoints')):
    row['status'] = 'interrupted'
  else:
    row['status'] = 'pending'
  return row


def _record(point: Point, wall_seconds: float, error: str | None) -> None:
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


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`train_lib.train_and_evaluate`, imported when a point first trains."""
  from mnv2_flax import train_lib  # pylint: disable=g-import-not-at-top

  return train_lib.train_and_evaluate(config, workdir)


def run_point(
  point: Point,
  config: ml_collections.ConfigDict,
  train_fn: Callable[..., dict] = _train,
) -> str | None:
  """Trains (or resumes) one point; records and returns its error, if any."""
  os.makedirs(point.workdir, exist_ok=True)
  start = time.perf_counter()
  error = None
  try:
    if config.train.compilation_cache_dir:
      from mnv2_flax import compilation_cache  # pylint: disable=g-import-not-at-top

      compilation_cache.enable(config)
    train_fn(config, point.workdir)
  except Exception as e:  # pylint: disable=broad-except
    error = f'{type(e).__name__}: {e}'
    logging.error('Sweep point %s failed: %s', point.arg, error)
    with open(os.path.join(point.workdir, 'error.txt'), 'w') as f:
      f.write(traceback.format_exc())
  finally:  # an interrupted point keeps its wall time too
    _record(point, time.perf_counter() - start, error)
  return error


class _Progress:
  """One log line per event: done, failed, running, ETA."""

  def __init__(self, total: int, parallel: int = 1):
    self.total, self.parallel = total, parallel
    self.durations, self.failed = [], 0

  def done(self, error: str | None, seconds: float) -> None:
    self.durations.append(seconds)
    self.failed += error is not None

  def log(self, running: list[Point]) -> None:
    left = self.total - len(self.durations)
    eta = '?'
    if self.durations:
      from mnv2_flax import summary  # pylint: disable=g-import-not-at-top

      mean = sum(self.durations) / len(self.durations)
      eta = summary.format_duration(mean * left / self.parallel)
    logging.info(
      'Sweep: %d of %d runs done (%d failed); running %s; ETA %s.',
      len(self.durations),
      self.total,
      self.failed,
      ', '.join(p.arg for p in running) or 'none',
      eta,
    )


def run(
  module,
  point_args: list[str],
  root: str,
  overrides: dict[str, str] | None = None,
  shard: tuple[int, int] = (0, 1),
  train_fn: Callable[..., dict] = _train,
  parallel: int = 1,
) -> list[dict[str, Any]]:
  """Runs this shard's unfinished points; returns the summary's run rows.

  With `parallel` > 1 the points run in `parallel` worker processes
  (`python -m mnv2_flax.sweep --worker`, train_fn is not used) on
  `hardware.shares`, each training one point after another.
  """
  start = time.perf_counter()
  points = make_points(point_args, root)
  configs = point_configs(module, points[shard[0] :: shard[1]], overrides)
  todo = [p for p in configs if point_status(p)['status'] != 'finished']
  logging.info(
    'Sweep: %d runs, %d in this shard, %d to run%s.',
    len(points),
    len(configs),
    len(todo),
    f', {parallel} at a time' if parallel > 1 else '',
  )
  if parallel > 1:
    _run_workers(module, todo, root, overrides or {}, parallel, point_args)
  else:
    progress = _Progress(len(todo))
    for point in todo:
      progress.log([point])
      start = time.perf_counter()
      error = run_point(point, configs[point], train_fn)
      progress.done(error, time.perf_counter() - start)
      summarize(module, point_args, root)
  rows = summarize(module, point_args, root)
  logging.info(
    'Sweep done: %d finished, %d failed, %d not run here. Summary: %s',
    sum(r['status'] == 'finished' for r in rows),
    sum(r['status'] == 'failed' for r in rows),
    sum(r['status'] in ('pending', 'interrupted') for r in rows),
    os.path.join(root, 'results.md'),
  )
  _log_fixed_cost(rows, todo, time.perf_counter() - start, parallel)
  return rows


def _log_fixed_cost(rows, todo, wall: float, parallel: int) -> None:
  """How much of this invocation's time went to training and evaluation."""
  del rows
  ran = [point_status(p) for p in todo]
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


def worker_command(module, root: str, overrides: dict[str, str]) -> list[str]:
  """The command of a worker: it trains the points it is sent."""
  return [
    sys.executable,
    '-m',
    'mnv2_flax.sweep',
    f'--config={os.path.abspath(module.__file__)}',
    f'--root={root}',
    '--worker',
    *(f'--set={k}={v}' for k, v in overrides.items()),
  ]


def _last_error(log_path: str) -> str:
  """The `error:` line (or last line) of a worker's log."""
  try:
    with open(log_path, errors='replace') as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ''
  errors = [line for line in lines if line.startswith('error: ')]
  return (errors or lines or [''])[-1]


class _Worker:
  """A worker process on one share of the devices, and its current point.

  It reads point arguments from its stdin, one per line, and answers each
  with a line on its stdout once the point has ended (its record is then
  in the point's workdir); it exits at the end of its stdin.
  """

  def __init__(self, module, root, overrides, share, log_path):
    self.share, self.point, self.started = share, None, 0.0
    with open(log_path, 'a') as log:
      self.process = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
        worker_command(module, root, overrides),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, **share.env},
        preexec_fn=share.pin,
        text=True,
        bufsize=1,
      )

  def send(self, point: Point) -> None:
    self.point, self.started = point, time.perf_counter()
    self.process.stdin.write(point.arg + '\n')
    self.process.stdin.flush()

  def stop(self) -> None:
    self.process.stdin.close()


def _run_workers(module, todo, root, overrides, parallel, point_args):
  """Runs `todo` on `parallel` worker processes, one point each at a time.

  A worker that dies with a point in hand gets that point recorded as
  failed (the next run retries it) and is replaced while points are left.
  """
  shares = hardware.shares(parallel)
  for share in shares:
    logging.info('Sweep worker slot: %s', share.label)
  logs = os.path.join(root, 'workers')
  os.makedirs(logs, exist_ok=True)
  queue, workers = list(todo), []
  progress = _Progress(len(todo), parallel)

  def start(i):
    worker = _Worker(
      module, root, overrides, shares[i], f'{logs}/worker-{i}.txt'
    )
    worker.slot = i
    return worker

  def feed(worker):
    if queue:
      worker.send(queue.pop(0))
    else:
      worker.point = None
      worker.stop()

  try:
    for i in range(min(parallel, len(queue))):
      workers.append(start(i))
      feed(workers[-1])
    progress.log([w.point for w in workers if w.point])
    while any(w.point for w in workers):
      busy = {w.process.stdout: w for w in workers if w.point}
      ready, _, _ = select.select(list(busy), [], [], 1.0)
      for pipe in ready:
        worker = busy[pipe]
        line = pipe.readline()
        point = worker.point
        if line:  # the point has ended and recorded itself
          error = point_status(point)['error']
        else:  # the worker died with the point in hand
          code = worker.process.wait()
          log_path = os.path.join(point.workdir, 'log.txt')
          error = (
            f'worker exited with status {code}: '
            f'{_last_error(log_path)} (log: {log_path})'
          )
          logging.error('Sweep point %s failed: %s', point.arg, error)
          _record(point, time.perf_counter() - worker.started, error)
          workers[workers.index(worker)] = worker = start(worker.slot)
        progress.done(error, time.perf_counter() - worker.started)
        feed(worker)
        progress.log([w.point for w in workers if w.point])
        summarize(module, point_args, root)
    for worker in workers:
      worker.process.wait()
  finally:  # interrupted: stop the workers; their checkpoints stay
    for worker in workers:
      if worker.process.poll() is None:
        worker.process.terminate()
    for worker in workers:
      worker.process.wait()


def work(module, root: str, overrides: dict[str, str]) -> None:
  """A worker's loop: trains each point argument read from stdin in this
  process, its log in `<workdir>/log.txt`, and answers on stdout."""
  answer = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # what anything prints goes to the log, not the answers
  cli.start_jax()
  cores = ','.join(map(str, sorted(os.sched_getaffinity(0))))
  for line in sys.stdin:
    point = Point(line.strip(), os.path.join(root, point_name(line.strip())))
    os.makedirs(point.workdir, exist_ok=True)
    _log_to(os.path.join(point.workdir, 'log.txt'))
    from mnv2_flax import hardware as hw  # pylint: disable=g-import-not-at-top

    logging.info(
      '%s CPU cores: %s; worker process %d.', hw.describe(), cores, os.getpid()
    )
    try:
      config = point_configs(module, [point], overrides)[point]
    except ValueError as e:
      _record(point, 0.0, str(e))
    else:
      run_point(point, config)
    _after_point()
    answer.write(f'{point.arg}\n')


def _log_to(path: str) -> None:
  """This process's stderr (absl's log, TensorFlow's and XLA's) to `path`."""
  sys.stderr.flush()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(fd, 2)
  os.close(fd)


def _after_point() -> None:
  """Frees what a finished point's programs held (the next has others)."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.clear_caches()


class PointTask:
  """Points as one submitit job, trained one after another in its process:
  picklable (the config file's path, not the module) and requeued where
  Slurm preempts or times it out (`checkpoint`); the rerun skips finished
  points and resumes the others from their checkpoints."""

  def __init__(self, config_path: str, root: str, overrides: dict[str, str]):
    self.config_path, self.root, self.overrides = config_path, root, overrides

  def __call__(self, point_args: list[str]) -> list[str | None]:
    module = load_config_module(self.config_path)
    points = [
      Point(a, os.path.join(self.root, point_name(a))) for a in point_args
    ]
    configs = point_configs(module, points, self.overrides)
    cli.start_jax()
    errors = []
    for point in points:
      if point_status(point)['status'] == 'finished':
        errors.append(None)
        continue
      errors.append(run_point(point, configs[point]))
      _after_point()
    return errors

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
) -> list[dict[str, Any]]:
  """Submits the unfinished points as one array job, waits, summarises.

  `cluster` is 'slurm' or 'local' (submitit's local executor: real
  processes on this host); `params` go to `executor.update_parameters`
  (timeout_min, slurm_partition, gpus_per_node, cpus_per_task,
  slurm_array_parallelism, ...). Job ids are kept in
  `<root>/submitit/jobs.json`: a rerun submits only points that are
  neither finished nor still queued or running, and waits for all of them.
  """
  try:
    import submitit  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f'--submit={cluster}: {SUBMITIT}.') from None
  points = make_points(point_args, root)
  point_configs(module, points, overrides)
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
    if p not in waiting and point_status(p)['status'] != 'finished'
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
    task = PointTask(os.path.abspath(module.__file__), root, overrides)
    groups = _seed_groups(todo)
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
      if point_status(point)['status'] in ('pending', 'interrupted'):
        error = f'job {job.job_id} {job.state}: see {job.paths.stderr}'
        logging.error('Sweep point %s failed: %s', point.arg, error)
        _record(point, 0.0, error)
  return summarize(module, point_args, root)


def _seed_groups(points: list[Point]) -> list[list[Point]]:
  """`points` grouped by their argument without its seed, in order: a
  point's seeds share a task's process (and its compiled programs)."""
  groups = {}
  for point in points:
    key = ','.join(k for k in point.arg.split(',') if not k.startswith('seed='))
    groups.setdefault(key, []).append(point)
  return list(groups.values())


def make_points(point_args: list[str], root: str) -> list[Point]:
  points = [Point(a, os.path.join(root, point_name(a))) for a in point_args]
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f'the sweep has repeated points: {names}.')
  return points


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
    for p in make_points(point_args, root)[shard[0] :: shard[1]]
  ]


# ------------------------------------------------------------------ summaries


def _args(arg: str) -> dict[str, str]:
  return dict(item.split('=', 1) for item in arg.split(',') if item)


def summarize(module, point_args: list[str], root: str) -> list[dict]:
  """Writes the summary files (mnv2_flax.summary); returns the run rows."""
  from mnv2_flax import summary  # pylint: disable=g-import-not-at-top

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


# ------------------------------------------------------------------------ CLI


def _submit_params(text: str) -> dict[str, Any]:
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


def main(argv):
  del argv
  if _PARALLEL.value < 1:
    raise ValueError(f'--parallel={_PARALLEL.value}: expected 1 or more.')
  if _PARALLEL.value > 1 and (_SUBMIT.value or _WORKER.value):
    raise ValueError('--parallel runs points here; not with --submit/--worker.')
  path, _, sweep_arg = _CONFIG.value.partition(':')
  module = load_config_module(path)
  overrides = dict(s.split('=', 1) if '=' in s else (s, '') for s in _SET.value)
  if _WORKER.value:  # a --parallel worker: the points come on stdin
    work(module, _ROOT.value, overrides)
    return
  point_args = module.get_sweep(sweep_arg or None)
  shard = parse_shard(_SHARD.value)
  configs = point_configs(
    module, make_points(point_args, _ROOT.value), overrides
  )
  required = any(c.train.require_accelerator for c in configs.values())
  if _DRY_RUN.value:
    for command in dry_run_commands(
      path, point_args, _ROOT.value, overrides, shard
    ):
      print(command)
    return
  if _SUMMARIZE_ONLY.value:
    rows = summarize(module, point_args, _ROOT.value)
  elif _SUBMIT.value:
    if _SUBMIT.value not in ('slurm', 'local'):
      raise ValueError(f'--submit={_SUBMIT.value!r}: valid are slurm or local.')
    rows = submit(
      module,
      point_args,
      _ROOT.value,
      overrides,
      _SUBMIT.value,
      _submit_params(_SUBMIT_PARAMS.value),
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
      cli.start_jax()
      hardware.check_accelerator(required)
    rows = run(
      module,
      point_args,
      _ROOT.value,
      overrides,
      shard,
      parallel=_PARALLEL.value,
    )
  from mnv2_flax import summary  # pylint: disable=g-import-not-at-top

  keys = [k for k in rows[0] if k not in summary.COLUMNS] if rows else []
  print(f'{len(rows)} runs; summary: {os.path.join(_ROOT.value, "results.md")}')
  if rows:
    print(summary.points_table(summary.group(rows, keys)))


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
