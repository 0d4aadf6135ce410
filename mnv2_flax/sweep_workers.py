"""Sweep workers: processes that train one point after another.

`python -m mnv2_flax.sweep --parallel=N` starts N workers, each on its share
of the devices (`hardware.shares`), and sends each the next point when it
has finished the last: imports, JAX's start-up and its caches are paid once
per worker, not once per point. A worker that dies has its point recorded
as failed (the next run retries it) and is replaced while points are left.
"""

import os
import select
import signal
import subprocess
import sys
import time

from absl import logging

from mnv2_flax import cli
from mnv2_flax import hardware
from mnv2_flax import preemption
from mnv2_flax import sweep_points


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
        start_new_session=True,  # signals come through the sweep
        text=True,
        bufsize=1,
      )

  def send(self, point: sweep_points.Point) -> None:
    self.point, self.started = point, time.perf_counter()
    self.process.stdin.write(point.arg + '\n')
    self.process.stdin.flush()

  def stop(self) -> None:
    self.process.stdin.close()


def run_workers(module, todo, root, overrides, parallel, point_args):
  """Runs `todo` on `parallel` worker processes, one point each at a time.

  A worker that dies with a point in hand gets that point recorded as
  failed (the next run retries it) and is replaced while points are left.
  A stop signal (`preemption.SIGNALS`) is passed on to the workers, which
  save their points and exit; no point starts after it. Returns that
  signal's number, or None.
  """
  stop = _Forward()
  with stop:
    _run_workers(module, todo, root, overrides, parallel, point_args, stop)
  return stop.signum


class _Forward:
  """Passes the stop signals this process receives on to its workers
  (which run in their own sessions: a terminal's Ctrl-C reaches this
  process only, and a second one reaches them once, from here)."""

  def __init__(self):
    self.signum, self.workers, self._previous = None, [], {}

  def __enter__(self):
    for signum in preemption.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning(
      'Sweep received %s: %s.',
      signal.Signals(signum).name,
      'the workers save their points and exit'
      if self.signum is None
      else 'the workers exit at once',
    )
    self.signum = self.signum or signum
    for worker in self.workers:
      if worker.process.poll() is None:
        worker.process.send_signal(signum)


def _run_workers(module, todo, root, overrides, parallel, point_args, stop):
  shares = hardware.shares(parallel)
  for share in shares:
    logging.info('Sweep worker slot: %s', share.label)
  logs = os.path.join(root, 'workers')
  os.makedirs(logs, exist_ok=True)
  queue, workers = list(todo), []
  progress = sweep_points.Progress(len(todo), parallel)

  stop.workers = workers

  def start(i):
    worker = _Worker(
      module, root, overrides, shares[i], f'{logs}/worker-{i}.txt'
    )
    worker.slot = i
    return worker

  def feed(worker):
    if queue and stop.signum is None:
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
          error = sweep_points.point_status(point)['error']
        elif stop.signum is not None:  # stopped at once: interrupted
          worker.process.wait()
          worker.point, error = None, None
          continue
        else:  # the worker died with the point in hand
          code = worker.process.wait()
          log_path = os.path.join(point.workdir, 'log.txt')
          error = (
            f'worker exited with status {code}: '
            f'{_last_error(log_path)} (log: {log_path})'
          )
          logging.error('Sweep point %s failed: %s', point.arg, error)
          sweep_points.record(
            point, time.perf_counter() - worker.started, error
          )
          workers[workers.index(worker)] = worker = start(worker.slot)
        progress.done(error, time.perf_counter() - worker.started)
        feed(worker)
        progress.log([w.point for w in workers if w.point])
        sweep_points.summarize(module, point_args, root)
    for worker in workers:
      worker.process.wait()
  finally:  # a failure here: stop the workers (they save their points)
    for worker in workers:
      if worker.process.poll() is None and stop.signum is None:
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
    point = sweep_points.Point(
      line.strip(), os.path.join(root, sweep_points.point_name(line.strip()))
    )
    os.makedirs(point.workdir, exist_ok=True)
    _log_to(os.path.join(point.workdir, 'log.txt'))
    from mnv2_flax import hardware as hw  # pylint: disable=g-import-not-at-top

    logging.info(
      '%s CPU cores: %s; worker process %d.', hw.describe(), cores, os.getpid()
    )
    try:
      config = sweep_points.point_configs(module, [point], overrides)[point]
    except ValueError as e:
      sweep_points.record(point, 0.0, str(e))
    else:
      try:
        sweep_points.run_point(point, config)
      except preemption.Stopped:
        answer.write(f'{point.arg}\n')  # saved and recorded
        raise
    answer.write(f'{point.arg}\n')


def _log_to(path: str) -> None:
  """This process's stderr (absl's log, TensorFlow's and XLA's) to `path`."""
  sys.stderr.flush()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(fd, 2)
  os.close(fd)
