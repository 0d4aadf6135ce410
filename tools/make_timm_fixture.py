"""Writes timm reference logits for tests/convert_test.py.

Builds real timm `mobilenetv2_*` models (random weights: nothing is
downloaded), gives them non-trivial BatchNorm statistics and 8-bit-grid
weights (`make_torch_fixtures.randomise`), and saves their state dicts,
inputs (NHWC) and eval-mode logits to tests/testdata/timm_mobilenet_v2.npz.
The Flax test writes each state dict as a `.safetensors` file, converts it
with `mnv2_flax.convert.from_timm` and compares logits.

timm imports torchvision, which imports only beside a matching torch build.
Run it in a Python 3.11 virtual environment (not a dependency of the
project):
  python3.11 -m venv /tmp/timmvenv
  /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
  /tmp/timmvenv/bin/pip install timm==1.0.31 numpy
  /tmp/timmvenv/bin/python tools/make_timm_fixture.py
"""

import argparse
import json
import os

from make_torch_fixtures import add_model
from make_torch_fixtures import randomise
import numpy as np
import timm
import torch

# (timm model, width multiplier, classes, [(input name, N, H, W)]).
MODELS = (
  ('mobilenetv2_035', 0.35, 10, [('r32', 2, 32, 32), ('r45', 2, 45, 45)]),
  ('mobilenetv2_050', 0.5, 10, [('r64x48', 2, 64, 48)]),
  ('mobilenetv2_140', 1.4, 10, [('r33', 2, 33, 33)]),
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--out',
    default=os.path.join(
      os.path.dirname(__file__),
      '..',
      'tests',
      'testdata',
      'timm_mobilenet_v2.npz',
    ),
  )
  args = parser.parse_args()
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(1)
  arrays = {}
  meta = {'timm': timm.__version__, 'torch': torch.__version__, 'models': []}
  for name, width, classes, inputs in MODELS:
    model = timm.create_model(name, pretrained=False, num_classes=classes)
    scales = randomise(model, generator)
    add_model(arrays, name, model, scales, inputs, generator)
    meta['models'].append(
      dict(
        name=name,
        width_multiplier=width,
        num_classes=classes,
        inputs=[i[0] for i in inputs],
      )
    )
  arrays['meta'] = np.array(json.dumps(meta))
  np.savez_compressed(args.out, **arrays)
  print('wrote', os.path.abspath(args.out), os.path.getsize(args.out), 'bytes')


if __name__ == '__main__':
  main()
