"""The training programs for hardware this host does not have.

Two checks that need no GPU or TPU (`tests/aot_test.py`, `make aot`):

- `lower(config)`: the real train and eval steps, traced as a GPU or TPU
  host traces them (without `mnv2_flax.cpu`'s layers) and lowered for
  'cuda' and 'tpu' on this host; `problems(lowered)` lists what would not run
  there: custom calls (XLA:CPU kernels), float64. A host callback makes the
  lowering itself fail.
- `tpu_cost(config, topology)`: the train step compiled ahead of time for a
  TPU topology (libtpu, no TPU needed): FLOPs, bytes accessed and temporary
  memory after XLA's TPU fusion, as XLA reports them for one chip.

  python -m mnv2_flax.benchmark --config=configs/default.py \
      --aot_topology=v5e:2x2
"""

import dataclasses
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mnv2_flax.runtime import hardware
from mnv2_flax.runtime import placement
from mnv2_flax.train import steps
from mnv2_flax.train import training_state

# Classes of the datasets the configs name; others: `num_classes=`.
NUM_CLASSES = {'imagenet2012': 1000, 'fashion_mnist': 10}

# Custom calls every sharded JAX program carries: partitioner annotations.
_SHARDING_CALLS = ('Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape')


def _num_classes(config, num_classes):
  if num_classes is not None:
    return num_classes
  if config.data.name not in NUM_CLASSES:
    raise ValueError(
      f'config.data.name={config.data.name!r}: pass num_classes (known: '
      f'{", ".join(NUM_CLASSES)}).'
    )
  return NUM_CLASSES[config.data.name]


def sharded_programs(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  num_classes: int | None = None,
  pack: int = 0,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """((train step, its args), (eval step, its args)): the steps of
  `steps.sharded_steps` as a GPU or TPU host builds them (no CPU
  layers), with their arguments as shapes on `mesh`
  (`config.data.batch_size`, global, split over the mesh's devices; with
  `pack` = N, N seeds stacked, each with a batch of that size)."""
  num_classes = _num_classes(config, num_classes)
  config = _off_cpu(config)
  model = training_state.create_model(config, num_classes)
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=1000)
  train, evaluate = steps.sharded_steps(config, lr, mesh, pack)
  replicated = placement.replicated(mesh)
  seeds = (pack,) if pack else ()
  state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      seeds + x.shape, x.dtype, sharding=replicated
    ),
    training_state.abstract_train_state(config, model, lr),
  )
  devices = mesh.devices.size
  size = config.data.image_size

  def batch(global_size, extra, seeds=()):
    if global_size % devices:
      raise ValueError(
        f'batch size {global_size} does not split over {devices} devices.'
      )
    per_device = global_size // devices
    shape = (devices, *seeds, per_device)
    spec = {
      'image': (shape + (size, size, 3), np.uint8),
      'label': (shape, np.int32),
    }
    spec.update(extra(shape))
    return placement.placed(
      {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()},
      placement.split(mesh),
    )

  rng = jax.ShapeDtypeStruct(
    seeds, jax.random.key(0).dtype, sharding=replicated
  )
  hparams = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    training_state.hyperparameters(config, pack),
  )
  train_args = (
    state,
    batch(config.data.batch_size, lambda s: {}, seeds),
    rng,
    hparams,
  )
  eval_args = (
    state,
    batch(config.data.eval_batch_size, lambda s: {'mask': (s, np.float32)}),
  )
  return (train, train_args), (evaluate, eval_args)


def _off_cpu(config):
  """The config as a GPU or TPU host runs it: no CPU layers."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.cpu_fast_path = False
  return config


def lower(
  config: ml_collections.ConfigDict,
  platforms: tuple[str, ...] = ('cuda', 'tpu'),
  num_classes: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[tuple[str, str], jax.stages.Lowered]:
  """The train and eval steps, traced once on this host's devices (or
  `mesh`) and lowered for each of `platforms` ('cuda', 'rocm', 'tpu',
  'cpu'); keys (platform, 'train step' or 'eval step')."""
  mesh = mesh or placement.device_mesh()
  (train, train_args), (evaluate, eval_args) = sharded_programs(
    config, mesh, num_classes
  )
  traced = {
    'train step': train.trace(*train_args),
    'eval step': evaluate.trace(*eval_args),
  }
  return {
    (platform, name): t.lower(lowering_platforms=(platform,))
    for platform in platforms
    for name, t in traced.items()
  }


def problems(lowered: jax.stages.Lowered) -> list[str]:
  """What in a lowered program would not run on an accelerator: custom
  calls other than the partitioner's (XLA:CPU kernels) and float64 values
  (a host callback fails earlier, in the lowering). Empty if none."""
  text = lowered.as_text()
  found = []
  for target in sorted(set(re.findall(r'custom_call @([\w.$-]+)', text))):
    if target not in _SHARDING_CALLS:
      found.append(f'custom call {target}')
  if re.search(r'\bf64\b', text):
    found.append('float64 values')
  return found


@dataclasses.dataclass(frozen=True)
class Cost:
  """One chip's compiled train step, as XLA reports it."""

  topology: str
  devices: int
  per_device_batch: int
  gflop: float  # per step, one chip
  gbytes_accessed: float  # per step, one chip
  mbytes_per_image: float
  temp_gbytes: float
  argument_gbytes: float
  compile_seconds: float

  def format(self) -> str:
    return (
      f'TPU {self.topology} ({self.devices} chip(s)), '
      f'{self.per_device_batch} images per chip: {self.gflop:,.1f} GFLOP and '
      f'{self.gbytes_accessed:,.1f} GB accessed per step per chip '
      f'({self.mbytes_per_image:,.0f} MB per image); temporaries '
      f'{self.temp_gbytes:.2f} GB, arguments {self.argument_gbytes:.2f} GB; '
      f'compiled in {self.compile_seconds:.0f} s'
    )


def tpu_cost(
  config: ml_collections.ConfigDict,
  topology: str = 'v5e:2x2',
  num_classes: int | None = None,
) -> Cost:
  """Compiles the train step for a TPU topology with no TPU (needs libtpu:
  `make setup-tpu`); `config.data.batch_size` is split over its chips."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if not hardware.tpu_host():
    # No TPU to guard: without it a second process compiling at the same
    # time fails on libtpu's lockfile (/tmp/libtpu_lockfile).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform='tpu')
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
      f'--aot_topology={topology!r}: no TPU compiler for it ({e}); a '
      "topology such as 'v5e:2x2' and libtpu (`make setup-tpu`) are needed."
    ) from None
  mesh = placement.device_mesh(desc.devices)
  (train, train_args), _ = sharded_programs(config, mesh, num_classes)
  start = time.perf_counter()
  compiled = train.trace(*train_args).lower().compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  per_device = train_args[1]['image'].shape[1]
  return Cost(
    topology=topology,
    devices=mesh.devices.size,
    per_device_batch=per_device,
    gflop=cost['flops'] / 1e9,
    gbytes_accessed=cost['bytes accessed'] / 1e9,
    mbytes_per_image=cost['bytes accessed'] / per_device / 1e6,
    temp_gbytes=memory.temp_size_in_bytes / 1e9,
    argument_gbytes=memory.argument_size_in_bytes / 1e9,
    compile_seconds=seconds,
  )
