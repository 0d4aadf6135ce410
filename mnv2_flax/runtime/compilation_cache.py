"""JAX's persistent compilation cache, on by default for training runs."""

import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import ml_collections

from mnv2_flax import defaults

DEFAULT_DIR = os.path.expanduser(defaults.COMPILATION_CACHE_DIR)


def enable(config: ml_collections.ConfigDict) -> None:
  """Caches compiled programs in `config.train.compilation_cache_dir`.

  A second run of the same shapes then loads its programs instead of
  compiling them. An empty string disables the cache.
  """
  enable_dir(config.train.get('compilation_cache_dir', DEFAULT_DIR))


def enable_dir(directory: str) -> None:
  """Caches compiled programs in `directory`; '' leaves the cache as it is."""
  if not directory:
    return
  directory = os.path.expanduser(directory)
  if jax.config.jax_compilation_cache_dir == directory:
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  # JAX opens (or skips) the cache once per process: start over.
  jax_cache.reset_cache()


@contextlib.contextmanager
def counting_hits():
  """Yields a list that gets one entry per program loaded from the cache."""
  hits = []

  def listener(event, **kwargs):
    del kwargs
    if event == '/jax/compilation_cache/cache_hits':
      hits.append(event)

  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listener)
