"""JAX's persistent compilation cache, on by default for training runs."""

import os

import jax
import ml_collections

DEFAULT_DIR = os.path.expanduser('~/.cache/mnv2_flax/jax')


def enable(config: ml_collections.ConfigDict) -> None:
  """Caches compiled programs in `config.train.compilation_cache_dir`.

  A second run of the same shapes then loads its programs instead of
  compiling them. An empty string disables the cache.
  """
  enable_dir(config.train.get('compilation_cache_dir', DEFAULT_DIR))


def enable_dir(directory: str) -> None:
  """Caches compiled programs in `directory`; '' leaves the cache off."""
  if not directory:
    return
  directory = os.path.expanduser(directory)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
