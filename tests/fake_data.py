"""Small Fashion-MNIST-format data that the tests write themselves, and the
tests' run config."""

import dataclasses
import functools
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np

from mnv2_flax import defaults
from mnv2_flax.data import fashion_mnist
from mnv2_flax.train import programs
from mnv2_flax.train import steps as steps_lib

NUM_TRAIN, NUM_TEST = 40, 23
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(directory, split, images, labels):
  """Writes gzipped idx files as Fashion-MNIST distributes them."""
  os.makedirs(directory, exist_ok=True)
  n = len(images)
  with gzip.open(
    os.path.join(directory, fashion_mnist.FILES[f'{split}_images']), 'wb'
  ) as f:
    f.write(np.array([2051, n, 28, 28], '>u4').tobytes() + images.tobytes())
  with gzip.open(
    os.path.join(directory, fashion_mnist.FILES[f'{split}_labels']), 'wb'
  ) as f:
    f.write(np.array([2049, n], '>u4').tobytes() + labels.tobytes())


def make_idx_dir(directory, num_train=NUM_TRAIN):
  """Train: random textures. Test: image i is the constant i (its id)."""
  rng = np.random.default_rng(0)
  write_idx(
    directory,
    'train',
    rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
    rng.integers(0, 10, num_train, dtype=np.uint8),
  )
  write_idx(
    directory,
    'test',
    np.repeat(np.arange(NUM_TEST, dtype=np.uint8), 28 * 28).reshape(
      NUM_TEST, 28, 28
    ),
    (np.arange(NUM_TEST) % 10).astype(np.uint8),
  )
  return directory


def run_python(args, timeout: float | None = 300, **env):
  """`python *args` from the repository's root in a process on the CPU
  (`env` added to this one's), its output captured; never raises for its
  exit code."""
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', **env),
  )


def run_on_fake_devices(script: str, devices: int, timeout: int = 600):
  """Runs `script` in a fresh Python with `devices` fake CPU devices.

  The script prints `RESULT<json>` last; returns the parsed JSON. Fake
  devices must be set before JAX initialises, hence the subprocess.
  """
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )
  result = subprocess.run(
    [sys.executable, '-c', script],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.split('RESULT')[-1])


def tiny_config(data_dir=None, **train):
  """Fashion-MNIST (the test's 40 + 23 images), width 0.35, 32 pixels, SGD.

  Built field by field, not from a shipped recipe: a recipe change must not
  move the golden values. The golden loss is for this plain network.
  """
  config = defaults.get_config()
  config.model.update(width_multiplier=0.35, dropout_rate=0.0, bn_momentum=0.9)
  config.data.update(
    name='fashion_mnist',
    data_dir=data_dir,
    image_size=32,
    batch_size=8,
    eval_batch_size=8,
    eval_split='test',
    crop_area_range=(1.0, 1.0),
    crop_min_object_covered=0.0,
    eval_crop_fraction=1.0,
    eval_flip_average=True,
    shuffle_buffer=64,
    cache=True,
    threadpool_size=1,
  )
  config.optim.update(
    optimizer='sgd',
    nesterov=True,
    learning_rate=0.1,
    lr_reference_batch=256,
    schedule='cosine',
    warmup_epochs=0.2,
    weight_decay=2e-3,
    weight_decay_mask='no_norm',
    label_smoothing=0.0,
    ema_decay=0.99,
  )
  config.train.update(
    num_epochs=7.5,
    dtype='float32',
    log_every_steps=2,
    eval_every_steps=1000,
    compilation_cache_dir='',
  )
  # A save at the end only: tests of resuming set their own interval.
  config.checkpoint.update(every_steps=1000, keep=2, async_save=False)
  config.train.update(train)
  return config


def snapshot(directory) -> dict[str, str]:
  """{relative path: sha1 of the content} of every file under `directory`
  (directories as 'dir'): what "nothing changed" compares. Python's own
  bytecode caches (`__pycache__`, written when a config file is imported
  unless PYTHONDONTWRITEBYTECODE is set) are not the user's files."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if d != '__pycache__']
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory)] = 'dir'
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha1(
          f.read()
        ).hexdigest()
  return out


def truncate_largest_array(step_dir) -> None:
  """Cuts the largest array file of a checkpoint step to a third: what a
  disk error or a careless copy leaves."""
  files = [
    os.path.join(root, f)
    for root, _, names in os.walk(os.path.join(step_dir, 'state'))
    for f in names
  ]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 3)


@dataclasses.dataclass
class Compiles:
  """What a call compiled: XLA compiles in all (`total`, `names`), and the
  steps it built (traced, so lowered and compiled or loaded: the project's
  `train_step`, `train_steps` and `eval_step`, counted by their own names),
  in all and once training started (after `programs.prepare` returned: not
  built ahead of time)."""

  total: int = 0
  steps: int = 0
  steps_in_loop: int = 0
  names: list = dataclasses.field(default_factory=list)


STEP_FUNCTIONS = ('train_step', 'train_steps', 'eval_step')


def count_compiles(run, clear: bool = True):
  """Runs `run()`; returns its result and its `Compiles`. Unless `clear` is
  False, JAX's in-memory caches and the programs `mnv2_flax.train.programs`
  keeps for reuse are cleared first: the count does not depend on what ran
  before in this process."""
  if clear:
    jax.clear_caches()
    programs.forget()
  compiles, training, depth = Compiles(), [False], [0]

  def on_compile(event, seconds, fun_name=None, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.total += 1
      compiles.names.append(fun_name)

  def counted(name, fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      if not depth[0]:  # train_steps calls train_step: one build
        compiles.steps += 1
        compiles.steps_in_loop += training[0]
        compiles.names.append(name)
      depth[0] += 1
      try:
        return fn(*args, **kwargs)
      finally:
        depth[0] -= 1

    return traced

  prepare = programs.prepare

  def prepared(*args, **kwargs):
    out = prepare(*args, **kwargs)
    training[0] = True
    return out

  originals = {n: getattr(steps_lib, n) for n in STEP_FUNCTIONS}
  jax.monitoring.register_event_duration_secs_listener(on_compile)
  programs.prepare = prepared
  for name, fn in originals.items():
    setattr(steps_lib, name, counted(name, fn))
  try:
    result = run()
  finally:
    programs.prepare = prepare
    for name, fn in originals.items():
      setattr(steps_lib, name, fn)
    jax.monitoring.unregister_event_duration_listener(on_compile)
  return result, compiles


def mount_tmpfs(path, size: str) -> bool:
  """Mounts a tmpfs of `size` (e.g. '10m') at `path`; False where this
  process may not mount (not root)."""
  return not subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
    capture_output=True,
    check=False,
  ).returncode


def logged(run):
  """Runs `run()`; returns (its result, the absl log lines it wrote)."""
  logger = logging.getLogger('absl')
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  logger.addHandler(handler)
  level = logger.level
  logger.setLevel(logging.INFO)
  try:
    return run(), '\n'.join(records)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def psnr(a, b) -> float:
  """PSNR in dB of two uint8 images (inf where they are equal)."""
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return np.inf if mse == 0 else 10 * np.log10(255**2 / mse)


def area_resize(image, config):
  """`transforms.finish` with an area resize: an alias-free reference."""
  import tensorflow as tf  # noqa: PLC0415

  size = config.data.image_size
  image = tf.image.resize(image, (size, size), method='area')
  return tf.saturate_cast(tf.round(image), tf.uint8)
