"""Stopping on a signal: finish the step in flight, save it, exit; resume.

TPU VMs and `scancel` send SIGTERM before they stop a job, Slurm's
`--signal` (submitit's default: SIGUSR2, 90 s before the time limit) a user
signal, and a person presses Ctrl-C (SIGINT). During training each of the
four makes the run finish the step in flight, save a checkpoint of it, write
`results.json` with `stopped: {signal, step}` and raise `Stopped`; the
command-line programs then exit with status 128 + the signal's number (130
for SIGINT, 143 for SIGTERM, 138/140 for SIGUSR1/SIGUSR2). The same command
resumes from that step. A second signal ends the process at once (status
128 + its number); a save it cuts short leaves only orbax's temporary
directory, which the next start removes.

With several processes (`jax.distributed`) all must save the same step:
SIGTERM goes to JAX's preemption service, which agrees on a step with every
process (`multihost_utils.reached_preemption_sync_point`), and the other
three signals are turned into a SIGTERM to the process itself, so that a
signal to any one process stops them all at the same step.

This module imports the standard library only (the command-line programs
import it before JAX).
"""

import os
import signal
import sys
import threading
import time

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def exit_code(signum: int) -> int:
  """The exit status of a run stopped by `signum`: 128 + its number."""
  return 128 + int(signum)


class Stopped(Exception):  # noqa: N818 (a stop, not an error)
  """A signal stopped the run (or sweep) after saving what it had done."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = int(signum)

  @property
  def exit_code(self) -> int:
    return exit_code(self.signum)


class Watch:
  """Watches for the stop signals while a run trains (a context manager).

    with preemption.Watch() as watch:
      for i, ... in enumerate(calls):
        ...
        if watch.stop_requested(i):
          save; raise watch.stopped(step)

  `stop_requested(i)` must be called with 0, 1, 2, ... once per call of the
  train step, in every process. Outside the main thread (where Python cannot
  handle signals) it installs nothing and never stops.
  """

  def __init__(self):
    self.signum, self.received_at = None, None
    self._previous = {}
    self._multiprocess = False

  def __enter__(self) -> 'Watch':
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Not in the main thread: signals will not save.')
      return self
    self._multiprocess = _preemption_service()
    for signum in SIGNALS:
      if self._multiprocess and signum == signal.SIGTERM:
        continue  # JAX's preemption notifier handles it
      self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    self._previous.clear()

  def _on_signal(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      # A second signal: out at once. A save cut short stays in orbax's
      # temporary directory, removed by the next start.
      print(
        f'error: {name} while stopping: exited at once without saving.',
        file=sys.stderr,
        flush=True,
      )
      os._exit(exit_code(signum))  # pylint: disable=protected-access
    self.signum, self.received_at = signum, time.monotonic()
    logging.warning(
      'Received %s: finishing the program in flight (one step, or up to '
      'config.train.steps_per_call steps), then saving (a second signal '
      'exits at once).',
      name,
    )
    if self._multiprocess and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

  @property
  def signal_name(self) -> str | None:
    return signal.Signals(self.signum).name if self.signum else None

  def stop_requested(self, call_index: int) -> bool:
    """Whether to stop after train-step call `call_index` (0, 1, ...)."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      if not multihost_utils.reached_preemption_sync_point(call_index):
        return False
      if self.signum is None:  # another process was signalled
        self.signum, self.received_at = signal.SIGTERM, time.monotonic()
        logging.warning('Another process was signalled: stopping.')
      # From here a second SIGTERM exits at once, as the others do.
      self._previous.setdefault(
        signal.SIGTERM, signal.signal(signal.SIGTERM, self._on_signal)
      )
      return True
    return self.signum is not None

  def stopped(self, step: int) -> Stopped:
    """The exception to raise once `step` is saved."""
    logging.warning(
      'Stopped by %s at step %d, %.1f s after the signal.',
      self.signal_name,
      step,
      time.monotonic() - self.received_at,
    )
    return Stopped(
      self.signum,
      f'stopped by {self.signal_name} after step {step}, which is saved; run '
      'the same command again to resume from it.',
    )


def _preemption_service() -> bool:
  """Whether this process is one of several with JAX's preemption service."""
  if 'jax' not in sys.modules:
    return False
  # pylint: disable=g-import-not-at-top
  import jax
  from jax._src import distributed
  # pylint: enable=g-import-not-at-top

  if jax.process_count() == 1 or distributed.global_state.client is None:
    return False
  if distributed.global_state.preemption_sync_manager is None:
    logging.warning(
      'jax_enable_preemption_service is off: a signal stops only the '
      'process that receives it, and the others wait for it.'
    )
    return False
  return True
