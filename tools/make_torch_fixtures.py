"""Writes PyTorch reference logits for tests/convert_test.py.

Builds torchvision-layout MobileNetV2s, gives them non-trivial BatchNorm
statistics, and saves their state dicts, inputs (NHWC) and eval-mode logits to
tests/testdata/torch_mobilenet_v2.npz. The Flax test converts the state dicts
with `mnv2_flax.convert.from_torchvision` and compares logits.

To keep the fixture small, conv and linear weights are snapped to a per-tensor
8-bit grid (int8 values times a float32 scale) *before* the reference logits
are computed, so both frameworks see exactly the same float32 weights.

Run it in a Python 3.11 virtual environment with PyTorch (not a dependency of
the project):
  python3.11 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python tools/make_torch_fixtures.py

torchvision is used when it imports; otherwise the model below, which
reproduces torchvision's `mobilenet_v2` module tree, parameter names and
forward pass, is used (PyPI's torchvision does not import beside the torch
2.13.0 CPU build). `--check_against_torchvision` compares the two.
"""

import argparse
import json
import os

import numpy as np
import torch
from torch import nn

# (model name, width multiplier, classes, [(input name, N, H, W)]).
MODELS = (
  (
    'w035',
    0.35,
    100,
    [('r32', 2, 32, 32), ('r97', 2, 97, 97), ('r64x48', 1, 64, 48)],
  ),
  ('w100', 1.0, 10, [('r33', 2, 33, 33), ('r224', 1, 224, 224)]),
)


def _make_divisible(v, divisor=8):
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def _conv_bn_relu6(inp, oup, kernel, stride=1, groups=1):
  return nn.Sequential(
    nn.Conv2d(
      inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
    ),
    nn.BatchNorm2d(oup),
    nn.ReLU6(inplace=True),
  )


class InvertedResidual(nn.Module):
  """torchvision.models.mobilenetv2.InvertedResidual's layout."""

  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    hidden = int(round(inp * expand_ratio))
    self.use_res_connect = stride == 1 and inp == oup
    layers = []
    if expand_ratio != 1:
      layers.append(_conv_bn_relu6(inp, hidden, 1))
    layers += [
      _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
      nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
      nn.BatchNorm2d(oup),
    ]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
  """torchvision.models.MobileNetV2's layout (features.*, classifier.1)."""

  def __init__(self, num_classes=1000, width_mult=1.0):
    super().__init__()
    settings = [
      (1, 16, 1, 1),
      (6, 24, 2, 2),
      (6, 32, 3, 2),
      (6, 64, 4, 2),
      (6, 96, 3, 1),
      (6, 160, 3, 2),
      (6, 320, 1, 1),
    ]
    inp = _make_divisible(32 * width_mult)
    self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
    features = [_conv_bn_relu6(3, inp, 3, 2)]
    for t, c, n, s in settings:
      oup = _make_divisible(c * width_mult)
      for i in range(n):
        features.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
        inp = oup
    features.append(_conv_bn_relu6(inp, self.last_channel, 1))
    self.features = nn.Sequential(*features)
    self.classifier = nn.Sequential(
      nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes)
    )

  def forward(self, x):
    x = self.features(x)
    x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
    return self.classifier(torch.flatten(x, 1))


def build(width, num_classes):
  try:
    import torchvision  # pylint: disable=g-import-not-at-top

    return torchvision.models.mobilenet_v2(
      width_mult=width, num_classes=num_classes
    ), True
  except ImportError:
    return MobileNetV2(num_classes=num_classes, width_mult=width), False


def randomise(model, generator):
  """Non-trivial BN affine parameters and running statistics, 8-bit weights."""
  scales = {}
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.0, 0.2, generator=generator)
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        w = module.weight
        w.normal_(0.0, float(np.sqrt(2.0 / w[0].numel())), generator=generator)
        scale = float(w.abs().max()) / 127.0
        w.copy_(torch.round(w / scale) * scale)
        scales[name + '.weight'] = scale
      if isinstance(module, nn.Linear):
        module.bias.normal_(0.0, 0.1, generator=generator)
    # One train-mode pass with momentum 1 sets the running statistics to the
    # statistics of a real batch (torch stores the unbiased variance).
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.momentum = 1.0
    model.train()
    model(torch.rand(8, 3, 64, 64, generator=generator) * 2 - 1)
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.momentum = 0.1
  model.eval()
  return scales


def add_model(arrays, name, model, scales, inputs, generator):
  """Adds the state dict (8-bit weights as int8 and a scale), and each input
  (NHWC) with the model's eval-mode logits, under `name/`."""
  for key, value in model.state_dict().items():
    value = value.numpy()
    if key in scales:
      arrays[f'{name}/q/{key}'] = np.round(value / scales[key]).astype(np.int8)
      arrays[f'{name}/scale/{key}'] = np.float32(scales[key])
    else:
      arrays[f'{name}/sd/{key}'] = value
  for input_name, n, h, w in inputs:
    x_nchw = torch.rand(n, 3, h, w, generator=generator) * 2 - 1
    with torch.no_grad():
      logits = model(x_nchw).numpy()
    arrays[f'{name}/input/{input_name}'] = x_nchw.permute(0, 2, 3, 1).numpy()
    arrays[f'{name}/logits/{input_name}'] = logits


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--out',
    default=os.path.join(
      os.path.dirname(__file__),
      '..',
      'tests',
      'testdata',
      'torch_mobilenet_v2.npz',
    ),
  )
  parser.add_argument(
    '--check_against_torchvision',
    action='store_true',
    help='Assert that the replica equals torchvision.',
  )
  args = parser.parse_args()
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(0)
  arrays, meta = {}, {'models': []}
  for name, width, classes, inputs in MODELS:
    model, is_torchvision = build(width, classes)
    scales = randomise(model, generator)
    entry = dict(
      name=name,
      width_multiplier=width,
      num_classes=classes,
      built_with='torchvision' if is_torchvision else 'replica',
      inputs=[],
    )
    add_model(arrays, name, model, scales, inputs, generator)
    entry['inputs'] = [i[0] for i in inputs]
    if args.check_against_torchvision:
      import torchvision  # pylint: disable=g-import-not-at-top

      replica = MobileNetV2(num_classes=classes, width_mult=width)
      reference = torchvision.models.mobilenet_v2(
        width_mult=width, num_classes=classes
      )
      reference.load_state_dict(model.state_dict())
      replica.load_state_dict(model.state_dict())
      x = torch.rand(2, 3, 97, 75, generator=generator)
      with torch.no_grad():
        diff = (replica.eval()(x) - reference.eval()(x)).abs().max().item()
      print(f'{name}: replica vs torchvision max abs diff {diff:.3g}')
      assert diff == 0.0, diff
    meta['models'].append(entry)
    print(
      name,
      entry['built_with'],
      'logit std',
      float(np.std(arrays[f'{name}/logits/{inputs[0][0]}'])),
    )
  arrays['meta'] = np.array(json.dumps(meta))
  np.savez_compressed(args.out, **arrays)
  print('wrote', os.path.abspath(args.out), os.path.getsize(args.out), 'bytes')


if __name__ == '__main__':
  main()
