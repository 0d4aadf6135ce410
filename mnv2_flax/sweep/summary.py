"""A sweep's summary: seeds pooled per point, points compared seed by seed.

Every (point, seed) is one run, one row. The summary groups a point's seeds
and gives n, mean, sample standard deviation and a Student-t 95% confidence
interval of each accuracy (top-1 and top-5, raw and EMA), beside the point's
cost (parameters, MACs, wall time, images/s). Points are then compared in
pairs along each key that varies, with the other keys fixed: the per-seed
differences (same seed: same initialisation where shapes agree, same data
order and augmentation) get their own mean and interval, and a verdict:
'better' or 'worse' when the interval excludes 0, otherwise 'not
distinguishable at 95%'. A key's first value is its baseline: each value is
compared with the baseline and with the value before it.

Where a recipe key (`TUNED_KEYS`: lr, wd, ls, ema) varies, each point of
the other keys is also reported at its values of the best minival mean
(`choose`), and those chosen points are compared with each other, one
Bonferroni-adjusted family (`compare_choices`). Points that differ in two
or more keys at about the same MACs (`MAC_RATIO`) are compared too
(`compare_equal_cost`: width against resolution at equal cost).

Files (in the sweep's root): `results.md` (the tables), `results.csv` (one
row per run), `points.csv`, `comparisons.csv`, `choices.csv` and
`chosen_comparisons.csv` (tuned keys), `equal_cost_comparisons.csv`, and
`accuracy_vs_macs.png` or, when all points share width and resolution,
`variants.png`.
"""

import contextlib
import csv
import dataclasses
import io
import math
import os
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from mnv2_flax.runtime import files as file_utils

# The eval split's (what results report: Fashion-MNIST's test, ImageNet's
# validation) and the minival split's (held out of train, for choices).
METRICS = (
  'top1',
  'top5',
  'ema_top1',
  'ema_top5',
  'minival_top1',
  'minival_ema_top1',
)
CONFIDENCE = 0.95
# Per-run columns after the point's keys.
COLUMNS = (
  'params',
  'macs',
  *METRICS,
  'wall_seconds',
  'train_seconds',
  'eval_seconds',
  'fixed_seconds',
  'images_per_second',
  'steps',
  'status',
  'error',
  'held_by',  # the process training it, where another one is
)
NAMES = dict(
  top1='top-1 %',
  top5='top-5 %',
  ema_top1='EMA top-1 %',
  ema_top5='EMA top-5 %',
  minival_top1='minival top-1 %',
  minival_ema_top1='minival EMA top-1 %',
  wall_seconds='wall',
  train_seconds='train',
  eval_seconds='eval',
  fixed_seconds='fixed',
  images_per_second='img/s',
)


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean, sample std and the Student-t interval of `n` values."""

  n: int
  mean: float
  std: float  # nan for n = 1
  low: float  # nan for n = 1
  high: float

  @property
  def half(self) -> float:
    return (self.high - self.low) / 2


def interval(values, confidence: float = CONFIDENCE) -> Interval | None:
  """The `confidence` interval of the mean of `values` (Student t, n-1 dof)."""
  values = np.asarray([v for v in values if v is not None], dtype=np.float64)
  n = len(values)
  if n == 0:
    return None
  mean = float(values.mean())
  if n == 1:
    return Interval(1, mean, math.nan, math.nan, math.nan)
  std = float(values.std(ddof=1))
  half = scipy_stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
  return Interval(n, mean, std, mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class Point:
  """The runs of one point (all its seeds) and their statistics."""

  args: dict[str, str]  # the point's keys, seed excluded
  runs: tuple[dict[str, Any], ...]

  @property
  def finished(self) -> list[dict[str, Any]]:
    return [r for r in self.runs if r['status'] == 'finished']

  def stat(self, metric: str) -> Interval | None:
    return interval(r.get(metric) for r in self.finished)

  def cost(self, column: str) -> float | None:
    values = [r[column] for r in self.finished if r[column] is not None]
    return float(np.mean(values)) if values else None

  def status(self) -> str:
    counts = {}
    for run in self.runs:
      counts[run['status']] = counts.get(run['status'], 0) + 1
    return ', '.join(f'{n} {s}' for s, n in counts.items())


def group(rows: list[dict], keys: list[str]) -> list[Point]:
  """Runs grouped by their keys other than `seed`, in order of appearance."""
  point_keys = [k for k in keys if k != 'seed']
  points = {}
  for row in rows:
    args = {k: row[k] for k in point_keys}
    points.setdefault(tuple(args.values()), (args, []))[1].append(row)
  return [Point(args, tuple(runs)) for args, runs in points.values()]


def varying(points: list[Point]) -> list[str]:
  """The keys whose value differs between points."""
  keys = points[0].args if points else {}
  return [k for k in keys if len({p.args[k] for p in points}) > 1]


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Point `other` minus point `base` along `key`, seed by seed."""

  key: str
  base: str
  other: str
  context: dict[str, str]  # the other varying keys, fixed
  seeds: tuple[str, ...]
  diffs: dict[str, Interval]  # metric: interval of the differences
  confidence: float = CONFIDENCE  # of the intervals

  def verdict(self, metric: str = 'top1') -> str:
    d = self.diffs[metric]
    if d is None:
      return 'no values'
    if d.n < 2:
      return 'one seed: no interval'
    if d.low > 0:
      return 'better'
    if d.high < 0:
      return 'worse'
    if d.std == 0:  # identical runs
      return 'identical'
    return f'not distinguishable at {self.confidence:.1%}'.replace('.0%', '%')


