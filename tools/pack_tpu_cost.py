"""Deviceless TPU compile of seed packs: cost per seed-step.

  python tools/pack_tpu_cost.py [--packs=1,4,8] [--topology=v5e:1x1]

The quickstart's model (width from --width, 32 px, batch 128 per seed, bf16)
train step, vmapped over a pack of N seeds (`steps._train_fn`), compiled for
a TPU topology with libtpu alone (`make setup-tpu`). Pack 1 is the plain
step (no seed axis). Prints FLOPs, bytes accessed, fusions and XLA's optimal
seconds per step and per seed-step.
"""

import os
import re
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import quickstart  # noqa: E402  pylint: disable=g-import-not-at-top
from mnv2_flax import aot  # noqa: E402
from mnv2_flax import placement  # noqa: E402

_PACKS = flags.DEFINE_list('packs', ['1', '4', '8'], 'Pack sizes.')
_TOPOLOGY = flags.DEFINE_string('topology', 'v5e:1x1', 'TPU topology.')
_WIDTH = flags.DEFINE_float('width', 0.35, 'Width multiplier.')


def main(argv):
  del argv
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
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
