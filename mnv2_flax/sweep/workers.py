"""Sweep workers: processes that train one pack of seeds after another.

`python -m mnv2_flax.sweep --parallel=N` starts N workers, each on its share
of the devices (`hardware.shares`), and sends each the next pack (the seeds
of a point, `grid.make_packs`) when it has finished the last:
imports, JAX's start-up and its caches are paid once per worker, not once
per point. A worker that dies has its points recorded as failed (the next
run retries them) and is replaced while packs are left.
"""

import os
import select
import signal
import subprocess
import sys
import time

from absl import logging

from mnv2_flax import cli
from mnv2_flax.runtime import hardware
from mnv2_flax.runtime import preemption
from mnv2_flax.sweep import grid


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


# Between the point arguments of a pack on a worker's stdin (they hold
# ',' and '=', never a tab).
_SEPARATOR = '\t'


class _Worker:
  """A worker process on one share of the devices, and its current pack.

  It reads packs from its stdin, one per line (point arguments separated by
  tabs), and answers each with a line on its stdout once the pack has ended
  (its points' records are then in their workdirs); it exits at the end of
  its stdin.
  """

  def __init__(self, module, root, overrides, share, log_path):
    self.share, self.pack, self.started = share, None, 0.0
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

  def send(self, pack: list[grid.Point]) -> None:
    self.pack, self.started = pack, time.perf_counter()
    self.process.stdin.write(_SEPARATOR.join(p.arg for p in pack) + '\n')
    self.process.stdin.flush()

  def stop(self) -> None:
    self.process.stdin.close()


def pack_seed(pack: list[grid.Point]) -> str:
  """The seed of a pack's first point ('' where the points name none)."""
  for item in pack[0].arg.split(','):
    if item.startswith('seed='):
      return item[len('seed=') :]
  return ''


def next_pack(queue, built: set[str], costs: dict[str, float]) -> int:
  """The index in `queue` of the pack a free worker takes next.

  Seeds stay slowest (a stopped sweep has whole seeds done): the pack comes
  from the first seed still queued (in the sweep's order, which `queue`
  keeps), or from the seed after it where only that one holds a shape the
  worker has `built` (its programs are compiled and loaded there; elsewhere
  they would be built a second time). Among those, a shape it has built,
  else the costliest (`costs`, by the point's argument without its seed),
  so that the largest points start first and none is left for the end.
  """
  seeds = list(dict.fromkeys(pack_seed(pack) for pack in queue))
  shape = lambda i: grid.pack_key(queue[i][0].arg)  # noqa: E731
  cost = lambda i: costs.get(shape(i), 0.0)  # noqa: E731
  for seed in seeds[:2]:
    mine = [
      i
      for i, pack in enumerate(queue)
      if pack_seed(pack) == seed and shape(i) in built
    ]
    if mine:
      return max(mine, key=cost)
  window = [i for i, pack in enumerate(queue) if pack_seed(pack) == seeds[0]]
  return max(window, key=cost)


def run_workers(
  module, packs, root, overrides, parallel, point_args, costs=None
):
  """Runs `packs` on `parallel` worker processes, one pack each at a time,
  in the order `next_pack` chooses (`costs`: see there).

  A worker that dies with a pack in hand gets its points recorded as
  failed (the next run retries them) and is replaced while packs are left.
  A stop signal (`preemption.SIGNALS`) is passed on to the workers, which
  save their points and exit; no pack starts after it. Returns that
  signal's number, or None.
  """
  stop = _Forward()
  with stop:
    _run_workers(
      module, packs, root, overrides, parallel, point_args, stop, costs or {}
    )
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


def _running(workers) -> list[grid.Point]:
  return [p for w in workers if w.pack for p in w.pack]