def _pairs(values: list[str]) -> list[tuple[str, str]]:
  """Each value against the first (the baseline) and the one before it."""
  pairs = [(values[0], v) for v in values[1:]]
  return pairs + [(values[i - 1], values[i]) for i in range(2, len(values))]


def _paired(
  base, other, seeds, metric, confidence: float = CONFIDENCE
) -> Interval | None:
  """The interval of other - base over the seeds where both have `metric`
  (runs from before the minival split have none)."""
  return interval(
    (
      other[s][metric] - base[s][metric]
      for s in seeds
      if other[s].get(metric) is not None and base[s].get(metric) is not None
    ),
    confidence,
  )


def compare(points: list[Point]) -> list[Comparison]:
  """Paired comparisons along every varying key (see the module docstring)."""
  keys = varying(points)
  comparisons = []
  for key in keys:
    values = list(dict.fromkeys(p.args[key] for p in points))
    others = [k for k in keys if k != key]
    contexts = list(
      dict.fromkeys(tuple(p.args[k] for k in others) for p in points)
    )
    for context in contexts:
      fixed = dict(zip(others, context, strict=True))
      at = {
        p.args[key]: {r.get('seed', ''): r for r in p.finished}
        for p in points
        if all(p.args[k] == v for k, v in fixed.items())
      }
      for base, other in _pairs(values):
        if base not in at or other not in at:
          continue
        seeds = tuple(s for s in at[base] if s in at[other])
        if not seeds:
          continue
        diffs = {m: _paired(at[base], at[other], seeds, m) for m in METRICS}
        comparisons.append(Comparison(key, base, other, fixed, seeds, diffs))
  return comparisons


# ------------------------------------------------------- tuned keys, chosen


def family_confidence(comparisons: int) -> float:
  """Each interval's confidence for `comparisons` verdicts to hold together
  at `CONFIDENCE` (Bonferroni: 1 - 5% / m)."""
  return 1 - (1 - CONFIDENCE) / max(1, comparisons)


# The recipe's keys a sweep may tune (configs/ablation.py's; a pack's member
# fields besides the seed). Where one varies, each point of the other keys
# takes the tried values with the best minival mean over its seeds, and is
# reported, and compared, on the eval split there: choices are never made
# on the numbers that are reported.
TUNED_KEYS = ('lr', 'wd', 'ls', 'ema')
CHOOSE_ON = 'minival_top1'


