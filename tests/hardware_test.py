"""Where a run executes: the accelerator check, multi-host detection, and
the CPU-only settings and layers kept off other backends."""

import jax
import jax.numpy as jnp
import pytest

from mnv2_flax import models
from mnv2_flax.cpu import fast_path
from mnv2_flax.cpu import host_malloc
from mnv2_flax.cpu import kernels
from mnv2_flax.runtime import hardware


def test_describe_names_platform_and_devices():
  line = hardware.describe()
  assert f'on {jax.default_backend()}' in line
  assert f'{jax.device_count()} device(s) in all' in line


def test_an_accelerator_required_on_cpu_is_one_clear_error():
  hardware.check_accelerator(False)
  with pytest.raises(hardware.AcceleratorMissingError) as e:
    hardware.check_accelerator(True)
  message = str(e.value)
  assert 'only CPU devices' in message
  assert 'requirements-gpu.txt' in message and 'make setup-tpu' in message


@pytest.mark.parametrize(
  'env, expected',
  [
    ({}, ''),
    ({'SLURM_NTASKS': '1'}, ''),
    ({'SLURM_NTASKS': '4'}, 'a Slurm job of 4 tasks'),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1234'}, 'JAX_COORDINATOR_ADDRESS is set'),
  ],
)
def test_multiprocess_detection(monkeypatch, env, expected):
  for name in ('SLURM_NTASKS', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(hardware, 'tpu_host', lambda: False)
  assert hardware.multiprocess_reason(None, None) == expected
  # Flags win over the environment.
  assert hardware.multiprocess_reason(False, 'h:1') == ''
  assert (
    hardware.multiprocess_reason(None, 'h:1') == '--coordinator_address=h:1'
  )
  assert (
    hardware.multiprocess_reason(True, None) == 'requested by --multiprocess'
  )


def test_a_cloud_tpu_vm_initialises_jax_distributed(monkeypatch):
  for name in ('SLURM_NTASKS', 'JAX_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(hardware, 'tpu_host', lambda: True)
  calls = []
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(
    jax.distributed, 'initialize', lambda *args: calls.append(args)
  )
  assert hardware.initialize_distributed()
  # No arguments: JAX reads the slice's workers from the TPU metadata.
  assert calls == [(None, None, None)]
  monkeypatch.setattr(hardware, 'tpu_host', lambda: False)
  assert not hardware.initialize_distributed()
  assert len(calls) == 1


@pytest.mark.parametrize(
  'platforms, expected',
  [('cpu', False), ('cuda', True), ('tpu,cpu', True), ('cpu,cuda', False)],
)
def test_cpu_host_settings_only_for_the_cpu_backend(
  monkeypatch, platforms, expected
):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert hardware.accelerator_expected() == expected
  if expected:  # the allocator is left alone on a GPU or TPU host
    monkeypatch.setattr(
      host_malloc, 'configure', lambda: pytest.fail('configured')
    )
    assert fast_path.configure_host() is False


def test_cpu_layers_refuse_another_backend(monkeypatch):
  layers = fast_path.layers()
  if not layers:
    pytest.skip('the CPU layers are switched off (MNV2_FLAX_CPU=0)')
  model = models.MobileNetV2(num_classes=10, width_multiplier=0.35, **layers)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(kernels.NotOnCpuError, match='runs on gpu'):
    jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)


def test_shares_split_gpus_by_visible_devices(monkeypatch):
  monkeypatch.setattr(hardware, 'expected_platform', lambda: 'gpu')
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,5')
  assert hardware.visible_gpus() == ['0', '1', '2', '5']
  shares = hardware.shares(3)
  assert [s.env for s in shares] == [
    {'CUDA_VISIBLE_DEVICES': '0,1'},
    {'CUDA_VISIBLE_DEVICES': '2'},
    {'CUDA_VISIBLE_DEVICES': '5'},
  ]
  assert all(s.cpus == () for s in shares)
  with pytest.raises(ValueError, match='--parallel=5: 4 GPU'):
    hardware.shares(5)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  with pytest.raises(ValueError, match=r'0 GPU\(s\) visible \(none\)'):
    hardware.shares(1)


def test_shares_split_cpu_cores_and_refuse_a_tpu_host(monkeypatch):
  monkeypatch.setattr(hardware, 'expected_platform', lambda: 'cpu')
  monkeypatch.setattr(
    hardware.os, 'sched_getaffinity', lambda _: {0, 1, 2, 3, 4}
  )
  shares = hardware.shares(2)
  assert [s.cpus for s in shares] == [(0, 1, 2), (3, 4)]
  assert [s.env for s in shares] == [{}, {}]
  with pytest.raises(ValueError, match='at most one process per core'):
    hardware.shares(6)
  monkeypatch.setattr(hardware, 'expected_platform', lambda: 'tpu')
  with pytest.raises(ValueError, match='--shard=i/n or --submit=slurm'):
    hardware.shares(2)


@pytest.mark.parametrize(
  'platforms, expected', [('cuda', 'gpu'), ('tpu,cpu', 'tpu'), ('cpu', 'cpu')]
)
def test_expected_platform_follows_jax_platforms(
  monkeypatch, platforms, expected
):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  assert hardware.expected_platform() == expected


def test_gpu_deterministic_ops_reach_xla_flags_once(monkeypatch):
  """train.py and sweep workers add XLA's flag before JAX starts; a sweep
  passes it to its workers as an override."""
  from mnv2_flax.sweep import grid  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  hardware.add_xla_flag(hardware.GPU_DETERMINISTIC_FLAG)
  hardware.add_xla_flag(hardware.GPU_DETERMINISTIC_FLAG)
  assert hardware.os.environ['XLA_FLAGS'].split() == [
    '--xla_force_host_platform_device_count=2',
    '--xla_gpu_deterministic_ops=true',
  ]
  key = grid.GPU_DETERMINISTIC
  assert grid.gpu_deterministic_ops({key: 'True'})
  assert not grid.gpu_deterministic_ops({key: 'False'})
  assert not grid.gpu_deterministic_ops({})