def _run_workers(
  module, packs, root, overrides, parallel, point_args, stop, costs
):
  shares = hardware.shares(parallel)
  for share in shares:
    logging.info('Sweep worker slot: %s', share.label)
  logs = os.path.join(root, 'workers')
  os.makedirs(logs, exist_ok=True)
  queue, workers = list(packs), []
  progress = grid.Progress(sum(map(len, packs)), parallel)

  stop.workers = workers

  def start(i):
    worker = _Worker(
      module, root, overrides, shares[i], f'{logs}/worker-{i}.txt'
    )
    worker.slot, worker.built = i, set()
    return worker

  def feed(worker):
    if queue and stop.signum is None:
      pack = queue.pop(next_pack(queue, worker.built, costs))
      worker.built.add(grid.pack_key(pack[0].arg))
      worker.send(pack)
    else:
      worker.pack = None
      worker.stop()

  try:
    for i in range(min(parallel, len(queue))):
      workers.append(start(i))
      feed(workers[-1])
    progress.log(_running(workers))
    while any(w.pack for w in workers):
      busy = {w.process.stdout: w for w in workers if w.pack}
      ready, _, _ = select.select(list(busy), [], [], 1.0)
      for pipe in ready:
        worker = busy[pipe]
        line = pipe.readline()
        pack = worker.pack
        share = (time.perf_counter() - worker.started) / len(pack)
        stopped = [False] * len(pack)  # by a signal, saved to resume
        if line:  # the pack has ended and its points recorded themselves
          statuses = [grid.point_status(p) for p in pack]
          errors = [s['error'] for s in statuses]
          stopped = [s['status'] == 'interrupted' for s in statuses]
        elif stop.signum is not None:  # stopped at once: interrupted
          worker.process.wait()
          worker.pack = None
          continue
        else:  # the worker died with the pack in hand
          code = worker.process.wait()
          log_path = os.path.join(pack[0].workdir, 'log.txt')
          error = (
            f'worker exited with status {code}: '
            f'{_last_error(log_path)} (log: {log_path})'
          )
          errors = [error] * len(pack)
          for point in pack:
            logging.error('Sweep point %s failed: %s', point.arg, error)
            grid.record(point, share, error)
          workers[workers.index(worker)] = worker = start(worker.slot)
        for error, was_stopped in zip(errors, stopped, strict=True):
          progress.done(error, share, stopped=was_stopped)
        feed(worker)
        progress.log(_running(workers))
        grid.summarize(module, point_args, root)
    for worker in workers:
      worker.process.wait()
  finally:  # a failure here: stop the workers (they save their points)
    for worker in workers:
      if worker.process.poll() is None and stop.signum is None:
        worker.process.terminate()
    for worker in workers:
      worker.process.wait()


def work(module, root: str, overrides: dict[str, str]) -> None:
  """A worker's loop: trains each pack read from stdin in this process, its
  log in its first point's `<workdir>/log.txt`, and answers on stdout."""
  answer = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # what anything prints goes to the log, not the answers
  cli.start_jax(gpu_deterministic_ops=grid.gpu_deterministic_ops(overrides))
  cores = ','.join(map(str, sorted(os.sched_getaffinity(0))))
  for line in sys.stdin:
    pack = [
      grid.Point(arg, os.path.join(root, grid.point_name(arg)))
      for arg in line.strip('\n').split(_SEPARATOR)
    ]
    log_path = os.path.join(pack[0].workdir, 'log.txt')
    for point in pack:
      os.makedirs(point.workdir, exist_ok=True)
      if point is not pack[0]:
        with open(os.path.join(point.workdir, 'log.txt'), 'a') as f:
          f.write(f'Trained in a pack of {len(pack)} seeds; log: {log_path}\n')
    _log_to(log_path)
    from mnv2_flax.runtime import hardware as hw  # pylint: disable=g-import-not-at-top

    logging.info(
      '%s CPU cores: %s; worker process %d.', hw.describe(), cores, os.getpid()
    )
    try:
      configs = grid.point_configs(module, pack, overrides)
    except ValueError as e:
      for point in pack:
        grid.record(point, 0.0, str(e))
    else:
      try:
        grid.run_pack(pack, configs)
      except preemption.Stopped:
        answer.write(f'{line.strip()}\n')  # saved and recorded
        raise
    answer.write(f'{line.strip()}\n')


def _log_to(path: str) -> None:
  """This process's stderr (absl's log, TensorFlow's and XLA's) to `path`."""
  sys.stderr.flush()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(fd, 2)
  os.close(fd)