@dataclasses.dataclass(frozen=True)
class Choice:
  """The tuned values chosen for one point of the other keys."""

  args: dict[str, str]  # the other keys
  chosen: Point  # the runs at the chosen values
  tuned: tuple[str, ...]  # the tuned keys
  tried: int  # the tuned values' combinations with a minival mean
  edges: tuple[str, ...]  # tuned keys chosen at their lowest or highest

  @property
  def values(self) -> str:
    """'lr=0.1,wd=4e-05'."""
    return ','.join(f'{k}={self.chosen.args[k]}' for k in self.tuned)


def _number(text: str) -> float | str:
  try:
    return float(text)
  except ValueError:
    return text


def choose(points: list[Point]) -> list[Choice]:
  """Per point of the untuned keys, its tuned values of the best `CHOOSE_ON`
  mean (the first tried on a tie); none where no tuned key varies. A point
  none of whose values has a minival mean gets no choice."""
  tuned = [k for k in varying(points) if k in TUNED_KEYS]
  if not tuned:
    return []
  others = [k for k in points[0].args if k not in tuned]
  groups = {}
  for p in points:
    groups.setdefault(tuple(p.args[k] for k in others), []).append(p)
  choices = []
  for context, group in groups.items():
    scored = [(p, p.stat(CHOOSE_ON)) for p in group]
    scored = [(p, stat.mean) for p, stat in scored if stat is not None]
    if not scored:
      continue
    best = max(scored, key=lambda item: item[1])[0]  # max: the first of ties
    edges = []
    for key in tuned:
      tried = sorted({_number(p.args[key]) for p in group}, key=str)
      numbers = sorted(v for v in tried if isinstance(v, float))
      if len(numbers) > 1 and _number(best.args[key]) in (
        numbers[0],
        numbers[-1],
      ):
        edges.append(key)
    choices.append(
      Choice(
        dict(zip(others, context, strict=True)),
        best,
        tuple(tuned),
        len(scored),
        tuple(edges),
      )
    )
  return choices


def compare_choices(choices: list[Choice]) -> list[Comparison]:
  """Paired comparisons of the chosen points along each untuned key that
  varies (as `compare`), each at its own chosen values. One family: its
  intervals are Bonferroni-adjusted, at 1 - 5% / (number of comparisons),
  so that all of its verdicts hold together at 95%."""
  if not choices:
    return []
  keys = [k for k in choices[0].args if len({c.args[k] for c in choices}) > 1]
  found = []
  for key in keys:
    values = list(dict.fromkeys(c.args[key] for c in choices))
    others = [k for k in keys if k != key]
    for context in dict.fromkeys(
      tuple(c.args[k] for k in others) for c in choices
    ):
      fixed = dict(zip(others, context, strict=True))
      at = {
        c.args[key]: c
        for c in choices
        if all(c.args[k] == v for k, v in fixed.items())
      }
      for base, other in _pairs(values):
        if base in at and other in at:
          found.append((key, fixed, at[base], at[other]))
  confidence = family_confidence(len(found))
  comparisons = []
  for key, fixed, base, other in found:
    runs = [
      {r.get('seed', ''): r for r in c.chosen.finished} for c in (base, other)
    ]
    seeds = tuple(s for s in runs[0] if s in runs[1])
    if not seeds:
      continue
    diffs = {
      m: _paired(runs[0], runs[1], seeds, m, confidence) for m in METRICS
    }
    comparisons.append(
      Comparison(
        key,
        f'{base.args[key]} ({base.values})',
        f'{other.args[key]} ({other.values})',
        fixed,
        seeds,
        diffs,
        confidence,
      )
    )
  return comparisons


# ------------------------------------------------------------ equal cost

# Points within this ratio of each other's multiply-adds cost the same, for
# `compare_equal_cost` (the TF-slim table's ~100M-MAC points span 1.05x).
MAC_RATIO = 1.15


