"""Eval top-1 against steps for fine-tuning runs: a table and a figure.

  python tools/finetune_curves.py --threshold=0.95 \
      --out=docs/finetune_digits.png workdirs/digits_*_s*

Each workdir is `<name>_s<seed>`; runs of one name are averaged. Prints, per
name, the mean eval top-1 at every eval step, the first step at which each
seed reached `--threshold`, and the final top-1 (raw and EMA), mean and
range over seeds. Reads the TensorBoard events the runs wrote.
"""

import argparse
import collections
import glob
import os
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402


def read_curve(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of scalar `tag` in the workdir's events."""
  curve = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    acc = event_accumulator.EventAccumulator(
      path, size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    if tag in acc.Tags()['tensors']:
      for event in acc.Tensors(tag):
        curve[event.step] = float(
          np.asarray(tensor_util.make_ndarray(event.tensor_proto))
        )
  return curve


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--threshold', type=float, default=0.95)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  runs = collections.defaultdict(dict)
  for workdir in args.workdirs:
    name, seed = re.fullmatch(
      r'(.*)_s(\d+)', os.path.basename(workdir)
    ).groups()
    runs[name][int(seed)] = (
      read_curve(workdir, 'eval/top1'),
      read_curve(workdir, 'eval/ema_top1'),
    )
  fig, ax = plt.subplots(figsize=(6, 4))
  print(
    f'| run | seeds | first step >= {args.threshold:.0%} (each seed) '
    '| final top-1 | final EMA top-1 |'
  )
  print('|---|---|---|---|---|')
  for name, seeds in runs.items():
    steps = sorted(next(iter(seeds.values()))[0])
    top1 = np.array([[c[s] for s in steps] for c, _ in seeds.values()])
    ema = np.array([[e[s] for s in steps] for _, e in seeds.values()])
    first = [
      next(
        (s for s, v in zip(steps, row, strict=True) if v >= args.threshold),
        None,
      )
      for row in top1
    ]
    print(
      f'| {name} | {len(seeds)} | '
      + ' / '.join(str(f) if f is not None else 'never' for f in first)
      + f' | {100 * top1[:, -1].mean():.2f}% '
      f'({100 * top1[:, -1].min():.1f}-{100 * top1[:, -1].max():.1f}) '
      f'| {100 * ema[:, -1].mean():.2f}% |'
    )
    print(
      '    mean top-1 per eval step: '
      + ', '.join(
        f'{s}: {100 * v:.1f}' for s, v in zip(steps, top1.mean(0), strict=True)
      )
    )
    (line,) = ax.plot(steps, 100 * top1.mean(0), label=name, marker='.')
    for row in top1:
      ax.plot(steps, 100 * row, color=line.get_color(), alpha=0.25, lw=0.8)
  ax.axhline(100 * args.threshold, color='grey', ls=':', lw=0.8)
  ax.set_xlabel('training step (64 images)')
  ax.set_ylabel('test top-1 (%)')
  ax.set_ylim(0, 100)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  if args.out:
    fig.savefig(args.out, dpi=120)
    print('wrote', args.out)


if __name__ == '__main__':
  main()
