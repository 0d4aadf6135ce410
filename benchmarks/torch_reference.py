"""PyTorch eager reference timings for `python -m mnv2_flax.benchmark`.

Runs in a Python 3.11 virtual environment with the torch 2.13.0 CPU build
(PyTorch is not a dependency of the project):

  python3.11 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python benchmarks/torch_reference.py \
      --width_multiplier=0.5 --resolution=32 --batch_size=256 \
      --num_classes=10 --mode=train

The model is torchvision's MobileNetV2 when torchvision imports, otherwise the
replica of its module tree in tools/make_torch_fixtures.py (checked equal to
torchvision there). Train mode times one SGD step (momentum 0.9, weight decay
4e-5, cross-entropy, dropout 0.2), the counterpart of the Flax train step;
infer mode times `model(x)` under `torch.inference_mode()`. Prints one JSON
object: median step time over the timed steps, images/s, peak resident memory.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tools'))
from make_torch_fixtures import build  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width_multiplier', type=float, default=1.0)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--mode', choices=('train', 'infer'), default='train')
  parser.add_argument('--channels_last', action='store_true')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args()

  torch.manual_seed(0)
  model, is_torchvision = build(args.width_multiplier, args.num_classes)
  memory_format = (
    torch.channels_last if args.channels_last else torch.contiguous_format
  )
  model = model.to(memory_format=memory_format)
  x = (
    torch.rand(args.batch_size, 3, args.resolution, args.resolution).to(
      memory_format=memory_format
    )
    * 2
    - 1
  )
  y = torch.randint(0, args.num_classes, (args.batch_size,))
  if args.mode == 'train':
    model.train()
    optimizer = torch.optim.SGD(
      model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(x), y)
      loss.backward()
      optimizer.step()
      return loss
  else:
    model.eval()

    def step():
      with torch.inference_mode():
        return model(x)

  times = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    step()
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
  median = statistics.median(times)
  print(
    json.dumps(
      dict(
        framework='torch ' + torch.__version__,
        model='torchvision' if is_torchvision else 'torchvision replica',
        mode=args.mode,
        channels_last=args.channels_last,
        width_multiplier=args.width_multiplier,
        resolution=args.resolution,
        batch_size=args.batch_size,
        threads=torch.get_num_threads(),
        median_step_seconds=median,
        min_step_seconds=min(times),
        images_per_second=args.batch_size / median,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      )
    )
  )


if __name__ == '__main__':
  main()