def compare_equal_cost(
  points: list[Point], ratio: float = MAC_RATIO
) -> list[Comparison]:
  """Every two points that differ in two or more keys (width against
  resolution, say; one key apart they are `compare`'s) and whose MACs are
  within `ratio` of each other: the costlier minus the cheaper, seed by
  seed. Where tuned keys vary, the points at their chosen values
  (`choose`). One Bonferroni-adjusted family, as `compare_choices`."""
  choices = choose(points)
  if choices:
    labelled = [(c.args, c.chosen, f' ({c.values})') for c in choices]
  else:
    labelled = [(p.args, p, '') for p in points]
  labelled = [x for x in labelled if x[1].cost('macs')]
  labelled.sort(key=lambda x: x[1].cost('macs'))
  found = []
  for i, (args, point, note) in enumerate(labelled):
    for other_args, other, other_note in labelled[i + 1 :]:
      apart = [k for k in args if args[k] != other_args[k]]
      if len(apart) < 2:
        continue
      if other.cost('macs') > ratio * point.cost('macs'):
        continue
      found.append((apart, args, point, note, other_args, other, other_note))
  confidence = family_confidence(len(found))
  comparisons = []
  for apart, args, point, note, other_args, other, other_note in found:
    runs = [{r.get('seed', ''): r for r in p.finished} for p in (point, other)]
    seeds = tuple(s for s in runs[0] if s in runs[1])
    if not seeds:
      continue
    shared = {k: v for k, v in args.items() if k not in apart}
    comparisons.append(
      Comparison(
        '+'.join(apart),
        _label(args, apart, note),
        _label(other_args, apart, other_note),
        shared,
        seeds,
        {m: _paired(runs[0], runs[1], seeds, m, confidence) for m in METRICS},
        confidence,
      )
    )
  return comparisons


# --------------------------------------------------------- test resolution

RESOLUTION_METRICS = ('top1', 'ema_top1', 'minival_top1')


def _at_size(run: dict[str, Any], size: str) -> dict[str, Any]:
  """A run's metrics evaluated at test size `size` (its own size: its
  plain metrics)."""
  if size == str(run.get('res')):
    return run
  return (run.get('at_resolution') or {}).get(size, {})


def test_sizes(points: list[Point]) -> list[str]:
  """The test sizes the runs were also evaluated at, ascending."""
  sizes = {
    s for p in points for r in p.finished for s in r.get('at_resolution') or {}
  }
  return sorted(sizes, key=int)


def compare_test_resolutions(points: list[Point]) -> list[Comparison]:
  """Per point with a training size (`res`), each larger test size against
  testing at the training size, seed by seed: whether testing above the
  training resolution helps. One Bonferroni-adjusted family."""
  found = []
  for p in points:
    if 'res' not in p.args:
      continue
    for size in test_sizes([p]):
      if int(size) > int(p.args['res']):
        found.append((p, size))
  confidence = family_confidence(len(found))
  comparisons = []
  for p, size in found:
    base = {r.get('seed', ''): r for r in p.finished}
    other = {s: _at_size(r, size) for s, r in base.items()}
    seeds = tuple(s for s in base if other[s])
    if not seeds:
      continue
    comparisons.append(
      Comparison(
        'test res',
        p.args['res'],
        size,
        dict(p.args),
        seeds,
        {
          m: _paired(base, other, seeds, m, confidence)
          for m in RESOLUTION_METRICS
        },
        confidence,
      )
    )
  return comparisons


