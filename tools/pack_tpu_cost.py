"""Deviceless TPU compile of seed packs: cost per seed-step.

  python tools/pack_tpu_cost.py [--packs=1,4,8] [--topology=v5e:1x1]
      [--pointwise=matmul] [--hlo_dir=DIR]

The quickstart's model (width from --width, 32 px, batch 128 per seed, bf16)
train step, vmapped over a pack of N seeds (`steps._train_fn`), compiled for
a TPU topology with libtpu alone (`make setup-tpu`). Pack 1 is the plain
step (no seed axis). Prints FLOPs, bytes accessed, fusions and XLA's optimal
seconds per step and per seed-step. `--pointwise=matmul` compiles the model
with its 1x1 stride-1 convs written as matrix multiplies (the variables
unchanged): under vmap those are batched matmuls rather than grouped convs.
"""

import functools
import os
import re
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import quickstart  # noqa: E402  pylint: disable=g-import-not-at-top
from mnv2_flax.benchmark import aot  # noqa: E402
from mnv2_flax.runtime import placement  # noqa: E402
from mnv2_flax.train import training_state  # noqa: E402

_PACKS = flags.DEFINE_list('packs', ['1', '4', '8'], 'Pack sizes.')
_TOPOLOGY = flags.DEFINE_string('topology', 'v5e:1x1', 'TPU topology.')
_WIDTH = flags.DEFINE_float('width', 0.35, 'Width multiplier.')
_HLO_DIR = flags.DEFINE_string(
  'hlo_dir', '', "Also write each pack's compiled HLO text here."
)
_POINTWISE = flags.DEFINE_enum(
  'pointwise', 'conv', ['conv', 'matmul'], 'How the 1x1 convs are written.'
)


def _pointwise_matmul(lhs, rhs, window_strides, padding, **kwargs):
  """`lax.conv_general_dilated`, with 1x1 stride-1 NHWC convs as a matmul."""
  plain = (
    rhs.shape[:2] == (1, 1)
    and all(s == 1 for s in window_strides)
    and kwargs.get('feature_group_count', 1) == 1
    and all(
      d == 1
      for key in ('lhs_dilation', 'rhs_dilation')
      for d in (kwargs.get(key) or (1, 1))
    )
  )
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
  return lax.dot_general(
    lhs,
    rhs[0, 0],
    (((3,), (0,)), ((), ())),
    kwargs.get('precision'),
    preferred_element_type=kwargs.get('preferred_element_type'),
  )


def _with_matmuls(create_model):
  @functools.wraps(create_model)
  def create(*args, **kwargs):
    model = create_model(*args, **kwargs)
    return model.clone(
      conv=functools.partial(nn.Conv, conv_general_dilated=_pointwise_matmul)
    )

  return create


def main(argv):
  del argv
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if _POINTWISE.value == 'matmul':
    training_state.create_model = _with_matmuls(training_state.create_model)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  desc = topologies.get_topology_desc(
    topology_name=_TOPOLOGY.value, platform='tpu'
  )
  mesh = placement.device_mesh(desc.devices)
  config = quickstart.get_config()
  config.model.width_multiplier = _WIDTH.value
  config.data.batch_size = 128 * mesh.devices.size
  print(
    '| pack | GFLOP/step | MB accessed/step | fusions | optimal ms/step | '
    'optimal ms per seed-step | compile s |'
  )
  print('|---|---|---|---|---|---|---|')
  for pack in (int(p) for p in _PACKS.value):
    (train, args), _ = aot.sharded_programs(
      config, mesh, pack=0 if pack == 1 else pack
    )
    start = time.perf_counter()
    compiled = train.trace(*args).lower().compile()
    seconds = time.perf_counter() - start
    if _HLO_DIR.value:
      os.makedirs(_HLO_DIR.value, exist_ok=True)
      with open(os.path.join(_HLO_DIR.value, f'pack{pack}.hlo'), 'w') as f:
        f.write(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    fusions = len(re.findall(r'^\s*\S*fusion\S* = ', compiled.as_text(), re.M))
    optimal = cost.get('optimal_seconds', float('nan')) * 1e3
    print(
      f'| {pack} | {cost["flops"] / 1e9:.2f} | '
      f'{cost["bytes accessed"] / 1e6:,.0f} | {fusions} | {optimal:.3f} | '
      f'{optimal / pack:.3f} | {seconds:.0f} |',
      flush=True,
    )


if __name__ == '__main__':
  app.run(main)
