"""Flax vs PyTorch eager on this machine, side by side, in one run.

  .venv/bin/python benchmarks/compare.py \
      --torch_python=/tmp/torchvenv/bin/python

For every configuration it runs `python -m mnv2_flax.benchmark` and
`benchmarks/torch_reference.py` in fresh processes, alternating them
`--repeats` times (the machine is noisy), and prints the median of each side's
median step time and the ratio. The compile-time check runs the Flax train
step twice against a fresh persistent cache: cold, then cached.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The full-size model of the 224-pixel configurations and the compile check.
FULL_SIZE = dict(width_multiplier=1.0, resolution=224, num_classes=1000)
LAYOUTS = ('contiguous', 'channels_last')

# (name, common args, torch variants, target (kind, value)).
CONFIGS = (
  (
    'train w0.5 r32 b256 10 classes',
    dict(
      width_multiplier=0.5,
      resolution=32,
      batch_size=256,
      num_classes=10,
      mode='train',
    ),
    LAYOUTS,
    ('throughput ratio vs contiguous >=', 2.0),
  ),
  (
    'train w1.0 r224 b32',
    dict(FULL_SIZE, batch_size=32, mode='train', steps=5, warmup=1),
    LAYOUTS,
    ('throughput ratio vs channels_last >=', 1.0),
  ),
  (
    'infer w1.0 r224 b1',
    dict(FULL_SIZE, batch_size=1, mode='infer', steps=30, warmup=5),
    LAYOUTS,
    ('latency ratio vs best torch <=', 0.7),
  ),
)


def _flags(args):
  return [f'--{k}={v}' for k, v in args.items()]


def _run(command, env=None):
  out = subprocess.run(
    command, capture_output=True, text=True, cwd=ROOT, env=env, check=False
  )
  if out.returncode:
    sys.exit(f'failed: {" ".join(command)}\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def flax(args, cache_dir=''):
  return _run(
    [
      sys.executable,
      '-m',
      'mnv2_flax.benchmark',
      '--json',
      f'--compilation_cache_dir={cache_dir}',
    ]
    + _flags(args)
  )


def torch(torch_python, args, layout):
  flags = _flags(args) + (
    ['--channels_last'] if layout == 'channels_last' else []
  )
  return _run([torch_python, 'benchmarks/torch_reference.py'] + flags)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--torch_python', default='/tmp/torchvenv/bin/python')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--only', default='', help='substring of config names')
  args = parser.parse_args()

  print(
    f'machine: {os.cpu_count()} CPUs; {args.repeats} alternating runs '
    'per side; medians of per-run median step times'
  )
  for name, common, layouts, (target, value) in CONFIGS:
    if args.only not in name:
      continue
    runs = {'flax': []} | {layout: [] for layout in layouts}
    for _ in range(args.repeats):
      runs['flax'].append(flax(common)['median_step_seconds'])
      for layout in layouts:
        runs[layout].append(
          torch(args.torch_python, common, layout)['median_step_seconds']
        )
    med = {k: statistics.median(v) for k, v in runs.items()}
    batch = common['batch_size']
    print(f'\n{name}')
    for k, v in med.items():
      print(
        f'  {k:14s} {1e3 * v:9.1f} ms/step  {batch / v:9.1f} img/s  '
        f'(runs: {", ".join(f"{1e3 * t:.0f}" for t in runs[k])} ms)'
      )
    for layout in layouts:
      print(
        f'  flax / torch {layout}: {med[layout] / med["flax"]:.2f}x throughput'
      )
    print(f'  target: {target} {value}')

  if not args.only or 'compile' in args.only:
    common = dict(FULL_SIZE, batch_size=32, mode='train', steps=1, warmup=0)
    with tempfile.TemporaryDirectory() as cache:
      cold = flax(common, cache)['compile_seconds']
      warm = flax(common, cache)['compile_seconds']
    print(
      f'\ncompile, train w1.0 r224 b32: cold {cold:.1f} s (target <= 15),'
      f' with the persistent cache {warm:.1f} s (target <= 3)'
    )


if __name__ == '__main__':
  main()