def _resolution_parts(points: list[Point]) -> list[str]:
  sizes = test_sizes(points)
  if not sizes:
    return []
  keys = list(points[0].args)
  sizes = sorted(
    set(sizes) | {p.args['res'] for p in points if 'res' in p.args}, key=int
  )
  rows = []
  for p in points:
    cells = []
    for size in sizes:
      cells.append(
        format_interval(
          interval(_at_size(r, size).get('top1') for r in p.finished)
        )
      )
    rows.append([p.args[k] for k in keys] + cells)
  parts = [
    '## Train x test resolution',
    '',
    'Top-1 % on the eval split of each point (trained at its `res`) '
    'evaluated at each test size: centre crop resized to it, BatchNorm '
    'statistics as trained.',
    '',
    '\n'.join(_table(keys + [f'test {s} px' for s in sizes], rows)),
    '',
  ]
  comparisons = compare_test_resolutions(points)
  if comparisons:
    parts += [
      'Testing above the training size minus testing at it, seed by seed '
      f'(one family of {len(comparisons)}, intervals at '
      f'{comparisons[0].confidence:.2%}, Bonferroni):',
      '',
      comparisons_table(comparisons),
      '',
    ]
  return parts


def _label(args: dict[str, str], keys: list[str], note: str) -> str:
  return ','.join(f'{k}={args[k]}' for k in keys) + note


# ------------------------------------------------------------------ writing


def _pct(value: float) -> str:
  return f'{100 * value:.2f}'


def _cell(key: str, value: Any) -> str:
  """One per-run table cell."""
  if value is None or value == '':
    return ''
  if key in METRICS:
    return _pct(value)
  if key == 'macs':
    return f'{value / 1e6:.2f}M'
  if key == 'params':
    return f'{value:,.0f}'
  if key in ('wall_seconds', 'train_seconds', 'eval_seconds'):
    return format_duration(value)
  if key == 'fixed_seconds':
    return f'{value:.1f} s'
  if key == 'images_per_second':
    return f'{value:,.0f}'
  if key in ('error', 'held_by'):
    return str(value).replace('|', '/').replace('\n', ' ')[:80]
  return str(value)


def format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'


def format_interval(stat: Interval | None, sign: bool = False) -> str:
  """'81.99 ± 1.20 (0.48)': mean ± half-width (std), in points."""
  if stat is None:
    return ''
  mean = f'{100 * stat.mean:+.2f}' if sign else _pct(stat.mean)
  if stat.n == 1:
    return mean
  return f'{mean} ± {100 * stat.half:.2f} ({100 * stat.std:.2f})'


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def runs_table(rows: list[dict], keys: list[str]) -> str:
  """The per-run Markdown table."""
  header = keys + list(COLUMNS)
  return '\n'.join(
    _table(
      [NAMES.get(h, h) for h in header],
      [[_cell(h, row.get(h)) for h in header] for row in rows],
    )
  )


def points_table(points: list[Point]) -> str:
  keys = list(points[0].args) if points else []
  header = keys + ['n'] + [NAMES[m] for m in METRICS]
  header += ['params', 'MACs', 'wall', 'img/s', 'runs']
  rows = []
  for p in points:
    rows.append(
      [p.args[k] for k in keys]
      + [str(len(p.finished))]
      + [format_interval(p.stat(m)) for m in METRICS]
      + [
        _cell('params', p.cost('params')),
        _cell('macs', p.cost('macs')),
        _cell('wall_seconds', p.cost('wall_seconds')),
        _cell('images_per_second', p.cost('images_per_second')),
        p.status(),
      ]
    )
  return '\n'.join(_table(header, rows))


def _at(comparison: Comparison) -> str:
  return ', '.join(f'{k}={v}' for k, v in comparison.context.items()) or 'all'


def comparisons_table(comparisons: list[Comparison]) -> str:
  header = [
    'key',
    'base → other',
    'at',
    'seeds',
    'Δ top-1 (points)',
    'Δ EMA top-1',
    'Δ minival top-1',
    'verdict (top-1)',
  ]
  rows = [
    [
      c.key,
      f'{c.base} → {c.other}',
      _at(c),
      str(len(c.seeds)),
      format_interval(c.diffs['top1'], sign=True),
      format_interval(c.diffs['ema_top1'], sign=True),
      format_interval(c.diffs['minival_top1'], sign=True),
      c.verdict(),
    ]
    for c in comparisons
  ]
  return '\n'.join(_table(header, rows))


def _edge_note(choice: Choice) -> str:
  if not choice.edges:
    return ''
  return 'at the edge of the tried range: ' + ', '.join(choice.edges)


