"""Whether tuning changes a sweep's verdicts, side by side.

  python tools/tuned_vs_untuned.py --root=sweeps/fashion_mnist_lr \
      --untuned=lr=0.05

From a summarised sweep (`<root>/results.csv`) whose tuned keys (lr, wd, ls,
ema) vary: each comparison of the untuned sweep (the points at the
`--untuned` values, as a sweep without the tuned axes would have run them)
beside the same comparison between the points at their values chosen on
minival (`verdicts.compare_choices`). The untuned verdicts are given at 95%
each, as that sweep's summary gives them, and at the tuned family's
Bonferroni level, so that a changed verdict is not the stricter level's.
"""

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mnv2_flax.sweep import summary  # noqa: E402
from mnv2_flax.sweep import verdicts  # noqa: E402


def _rows(root: str) -> tuple[list[dict], list[str]]:
  with open(os.path.join(root, 'results.csv')) as f:
    reader = csv.DictReader(f)
    keys = [c for c in reader.fieldnames if c not in summary.COLUMNS]
    rows = []
    for row in reader:
      for column in summary.COLUMNS:
        text = row.get(column)
        row[column] = verdicts._number(text) if text else None  # noqa: SLF001
      rows.append(row)
  return rows, keys


def _cell(c: verdicts.Comparison | None) -> list[str]:
  if c is None:
    return ['', '']
  d = c.diffs['top1']
  return [f'{100 * d.mean:+.2f} ± {100 * d.half:.2f}', c.verdict()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True)
  parser.add_argument('--untuned', required=True, help='e.g. lr=0.05')
  args = parser.parse_args()
  untuned = dict(item.split('=', 1) for item in args.untuned.split(','))
  rows, keys = _rows(args.root)
  points = verdicts.group(rows, keys)
  plain = [
    verdicts.Point(
      {k: v for k, v in p.args.items() if k not in untuned}, p.runs
    )
    for p in points
    if all(p.args.get(k) == v for k, v in untuned.items())
  ]
  tuned = verdicts.compare_choices(verdicts.choose(points))
  family = tuned[0].confidence if tuned else verdicts.CONFIDENCE
  at_95 = verdicts.compare(plain)
  at_family = verdicts.compare(plain, family)
  chosen = {
    (c.key, c.base.split(' ')[0], c.other.split(' ')[0], str(c.context)): c
    for c in tuned
  }
  print(
    f'| key | base → other | at | untuned Δ top-1 (95%) | verdict | '
    f'untuned ({family:.2%}) | tuned Δ top-1 ({family:.2%}) | verdict | '
    'chosen |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for plain_c, strict_c in zip(at_95, at_family, strict=True):
    t = chosen.get(
      (plain_c.key, plain_c.base, plain_c.other, str(plain_c.context))
    )
    at = ', '.join(f'{k}={v}' for k, v in plain_c.context.items())
    values = (
      f'{t.base.split(" ", 1)[1]} → {t.other.split(" ", 1)[1]}' if t else ''
    )
    print(
      f'| {plain_c.key} | {plain_c.base} → {plain_c.other} | {at} | '
      + ' | '.join(_cell(plain_c))
      + f' | {strict_c.verdict()} | '
      + ' | '.join(_cell(t))
      + f' | {values} |'
    )


if __name__ == '__main__':
  main()
