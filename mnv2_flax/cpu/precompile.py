"""Compiles a training run's programs in a child process, into the cache.

On XLA:CPU a program runs slower in a process that has itself compiled a
large program than in one that loaded it from JAX's persistent compilation
cache (cause unknown: not page faults, the heap the compiler leaves or XLA's
parallel code generation). So `programs` has a child process compile the
state initialiser and the steps into the cache while it fills the shuffle
buffer, then loads them. Quickstart train step, compiled in the process vs
loaded from the cache (medians of 3 alternating runs, malloc settings on,
2026-11-30): 92.6 vs 78.5 ms.

The child imports nothing of the training code by name here: it calls the
function `start` names ('module:function'), which lowers the programs to
compile, with the keyword arguments given. Only where it can help: the CPU
backend, one process, the persistent cache on. If the child fails, the run
compiles in-process, with a warning.

  python -m mnv2_flax.cpu.precompile  # the child; reads its job from stdin
"""

import ctypes
import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import logging
import jax

from mnv2_flax.cpu import fast_path

# The child never outlives a stuck compile by more than this.
_TIMEOUT_SECONDS = 1800


def wanted(cache_dir: str) -> bool:
  """Whether it can help here: CPU backend, one process, a cache to fill."""
  return bool(cache_dir and fast_path.enabled() and jax.process_count() == 1)


def _die_with_parent(parent: int) -> None:
  """In the child: killed if the training process dies (Linux)."""
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # it died before the line above
    sys.exit(1)


class Child:
  """A running child compile; `wait()` returns once the cache holds it."""

  def __init__(self, job: dict[str, Any]):
    self._log = tempfile.TemporaryFile()
    package_root = os.path.dirname(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
      p for p in (package_root, env.get('PYTHONPATH')) if p
    )
    self._start = time.perf_counter()
    self._process = subprocess.Popen(
      [sys.executable, '-m', 'mnv2_flax.cpu.precompile'],
      stdin=subprocess.PIPE,
      stdout=self._log,
      stderr=subprocess.STDOUT,
      env=env,
    )
    self._process.stdin.write(pickle.dumps(dict(job, parent=os.getpid())))
    self._process.stdin.close()

  def wait(self) -> bool:
    """Waits for the child; True if it succeeded, else False and a warning
    with its output."""
    try:
      code = self._process.wait(timeout=_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
      code = None
    seconds = time.perf_counter() - self._start
    if code == 0:
      logging.info('Programs compiled in a child process in %.1f s.', seconds)
      return True
    self._log.seek(0)
    output = self._log.read().decode(errors='replace')[-3000:]
    logging.warning(
      'Compiling in a child process failed (exit status %s after %.0f s); '
      'compiling in this process instead. Its output ends with:\n%s',
      code,
      seconds,
      output,
    )
    return False


def start(target: str, cache_dir: str, **kwargs: Any) -> Child | None:
  """Starts the child if `wanted(cache_dir)`; None otherwise.

  Args:
    target: 'module:function'; the child calls `function(**kwargs)`, which
      returns the `jax.stages.Lowered` programs (a dict) to compile. It must
      build them exactly as the training process will, so that they have the
      same cache keys.
    cache_dir: the persistent compilation cache both processes use.
    **kwargs: picklable arguments of `target`.
  """
  if not wanted(cache_dir):
    return None
  # pylint: disable=g-import-not-at-top
  from mnv2_flax.cpu import kernels
  from mnv2_flax.runtime import compilation_cache
  # pylint: enable=g-import-not-at-top

  # This process reads the cache that the child writes.
  compilation_cache.enable_dir(cache_dir)
  kernels.load()  # built once here, not by both processes at once
  return Child(
    dict(
      target=target,
      kwargs=kwargs,
      cache_dir=cache_dir,
      # JAX's settings shape the programs and their cache keys (for example
      # jax_disable_most_optimizations): the child uses this process's.
      jax_config={
        k: v
        for k, v in jax.config.values.items()
        if isinstance(v, (bool, int, float, str, type(None)))
      },
    )
  )


def _compile(job: dict[str, Any]) -> None:
  """The child's work: the programs the training process will load."""
  from mnv2_flax.runtime import compilation_cache  # pylint: disable=g-import-not-at-top

  for name, value in job['jax_config'].items():
    if jax.config.values.get(name) != value:
      try:
        jax.config.update(name, value)
      except Exception:  # pylint: disable=broad-exception-caught
        logging.info('Not set in the child: %s=%r', name, value)
  compilation_cache.enable_dir(job['cache_dir'])
  # Everything goes into the cache, however quick to compile.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  module, function = job['target'].split(':')
  lowered = getattr(importlib.import_module(module), function)(**job['kwargs'])
  for program in lowered.values():
    program.compile()


def main() -> None:
  fast_path.configure_host()
  job = pickle.load(sys.stdin.buffer)
  _die_with_parent(job['parent'])
  _compile(job)


if __name__ == '__main__':
  main()