def choices_table(choices: list[Choice]) -> str:
  keys = list(choices[0].args)
  header = keys + ['chosen', 'tried', 'n']
  header += [NAMES[m] for m in (CHOOSE_ON, 'top1', 'ema_top1')] + ['note']
  rows = [
    [c.args[k] for k in keys]
    + [c.values, str(c.tried), str(len(c.chosen.finished))]
    + [
      format_interval(c.chosen.stat(m)) for m in (CHOOSE_ON, 'top1', 'ema_top1')
    ]
    + [_edge_note(c)]
    for c in choices
  ]
  return '\n'.join(_table(header, rows))


def _tuned_parts(points: list[Point]) -> list[str]:
  """The markdown of the tuned keys' choices and their comparisons."""
  choices = choose(points)
  if not choices:
    return []
  parts = [
    '## Tuned keys: chosen on minival',
    '',
    f'Per point of the other keys, the values of {", ".join(choices[0].tuned)} '
    'with the best minival top-1 mean over the seeds (every point tried '
    'the same values: the same budget); the eval split is reported there, '
    'never used to choose. A choice at the lowest or highest value tried '
    'may lie outside the range: try further values before reading it.',
    '',
    choices_table(choices),
    '',
  ]
  comparisons = compare_choices(choices)
  if comparisons:
    parts += [
      '## Paired comparisons at the chosen values',
      '',
      'Other point minus base point, each at its own chosen values, seed by '
      f'seed, in accuracy points. The {len(comparisons)} comparisons are one '
      'family: intervals at '
      f'{comparisons[0].confidence:.2%} (Bonferroni, 95% / '
      f'{len(comparisons)}), so that all of their verdicts hold together at '
      '95%.',
      '',
      comparisons_table(comparisons),
      '',
    ]
  return parts


def markdown(rows: list[dict], keys: list[str], title: str) -> str:
  points = group(rows, keys)
  comparisons = compare(points)
  done = sum(r['status'] == 'finished' for r in rows)
  parts = [
    f'# {title}: {done} of {len(rows)} runs finished',
    '',
    '## Points',
    '',
    'Mean ± half-width of the 95% confidence interval (Student t over the '
    'seeds), sample std in brackets; accuracies in %. top-1/top-5: the eval '
    'split (`config.data.eval_split`), the numbers to report; minival: '
    'training examples held out (`config.data.minival_split`), the numbers '
    'to choose on.',
    '',
    points_table(points),
    '',
  ]
  if comparisons:
    parts += [
      '## Paired comparisons',
      '',
      'Other point minus base point, seed by seed, in accuracy points: '
      'mean ± 95% half-width (std).',
      '',
      comparisons_table(comparisons),
      '',
    ]
  parts += _tuned_parts(points)
  equal_cost = compare_equal_cost(points)
  if equal_cost:
    parts += [
      '## Equal-cost comparisons',
      '',
      'Points that differ in two or more keys with MACs within '
      f'{MAC_RATIO:g}x of each other (at their chosen values where keys are '
      'tuned): the costlier minus the cheaper, seed by seed, in accuracy '
      f'points; one family of {len(equal_cost)}, intervals at '
      f'{equal_cost[0].confidence:.2%} (Bonferroni).',
      '',
      comparisons_table(equal_cost),
      '',
    ]
  parts += _resolution_parts(points)
  parts += ['## Runs', '', runs_table(rows, keys), '']
  return '\n'.join(parts)


