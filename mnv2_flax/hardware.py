"""Where a run executes: the platform line, the accelerator check, and
`jax.distributed` for multi-host jobs.

  hardware.initialize_distributed()   # before anything else touches JAX
  logging.info(hardware.describe())    # 'JAX 0.12.0.1 on gpu: 8 devices ...'
  hardware.check_accelerator(config.train.require_accelerator)

JAX falls back to the CPU with one log line when the installed jaxlib has no
plugin for the machine's GPU or TPU (the CPU pins of `requirements.txt`, a
CUDA library that does not load); `require_accelerator` turns that into an
error before anything is built.
"""

import glob
import importlib.util
import os

from absl import logging
import jax

INSTALL = (
  'install the accelerator build of JAX into the venv: `make setup-gpu` '
  '(pip install -r requirements-gpu.txt, CUDA 12) or `make setup-tpu` '
  '(pip install -r requirements-tpu.txt), then check that '
  '`python -c "import jax; print(jax.devices())"` lists it'
)


class AcceleratorMissingError(ValueError):
  """An accelerator was required and JAX runs on the CPU."""


def describe() -> str:
  """One line: JAX version, platform, device count and kind, processes."""
  kinds = sorted({d.device_kind for d in jax.local_devices()})
  return (
    f'JAX {jax.__version__} on {jax.default_backend()}: '
    f'{jax.device_count()} device(s) in all, {jax.local_device_count()} '
    f'here ({", ".join(kinds)}); process {jax.process_index()} of '
    f'{jax.process_count()}.'
  )


def check_accelerator(required: bool) -> None:
  """Raises AcceleratorMissingError if `required` and JAX runs on CPU."""
  if required and jax.default_backend() == 'cpu':
    raise AcceleratorMissingError(
      'config.train.require_accelerator=True, but JAX found only CPU devices '
      f'({len(jax.devices())}, jaxlib {jax.lib.__version__}); {INSTALL}.'
    )


def _installed(*modules: str) -> bool:
  return any(importlib.util.find_spec(m) for m in modules)


def tpu_host() -> bool:
  """TPU chips (Cloud TPU VMs expose them as /dev/accel* or, from v5e on,
  VFIO devices) and libtpu installed."""
  chips = glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*')
  return bool(chips) and _installed('libtpu')


def accelerator_expected() -> bool:
  """Whether JAX will run on a GPU or TPU here, decided before it starts
  (for settings that must precede it): `JAX_PLATFORMS`'s first entry if
  set; otherwise an NVIDIA GPU with JAX's CUDA plugin, or `tpu_host()`."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  gpu = bool(glob.glob('/dev/nvidia[0-9]*')) and _installed(
    'jax_cuda12_plugin', 'jax_cuda13_plugin'
  )
  return gpu or tpu_host()


def multiprocess_reason(explicit: bool | None, coordinator: str | None) -> str:
  """Why this process joins a multi-process job, or '' if it does not.

  `explicit` is train.py's --multiprocess (None: decide from the
  environment). JAX's own detection then fills in what is not given:
  Slurm's variables, a Cloud TPU VM's metadata (every TPU VM, one host or
  a slice), Open MPI, Kubernetes.
  """
  if explicit is not None:
    return 'requested by --multiprocess' if explicit else ''
  if coordinator:
    return f'--coordinator_address={coordinator}'
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS is set'
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return f'a Slurm job of {os.environ["SLURM_NTASKS"]} tasks'
  if tpu_host():
    return 'a Cloud TPU VM (one host or a slice)'
  return ''


def initialize_distributed(
  explicit: bool | None = None,
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Calls `jax.distributed.initialize` where `multiprocess_reason` says so.

  Must run before JAX creates its backends (any device query). Returns
  whether it did. Orbax's multi-process checkpointing needs it too.
  """
  reason = multiprocess_reason(explicit, coordinator)
  if not reason or jax.distributed.is_initialized():
    return False
  logging.info('Initialising jax.distributed: %s.', reason)
  jax.distributed.initialize(coordinator, num_processes, process_id)
  return True
