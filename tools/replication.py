"""Whether sweeps of one grid with other seeds reach the same verdicts.

  .venv/bin/python tools/replication.py sweeps/fashion_mnist \
      sweeps/seeds5-9 sweeps/seeds10-14 sweeps/serial

Reads each root's `points.csv` and `comparisons.csv` (what the sweep's
summary writes) and prints, as Markdown: per point, the top-1 mean ± 95%
half-width of every root; per paired comparison, each root's difference and
verdict, and whether all verdicts agree; per root, the pooled seed standard
deviation (root mean of the points' variances, in points) of test and
minival top-1. Exit status 1 if a comparison's verdicts differ.
"""

import csv
import math
import os
import sys


def _read(root: str, name: str) -> list[dict[str, str]]:
  with open(os.path.join(root, name), newline='') as f:
    return list(csv.DictReader(f))


def _interval(row: dict[str, str], prefix: str) -> str:
  mean, low = row[f'{prefix}_mean'], row[f'{prefix}_ci_low']
  if not mean:
    return ''
  if not low or low == 'nan':
    return f'{100 * float(mean):.2f}'
  half = float(mean) - float(low)
  return f'{100 * float(mean):+.2f} ± {100 * half:.2f}'.lstrip('+')


def _pooled_std(points: list[dict[str, str]], metric: str) -> float:
  variances = [
    float(p[f'{metric}_std']) ** 2 for p in points if p[f'{metric}_std']
  ]
  return (
    100 * math.sqrt(sum(variances) / len(variances)) if variances else math.nan
  )


def main(roots: list[str]) -> int:
  points = {r: _read(r, 'points.csv') for r in roots}
  comparisons = {r: _read(r, 'comparisons.csv') for r in roots}
  keys = [k for k in points[roots[0]][0] if k not in ('n', 'runs')]
  keys = keys[: keys.index('top1_mean')]
  names = [os.path.basename(os.path.normpath(r)) for r in roots]
  print('| point | ' + ' | '.join(names) + ' |')
  print('|---|' + '---|' * len(roots))
  for i, row in enumerate(points[roots[0]]):
    label = ', '.join(f'{k}={row[k]}' for k in keys)
    cells = [_interval(points[r][i], 'top1') for r in roots]
    print(f'| {label} | ' + ' | '.join(cells) + ' |')
  print()
  print('| comparison | ' + ' | '.join(names) + ' | same verdict |')
  print('|---|' + '---|' * (len(roots) + 1))
  agree = True
  for i, row in enumerate(comparisons[roots[0]]):
    label = f'{row["key"]} {row["base"]} → {row["other"]} at {row["at"]}'
    verdicts = [comparisons[r][i]['verdict'] for r in roots]
    same = len(set(verdicts)) == 1
    agree &= same
    cells = [
      _interval(comparisons[r][i], 'diff_top1') + ' ' + verdict
      for r, verdict in zip(roots, verdicts, strict=True)
    ]
    print(
      f'| {label} | ' + ' | '.join(cells) + f' | {"yes" if same else "NO"} |'
    )
  print()
  for name, root in zip(names, roots, strict=True):
    print(
      f'{name}: pooled seed std {_pooled_std(points[root], "top1"):.2f} '
      f'(test), {_pooled_std(points[root], "minival_top1"):.2f} (minival)'
    )
  print('verdicts replicate' if agree else 'verdicts DIFFER')
  return 0 if agree else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