def _csv(header: list[str], rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(
    out, header, lineterminator='\n', extrasaction='ignore'
  )
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def _interval_columns(prefix: str, stat: Interval | None) -> dict[str, Any]:
  fields = ('mean', 'std', 'ci_low', 'ci_high')
  values = (stat.mean, stat.std, stat.low, stat.high) if stat else (None,) * 4
  return {f'{prefix}_{f}': v for f, v in zip(fields, values, strict=True)}


def csv_files(rows: list[dict], keys: list[str]) -> dict[str, str]:
  """results.csv (runs), points.csv and comparisons.csv, as text."""
  points = group(rows, keys)
  point_rows = []
  for p in points:
    row = dict(p.args, n=len(p.finished), runs=p.status())
    for m in METRICS:
      row.update(_interval_columns(m, p.stat(m)))
    for c in ('params', 'macs', 'wall_seconds', 'images_per_second'):
      row[c] = p.cost(c)
    point_rows.append(row)
  files = {
    'results.csv': _csv(keys + list(COLUMNS), rows),
    'points.csv': _csv(list(point_rows[0]) if point_rows else [], point_rows),
    'comparisons.csv': _comparisons_csv(compare(points)),
  }
  equal_cost = compare_equal_cost(points)
  if equal_cost:
    files['equal_cost_comparisons.csv'] = _comparisons_csv(equal_cost)
  resolutions = compare_test_resolutions(points)
  if resolutions:
    files['test_resolution_comparisons.csv'] = _comparisons_csv(resolutions)
  choices = choose(points)
  if choices:
    choice_rows = []
    for c in choices:
      row = dict(
        c.args, chosen=c.values, tried=c.tried, n=len(c.chosen.finished)
      )
      for m in METRICS:
        row.update(_interval_columns(m, c.chosen.stat(m)))
      row['edges'] = ' '.join(c.edges)
      choice_rows.append(row)
    files['choices.csv'] = _csv(list(choice_rows[0]), choice_rows)
    files['chosen_comparisons.csv'] = _comparisons_csv(compare_choices(choices))
  return files


def _comparisons_csv(comparisons: list[Comparison]) -> str:
  comparison_rows = []
  for c in comparisons:
    row = dict(
      key=c.key,
      base=c.base,
      other=c.other,
      at=_at(c),
      n=len(c.seeds),
      confidence=c.confidence,
      verdict=c.verdict(),
    )
    for m in METRICS:
      row.update(_interval_columns(f'diff_{m}', c.diffs.get(m)))
    comparison_rows.append(row)
  return _csv(
    list(comparison_rows[0]) if comparison_rows else ['key'],
    comparison_rows,
  )


def plot(
  rows: list[dict], keys: list[str], title: str, published=None
) -> tuple[str, bytes]:
  """Means with 95% interval bars, each seed a faint dot. Returns the file
  name ('accuracy_vs_macs.png' or, for variants of one size,
  'variants.png') and the PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  planned = group(rows, keys)
  points = [p for p in planned if p.finished]
  keys_varying = varying(points)
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  # The kind of figure follows the planned points, not the finished ones.
  sizes = {(p.args.get('width'), p.args.get('res')) for p in planned}

  if len(sizes) <= 1:  # Fig. 6: variants of one size
    labels = [
      ','.join(f'{k}={p.args[k]}' for k in keys_varying) or 'default'
      for p in points
    ]
    stats = [p.stat('top1') for p in points]
    ax.bar(
      range(len(points)),
      [100 * s.mean for s in stats],
      yerr=error_bars(stats),
      capsize=4,
      alpha=0.7,
    )
    for i, p in enumerate(points):
      seeds = [100 * r['top1'] for r in p.finished]
      ax.plot([i] * len(seeds), seeds, 'k.', alpha=0.5)
      ax.annotate(
        f'{100 * stats[i].mean:.2f}',
        (i, 100 * stats[i].mean),
        xytext=(8, 0),
        textcoords='offset points',
        fontsize=8,
      )
    ax.set_xticks(range(len(points)), labels, rotation=15)
    if points:
      low = min(100 * r['top1'] for p in points for r in p.finished)
      ax.set_ylim(
        max(0, low - 5),
        min(
          100, 100 * max(s.mean + (s.half if s.n > 1 else 0) for s in stats) + 2
        ),
      )
    name = 'variants.png'
  else:
    line_keys = [k for k in keys_varying if k != 'res']
    lines = {}
    for p in points:
      lines.setdefault(tuple(p.args[k] for k in line_keys), []).append(p)
    for values, line in lines.items():
      line.sort(key=lambda p: p.cost('macs'))
      stats = [p.stat('top1') for p in line]
      macs = [p.cost('macs') / 1e6 for p in line]
      label = ', '.join(
        f'{"width " if k == "width" else k + "="}{v}'
        for k, v in zip(line_keys, values, strict=True)
      )
      ax.errorbar(
        macs,
        [100 * s.mean for s in stats],
        yerr=error_bars(stats),
        fmt='o-',
        capsize=3,
        label=label or None,
      )
      for x, p in zip(macs, line, strict=True):
        seeds = [100 * r['top1'] for r in p.finished]
        ax.plot([x] * len(seeds), seeds, 'k.', alpha=0.3, markersize=3)
        ax.annotate(
          p.args.get('res', ''),
          (x, 100 * p.stat('top1').mean),
          textcoords='offset points',
          xytext=(4, -10),
          fontsize=8,
        )
    best = front(points)
    if len(best) > 1:
      ax.step(
        [p.cost('macs') / 1e6 for p in best],
        [100 * p.stat('top1').mean for p in best],
        where='post',
        color='0.4',
        linewidth=4,
        alpha=0.25,
        label='front (best mean top-1 at its cost or less)',
      )
    for width in sorted({w for w, _ in published or {}}):
      line = sorted(v for (w, _), v in published.items() if w == width)
      ax.plot(
        *zip(*line, strict=True),
        'x--',
        alpha=0.6,
        label=f'width {width}, TF-slim published (ImageNet, its recipe)',
      )
    ax.set_xscale('log')
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}')
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel('MACs (millions, log scale)')
    if ax.get_legend_handles_labels()[1]:
      ax.legend(fontsize=8)
    name = 'accuracy_vs_macs.png'
  ax.set_ylabel('top-1 accuracy (%): mean, 95% CI, seeds')
  runs = sum(len(p.finished) for p in points)
  ax.set_title(f'{title}: {runs} of {len(rows)} runs', fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out = io.BytesIO()
  fig.savefig(out, format='png')
  plt.close(fig)
  return name, out.getvalue()


def front(points: list[Point]) -> list[Point]:
  """The points no cheaper point beats: each has a higher mean top-1 than
  every point of fewer MACs (the accuracy-cost front), by MACs."""
  ranked = sorted(
    (p for p in points if p.cost('macs') and p.stat('top1')),
    key=lambda p: (p.cost('macs'), -p.stat('top1').mean),
  )
  best, found = -math.inf, []
  for p in ranked:
    if p.stat('top1').mean > best:
      best = p.stat('top1').mean
      found.append(p)
  return found


def error_bars(stats) -> list[list[float]]:
  """Matplotlib's (below, above) of each accuracy's 95% interval, in points,
  clipped to what accuracy can be: [0, 100] (two seeds' intervals are
  wide). 0 for one seed."""
  half = [0 if s.n < 2 else 100 * s.half for s in stats]
  means = [100 * s.mean for s in stats]
  return [
    [min(h, m) for h, m in zip(half, means, strict=True)],
    [min(h, 100 - m) for h, m in zip(half, means, strict=True)],
  ]


def write(
  rows: list[dict], keys: list[str], root: str, published=None
) -> dict[str, str | bytes]:
  """All summary files of `rows`, written atomically into `root`."""
  title = os.path.basename(os.path.abspath(root))
  files = csv_files(rows, keys)
  files['results.md'] = markdown(rows, keys, title)
  name, png = plot(rows, keys, title, published)
  files[name] = png
  every = {'accuracy_vs_macs.png', 'variants.png', 'choices.csv'}
  every |= {'chosen_comparisons.csv', 'equal_cost_comparisons.csv'}
  every |= {'test_resolution_comparisons.csv'}
  for stale in every - set(files):
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(root, stale))
  for name, content in files.items():
    file_utils.write_atomically(os.path.join(root, name), content)
  return files
