"""Images/s a TPU v5e chip could train each point of the paper's Fig. 5
grid at, and the host cores that would keep it fed.

The train step of each width is compiled for one v5e chip with no TPU
(`benchmark.aot.tpu_cost`, libtpu: `make setup-tpu`) at the two ends of the
resolution range, batch 256, bfloat16; between them its bytes and FLOPs per
image are interpolated as a power of the resolution (fitted on the two
ends). A chip's roofline, max(FLOPs / 197 TFLOP/s, bytes / 819 GB/s), bounds
its step time from below, so the images/s are an upper bound on what the
host must supply; the cores needed are that over the pipeline's images/s
per core (`python -m mnv2_flax.benchmark --input_pipeline --photos`).

  python tools/input_demand.py --costs=/tmp/costs.jsonl \
      --per_core=96:2900,128:2000,160:1400,192:1000,224:800

Compiles are cached in --costs (one JSON line per width and resolution);
each takes 2-3 minutes on a 2-core CPU.
"""

import json
import math
import os

from absl import app
from absl import flags

_COSTS = flags.DEFINE_string('costs', None, 'JSON-lines cache of compiles.')
_WIDTHS = flags.DEFINE_list('widths', ['0.35', '0.5', '0.75', '1.0', '1.4'], '')
_RESOLUTIONS = flags.DEFINE_list(
  'resolutions', ['96', '128', '160', '192', '224'], ''
)
_PER_CORE = flags.DEFINE_list(
  'per_core', [], 'resolution:images/s per core of the host pipeline.'
)
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Per chip.')

V5E_FLOPS = 197e12  # bfloat16, per chip
V5E_BYTES = 819e9  # HBM bytes/s, per chip


def _cost(width: float, resolution: int, cache: dict) -> dict:
  key = f'{width} {resolution}'
  if key not in cache:
    # pylint: disable=g-import-not-at-top
    from mnv2_flax import defaults
    from mnv2_flax.benchmark import aot
    # pylint: enable=g-import-not-at-top

    config = defaults.get_config()  # configs/default.py's step
    config.model.width_multiplier = width
    config.data.image_size = resolution
    config.data.batch_size = _BATCH.value
    cost = aot.tpu_cost(config, 'v5e:1x1')
    cache[key] = dict(
      gflop=cost.gflop, gbytes_accessed=cost.gbytes_accessed, batch=_BATCH.value
    )
    if _COSTS.value:
      with open(_COSTS.value, 'a') as f:
        f.write(f'{width} {resolution} {json.dumps(cache[key])}\n')
  return cache[key]


def _read_cache() -> dict:
  cache = {}
  if _COSTS.value and os.path.exists(_COSTS.value):
    with open(_COSTS.value) as f:
      for line in f:
        width, resolution, data = line.split(' ', 2)
        cache[f'{float(width)} {int(resolution)}'] = json.loads(data)
  return cache


def main(argv):
  del argv
  cache = _read_cache()
  resolutions = [int(r) for r in _RESOLUTIONS.value]
  low, high = min(resolutions), max(resolutions)
  per_core = dict(
    (int(r), float(v)) for r, v in (item.split(':') for item in _PER_CORE.value)
  )
  print(
    '| width | ' + ' | '.join(f'{r} px' for r in resolutions) + ' |\n'
    '|---|' + '---:|' * len(resolutions)
  )
  for width in (float(w) for w in _WIDTHS.value):
    ends = {r: _cost(width, r, cache) for r in (low, high)}
    cells = []
    for r in resolutions:
      per_image = {}
      for field in ('gflop', 'gbytes_accessed'):
        a, b = (ends[e][field] / ends[e]['batch'] for e in (low, high))
        power = math.log(b / a) / math.log(high / low)
        per_image[field] = a * (r / low) ** power
      seconds = max(
        per_image['gflop'] * 1e9 / V5E_FLOPS,
        per_image['gbytes_accessed'] * 1e9 / V5E_BYTES,
      )
      demand = 1 / seconds
      cell = f'{demand:,.0f}'
      if r in per_core:
        cell += f' ({math.ceil(demand / per_core[r])} cores)'
      cells.append(cell)
    print(f'| {width} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  app.run(main)
