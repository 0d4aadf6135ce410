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

import dataclasses
import glob
import importlib.util
import os

from absl import logging

# JAX loads in the functions that start it: deciding where to run, and
# splitting the devices between processes, must not start it.

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
  import jax  # pylint: disable=g-import-not-at-top

  kinds = sorted({d.device_kind for d in jax.local_devices()})
  return (
    f'JAX {jax.__version__} on {jax.default_backend()}: '
    f'{jax.device_count()} device(s) in all, {jax.local_device_count()} '
    f'here ({", ".join(kinds)}); process {jax.process_index()} of '
    f'{jax.process_count()}.'
  )


GPU_DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'


def add_xla_flag(flag: str) -> None:
  """Appends `flag` to XLA_FLAGS (once); XLA reads it when JAX starts."""
  flags = os.environ.get('XLA_FLAGS', '').split()
  if flag not in flags:
    os.environ['XLA_FLAGS'] = ' '.join([*flags, flag])


def check_accelerator(required: bool) -> None:
  """Raises AcceleratorMissingError if `required` and JAX runs on CPU."""
  import jax  # pylint: disable=g-import-not-at-top

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


def expected_platform() -> str:
  """'gpu', 'tpu' or 'cpu': where JAX will run here, decided before it
  starts (for settings that must precede it, and to leave the devices to
  child processes): `JAX_PLATFORMS`'s first entry if set; otherwise an
  NVIDIA GPU with JAX's CUDA plugin, or `tpu_host()`."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    first = platforms.split(',')[0].strip()
    return {'cuda': 'gpu', 'rocm': 'gpu'}.get(first, first)
  if glob.glob('/dev/nvidia[0-9]*') and _installed(
    'jax_cuda12_plugin', 'jax_cuda13_plugin'
  ):
    return 'gpu'
  return 'tpu' if tpu_host() else 'cpu'


def accelerator_expected() -> bool:
  """Whether JAX will run on a GPU or TPU here (`expected_platform`)."""
  return expected_platform() != 'cpu'


@dataclasses.dataclass(frozen=True)
class Share:
  """The devices one of several processes on this host gets."""

  label: str
  env: dict[str, str]  # e.g. CUDA_VISIBLE_DEVICES
  cpus: tuple[int, ...] = ()  # cores to pin to (CPU platform)

  def pin(self) -> None:
    """Runs in the child before it starts (`Popen(preexec_fn=...)`)."""
    if self.cpus:
      os.sched_setaffinity(0, self.cpus)


def visible_gpus() -> list[str]:
  """The GPUs this process may use: CUDA_VISIBLE_DEVICES, or /dev/nvidiaN."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [
      g.strip() for g in visible.split(',') if g.strip() not in ('', '-1')
    ]
  return sorted(
    (p.removeprefix('/dev/nvidia') for p in glob.glob('/dev/nvidia[0-9]*')),
    key=int,
  )


def _split(items: list, parts: int) -> list[list]:
  """`items` in `parts` contiguous groups whose sizes differ by at most 1."""
  size, extra = divmod(len(items), parts)
  groups, start = [], 0
  for i in range(parts):
    end = start + size + (i < extra)
    groups.append(items[start:end])
    start = end
  return groups


def shares(count: int) -> list[Share]:
  """This host's devices split between `count` processes, without starting
  JAX here: GPUs through CUDA_VISIBLE_DEVICES (at least one each), on the
  CPU the cores this process may run on (at least one each)."""
  platform = expected_platform()
  if platform == 'gpu':
    gpus = visible_gpus()
    if count > len(gpus):
      raise ValueError(
        f'--parallel={count}: {len(gpus)} GPU(s) visible '
        f'({",".join(gpus) or "none"}); at most one process per GPU.'
      )
    return [
      Share(f'GPU {",".join(g)}', {'CUDA_VISIBLE_DEVICES': ','.join(g)})
      for g in _split(gpus, count)
    ]
  if platform != 'cpu':
    raise ValueError(
      f"--parallel={count} on {platform}: one process owns a TPU host's "
      'chips here; split the sweep between hosts with --shard=i/n or '
      '--submit=slurm instead.'
    )
  cores = sorted(os.sched_getaffinity(0))
  if count > len(cores):
    raise ValueError(
      f'--parallel={count}: this process may use {len(cores)} CPU core(s); '
      'at most one process per core.'
    )
  return [
    Share(f'CPU cores {",".join(map(str, c))}', {}, tuple(c))
    for c in _split(cores, count)
  ]


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
  import jax  # pylint: disable=g-import-not-at-top

  reason = multiprocess_reason(explicit, coordinator)
  if not reason or jax.distributed.is_initialized():
    return False
  logging.info('Initialising jax.distributed: %s.', reason)
  jax.distributed.initialize(coordinator, num_processes, process_id)
  return True
