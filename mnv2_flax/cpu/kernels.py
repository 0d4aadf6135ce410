"""Builds and registers the C++ CPU kernels in `csrc/` as XLA FFI targets.

The library is compiled on first use with the system's C++ compiler (`$CXX`,
else `c++` or `g++`) against the XLA FFI headers that jaxlib ships, for this
machine's CPU (`-march=native`), and cached under
`$XDG_CACHE_HOME/mnv2_flax/kernels` (default `~/.cache/...`) in a file named
by a hash of the sources, the flags, the jaxlib version and the CPU; a second
process loads it in milliseconds. Without a compiler (or if the build fails)
`load()` returns None with one warning, and callers fall back to the pure-JAX
path: results are the same up to float rounding, only slower.
"""

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jaxlib

_CSRC = os.path.join(os.path.dirname(__file__), 'csrc')
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
TARGETS = {
  'mnv2_depthwise_forward': 'Mnv2DepthwiseForward',
  'mnv2_depthwise_backward': 'Mnv2DepthwiseBackward',
  'mnv2_batch_norm_stats': 'Mnv2BatchNormStats',
  'mnv2_batch_norm_grad_sums': 'Mnv2BatchNormGradSums',
}


def _sources() -> list[str]:
  return sorted(glob.glob(os.path.join(_CSRC, '*.cc')))


def cache_dir() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(root, 'mnv2_flax', 'kernels')


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_identity() -> str:
  """The CPU's model and feature flags (-march=native depends on them)."""
  try:
    with open('/proc/cpuinfo') as f:
      lines = [
        line
        for line in f
        if line.startswith(('model name', 'flags', 'Features'))
      ]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def library_path(compiler: str) -> str:
  key = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(_CSRC, '*'))):
    with open(path, 'rb') as f:
      key.update(os.path.basename(path).encode() + f.read())
  for part in (' '.join(_FLAGS), compiler, jaxlib.__version__, _cpu_identity()):
    key.update(part.encode())
  return os.path.join(cache_dir(), f'kernels_cpu-{key.hexdigest()[:16]}.so')


def _build(compiler: str, path: str) -> None:
  """Compiles to a temporary file and renames it: never a half-written .so."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    command = [compiler, *_FLAGS, '-I', jax.ffi.include_dir(), *_sources()]
    subprocess.run(
      command + ['-o', tmp], check=True, capture_output=True, text=True
    )
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def build() -> str | None:
  """The library's path, compiled first if it is not in the cache; None
  (with one warning) without a compiler or if the build fails. Starts no
  JAX backend: a sweep builds it once while it prepares its data, before
  its workers start."""
  compiler = _compiler()
  if compiler is None:
    logging.warning(
      'No C++ compiler (set CXX): the native CPU kernels are off; the '
      'CPU layers use their slower pure-JAX paths.'
    )
    return None
  path = library_path(compiler)
  try:
    if not os.path.exists(path):
      logging.info('Building the native CPU kernels: %s', path)
      _build(compiler, path)
  except (OSError, subprocess.CalledProcessError) as e:
    _build_failed(e)
    return None
  return path


def _build_failed(e: Exception) -> None:
  detail = getattr(e, 'stderr', '') or str(e)
  logging.warning(
    'Building the native CPU kernels failed; using the slower pure-JAX '
    'paths. %s',
    detail[-2000:],
  )


@functools.cache
def load() -> ctypes.CDLL | None:
  """The compiled kernels, registered with XLA's CPU backend; None if none."""
  path = build()
  if path is None:
    return None
  try:
    library = ctypes.cdll.LoadLibrary(path)
  except OSError as e:
    _build_failed(e)
    return None
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(
      target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu'
    )
  return library


class NotOnCpuError(ValueError):
  """A CPU-only layer was traced for a program on another backend."""


def require_cpu(what: str) -> None:
  """Refuses `what` (a CPU layer) unless JAX's default backend is the CPU.

  Its kernels are XLA:CPU custom calls and its pure-JAX fallbacks are shaped
  for XLA:CPU; `mnv2_flax.cpu.fast_path.layers()` returns {} elsewhere.
  """
  backend = jax.default_backend()
  if backend != 'cpu':
    raise NotOnCpuError(
      f'{what} is a layer for the CPU backend, and this program runs on '
      f'{backend}: build the model without mnv2_flax.cpu.fast_path.layers() '
      '(training_state.create_model leaves them out off CPU).'
    )


def available() -> bool:
  return load() is not None
