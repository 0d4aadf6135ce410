"""The statistics of a sweep's summary: seeds pooled per point, intervals,
and the paired comparisons (verdicts) that `summary` writes.

A point's seeds get n, mean, sample standard deviation and a Student-t 95%
confidence interval of each accuracy (`interval`). Points are compared in
pairs along each key that varies, with the other keys fixed (`compare`): the
per-seed differences (same seed: same initialisation where shapes agree,
same data order and augmentation) get their own mean and interval, and a
verdict: 'better' or 'worse' when the interval excludes 0, otherwise 'not
distinguishable'. A key's first value is its baseline: each value is
compared with the baseline and with the value before it.

Three more families of comparisons, each Bonferroni-adjusted so that its
verdicts hold together at 95% (`family_confidence`): tuned keys chosen on
minival (`choose`, `compare_choices`), points of equal cost
(`compare_equal_cost`) and test resolutions above the training one
(`compare_test_resolutions`). `front`: the accuracy-cost front.
"""

from collections.abc import Callable, Iterator
import dataclasses
import math
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

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


def _along_keys(items: list[Any], args_of: Callable) -> Iterator[tuple]:
  """(key, the other varying keys fixed, base item, other item): `items`
  paired along each key in which they vary, the other varying keys held
  fixed, each value against the first (the baseline) and the one before."""
  keys = (
    [k for k in args_of(items[0]) if len({args_of(i)[k] for i in items}) > 1]
    if items
    else []
  )
  for key in keys:
    values = list(dict.fromkeys(args_of(i)[key] for i in items))
    others = [k for k in keys if k != key]
    for context in dict.fromkeys(
      tuple(args_of(i)[k] for k in others) for i in items
    ):
      fixed = dict(zip(others, context, strict=True))
      at = {
        args_of(i)[key]: i
        for i in items
        if all(args_of(i)[k] == v for k, v in fixed.items())
      }
      for base, other in _pairs(values):
        if base in at and other in at:
          yield key, fixed, at[base], at[other]


def _by_seed(point: Point) -> dict[str, dict[str, Any]]:
  return {r.get('seed', ''): r for r in point.finished}


def _comparison(
  key, labels, fixed, base: Point, other: Point, confidence: float
) -> Comparison | None:
  """`other` minus `base` over the seeds both finished; None if none."""
  runs = [_by_seed(base), _by_seed(other)]
  seeds = tuple(s for s in runs[0] if s in runs[1])
  if not seeds:
    return None
  diffs = {m: _paired(runs[0], runs[1], seeds, m, confidence) for m in METRICS}
  return Comparison(key, *labels, fixed, seeds, diffs, confidence)


def compare(
  points: list[Point], confidence: float = CONFIDENCE
) -> list[Comparison]:
  """Paired comparisons along every varying key (see the module docstring),
  each interval at `confidence`."""
  found = (
    _comparison(key, (b.args[key], o.args[key]), fixed, b, o, confidence)
    for key, fixed, b, o in _along_keys(points, lambda p: p.args)
  )
  return [c for c in found if c]


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
  found = list(_along_keys(choices, lambda c: c.args))
  confidence = family_confidence(len(found))
  comparisons = (
    _comparison(
      key,
      (f'{b.args[key]} ({b.values})', f'{o.args[key]} ({o.values})'),
      fixed,
      b.chosen,
      o.chosen,
      confidence,
    )
    for key, fixed, b, o in found
  )
  return [c for c in comparisons if c]


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
  comparisons = (
    _comparison(
      '+'.join(apart),
      (_label(args, apart, note), _label(other_args, apart, other_note)),
      {k: v for k, v in args.items() if k not in apart},
      point,
      other,
      confidence,
    )
    for apart, args, point, note, other_args, other, other_note in found
  )
  return [c for c in comparisons if c]


# --------------------------------------------------------- test resolution

RESOLUTION_METRICS = ('top1', 'ema_top1', 'minival_top1')
# results.json's evaluations at other test sizes: BatchNorm statistics as
# trained, or re-estimated at the test size (`config.data.test_bn_examples`;
# the training size too).
AS_TRAINED, REESTIMATED = 'at_resolution', 'at_resolution_bn'
STATISTICS = {AS_TRAINED: 'as trained', REESTIMATED: 're-estimated'}


def at_size(
  run: dict[str, Any], size: str, key: str = AS_TRAINED
) -> dict[str, Any]:
  """A run's metrics evaluated at test size `size` (its own size, as
  trained: its plain metrics)."""
  if key == AS_TRAINED and size == str(run.get('res')):
    return run
  return (run.get(key) or {}).get(size, {})


def test_sizes(points: list[Point], key: str = AS_TRAINED) -> list[str]:
  """The test sizes the runs were also evaluated at, ascending."""
  sizes = {s for p in points for r in p.finished for s in r.get(key) or {}}
  return sorted(sizes, key=int)


def compare_test_resolutions(
  points: list[Point], key: str = AS_TRAINED
) -> list[Comparison]:
  """Per point with a training size (`res`), each larger test size against
  testing at the training size (statistics as trained), seed by seed:
  whether testing above the training resolution helps. With `key`
  REESTIMATED, the test sizes with statistics re-estimated there, the
  training size included (what re-estimation alone gives). One
  Bonferroni-adjusted family."""
  found = []
  for p in points:
    if 'res' not in p.args:
      continue
    for size in test_sizes([p], key):
      if int(size) > int(p.args['res']) or (
        key == REESTIMATED and size == p.args['res']
      ):
        found.append((p, size))
  confidence = family_confidence(len(found))
  kind = 'test res' + ('' if key == AS_TRAINED else ', BN re-estimated')
  comparisons = []
  for p, size in found:
    base = _by_seed(p)
    other = {s: at_size(r, size, key) for s, r in base.items()}
    seeds = tuple(s for s in base if other[s])
    if not seeds:
      continue
    comparisons.append(
      Comparison(
        kind,
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


def _label(args: dict[str, str], keys: list[str], note: str) -> str:
  return ','.join(f'{k}={args[k]}' for k in keys) + note


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
