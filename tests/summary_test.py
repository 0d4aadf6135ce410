"""Tests of the sweep summary's statistics, on rows made here."""

import csv
import io
import math

import pytest

from mnv2_flax.sweep import summary
from mnv2_flax.sweep import verdicts

# Student t quantiles t(0.975, dof), from printed tables.
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}


def test_interval_is_the_student_t_interval():
  stat = verdicts.interval([0.80, 0.82, 0.84])
  assert stat.n == 3 and (stat.mean, stat.std) == pytest.approx((0.82, 0.02))
  assert stat.half == pytest.approx(T975[2] * 0.02 / math.sqrt(3), rel=1e-4)
  five = verdicts.interval([1, 2, 3, 4, 5])
  assert five.half == pytest.approx(
    T975[4] * math.sqrt(2.5) / math.sqrt(5), rel=1e-4
  )
  assert verdicts.interval([1, 3]).half == pytest.approx(T975[1], rel=1e-4)
  one = verdicts.interval([0.5])
  assert one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.half)
  assert verdicts.interval([]) is None
  assert verdicts.interval([None, 0.5, None]).n == 1
  assert summary.format_interval(stat) == '82.00 ± 4.97 (2.00)'
  assert summary.format_interval(one) == '50.00'


def _row(seed, status='finished', top1=None, **point):
  return dict(
    point,
    seed=str(seed),
    params=100,
    macs=1e6 * float(point.get('width', 1)) * int(point.get('res', 32)),
    top1=top1,
    top5=None if top1 is None else 0.99,
    ema_top1=top1,
    ema_top5=None if top1 is None else 0.99,
    wall_seconds=10.0,
    train_seconds=5.0,
    images_per_second=100.0,
    steps=10,
    status=status,
    error=None if status != 'failed' else 'OSError: disk',
  )


# Per-seed noise shared by every point of a seed (data order), plus a
# little of each run's own: only a paired comparison removes the shared part.
SEED_NOISE = [0.03, -0.02, 0.01, -0.04, 0.02]
OWN_NOISE = [0.001, -0.002, 0.0, 0.002, -0.001]


def _variant_rows(effects, key='shortcut'):
  """Fig. 6-like rows: one row per (variant, seed)."""
  rows = []
  for seed, (shared, own) in enumerate(zip(SEED_NOISE, OWN_NOISE, strict=True)):
    for k, (variant, effect) in enumerate(effects.items()):
      top1 = 0.8 + effect + shared + (own if k else -own)
      rows.append(_row(seed, top1=top1, **{key: variant}))
  return rows


def test_points_pool_their_seeds_and_count_failures():
  rows = _variant_rows({'bottleneck': 0.0, 'none': -0.01})
  rows[-1] = _row(4, 'failed', shortcut='none')
  (base, other) = verdicts.group(rows, ['shortcut', 'seed'])
  assert base.args == {'shortcut': 'bottleneck'} and len(base.finished) == 5
  assert len(other.finished) == 4 and other.status() == '4 finished, 1 failed'
  expected = [r['top1'] for r in rows[:-1] if r['shortcut'] == 'none']
  assert other.stat('top1').mean == pytest.approx(sum(expected) / 4)
  assert other.cost('wall_seconds') == 10.0


def test_paired_comparisons_see_what_unpaired_intervals_cannot():
  rows = _variant_rows({'bottleneck': 0.0, 'expansion': -0.01, 'none': 0.01})
  points = verdicts.group(rows, ['shortcut', 'seed'])
  # The points' own intervals overlap widely (the seeds' shared noise) ...
  assert points[0].stat('top1').half > 0.02
  # ... while the per-seed differences are tight.
  comparisons = verdicts.compare(points)
  pairs = [(c.key, c.base, c.other) for c in comparisons]
  assert pairs == [  # against the baseline, then against the value before
    ('shortcut', 'bottleneck', 'expansion'),
    ('shortcut', 'bottleneck', 'none'),
    ('shortcut', 'expansion', 'none'),
  ]
  worse, better, _ = comparisons
  assert worse.diffs['top1'].mean == pytest.approx(-0.01, abs=2e-3)
  assert (worse.verdict(), better.verdict()) == ('worse', 'better')
  assert worse.seeds == ('0', '1', '2', '3', '4')


def test_no_difference_is_not_distinguishable_and_one_seed_has_no_verdict():
  rows = _variant_rows({'linear': 0.0, 'relu6': 0.0}, 'bottleneck')
  (comparison,) = verdicts.compare(verdicts.group(rows, ['bottleneck', 'seed']))
  assert comparison.verdict() == 'not distinguishable at 95%'
  assert comparison.diffs['top1'].low < 0 < comparison.diffs['top1'].high
  # Seeds are matched: only seed 0 is finished in both.
  rows = [r for r in rows if r['seed'] == '0' or r['bottleneck'] == 'linear']
  (comparison,) = verdicts.compare(verdicts.group(rows, ['bottleneck', 'seed']))
  assert comparison.seeds == ('0',) and 'no interval' in comparison.verdict()


def test_grid_comparisons_hold_the_other_keys_fixed():
  rows = [
    _row(
      s, top1=0.7 + 0.05 * float(w) + 0.001 * int(r) + 0.001 * s, width=w, res=r
    )
    for s in range(3)
    for w in ('0.35', '0.5', '1.0')
    for r in ('32', '48')
  ]
  points = verdicts.group(rows, ['width', 'res', 'seed'])
  assert verdicts.varying(points) == ['width', 'res']
  comparisons = verdicts.compare(points)
  width = [
    (c.base, c.other, c.context) for c in comparisons if c.key == 'width'
  ]
  assert width == [
    ('0.35', '0.5', {'res': '32'}),
    ('0.35', '1.0', {'res': '32'}),
    ('0.5', '1.0', {'res': '32'}),
    ('0.35', '0.5', {'res': '48'}),
    ('0.35', '1.0', {'res': '48'}),
    ('0.5', '1.0', {'res': '48'}),
  ]
  res = [c for c in comparisons if c.key == 'res']
  assert [c.context for c in res] == [
    {'width': w} for w in ('0.35', '0.5', '1.0')
  ]
  # Identical per-seed differences: a zero-width interval, still 'better'.
  assert {c.verdict() for c in comparisons} == {'better'}
  assert res[0].diffs['top1'].mean == pytest.approx(0.016)


def test_files(tmp_path):
  rows = _variant_rows({'linear': 0.0, 'relu6': -0.02}, 'bottleneck')
  files = summary.write(rows, ['bottleneck', 'seed'], str(tmp_path))
  assert set(files) == {
    'results.md',
    'results.csv',
    'points.csv',
    'comparisons.csv',
    'variants.png',
  }
  (comparison,) = csv.DictReader(io.StringIO(files['comparisons.csv']))
  assert comparison['verdict'] == 'worse' and comparison['n'] == '5'
  assert float(comparison['diff_top1_ci_high']) < 0
  points = list(csv.DictReader(io.StringIO(files['points.csv'])))
  assert [p['bottleneck'] for p in points] == ['linear', 'relu6']
  markdown = files['results.md']
  assert '| bottleneck | linear → relu6 | all | 5 |' in markdown
  # Three headers; 2 points, 1 comparison, 10 runs.
  assert markdown.count('\n| ') == 3 + 2 + 1 + 10
  assert (tmp_path / 'variants.png').read_bytes()[:4] == b'\x89PNG'


def test_figure_intervals_stay_within_what_accuracy_can_be():
  # Two seeds far apart: the 95% interval (t = 12.7) runs past 0 and 100.
  high = verdicts.interval([0.99, 0.91])
  low = verdicts.interval([0.02, 0.10])
  one = verdicts.interval([0.5])
  below, above = summary.error_bars([high, low, one])
  assert 100 * high.half > 40
  assert above[0] == pytest.approx(100 - 95.0)
  assert below[0] == pytest.approx(100 * high.half)
  assert below[1] == pytest.approx(6.0)
  assert above[1] == pytest.approx(100 * low.half)
  assert below[2] == above[2] == 0


def _tuned_rows():
  """Widths 0.35, 0.5, 0.75 x lr 0.05, 0.1, 0.2 x seeds 0-2. Minival prefers
  lr 0.2 at width 0.35 (the edge), lr 0.1 at 0.5 and 0.75; the eval split
  prefers lr 0.05 everywhere (never to be chosen on)."""
  minival = {'0.35': (0.80, 0.82, 0.84), '0.5': (0.83, 0.86, 0.84)}
  minival['0.75'] = (0.84, 0.88, 0.85)
  rows = []
  for seed in range(3):
    for width in ('0.35', '0.5', '0.75'):
      for i, lr in enumerate(('0.05', '0.1', '0.2')):
        row = _row(seed, width=width, lr=lr, top1=0.9 - 0.01 * i)
        row['top1'] += 0.01 * float(width) + 0.001 * seed * (1 + i)
        row['minival_top1'] = minival[width][i] + 0.002 * seed
        rows.append(row)
  return rows


def test_tuned_keys_are_chosen_on_minival_and_compared_as_one_family():
  rows = _tuned_rows()
  points = verdicts.group(rows, ['width', 'lr', 'seed'])
  choices = verdicts.choose(points)
  assert [(c.args, c.values) for c in choices] == [
    ({'width': '0.35'}, 'lr=0.2'),
    ({'width': '0.5'}, 'lr=0.1'),
    ({'width': '0.75'}, 'lr=0.1'),
  ]
  assert [c.edges for c in choices] == [('lr',), (), ()]
  assert [c.tried for c in choices] == [3, 3, 3]
  comparisons = verdicts.compare_choices(choices)
  # Width pairs: each against 0.35, and 0.5 -> 0.75: three, one family.
  assert [(c.base, c.other) for c in comparisons] == [
    ('0.35 (lr=0.2)', '0.5 (lr=0.1)'),
    ('0.35 (lr=0.2)', '0.75 (lr=0.1)'),
    ('0.5 (lr=0.1)', '0.75 (lr=0.1)'),
  ]
  first = comparisons[0]
  assert first.confidence == pytest.approx(1 - 0.05 / 3)
  # Seed by seed, at the chosen values: eval top-1 of (0.5, lr 0.1) minus
  # (0.35, lr 0.2); the Student t quantile of 1 - 0.05 / 6, 2 dof.
  diffs = [
    (0.89 + 0.005 + 0.002 * s) - (0.88 + 0.0035 + 0.003 * s) for s in range(3)
  ]
  stat = verdicts.interval(diffs, 1 - 0.05 / 3)
  assert first.diffs['top1'].mean == pytest.approx(stat.mean)
  assert first.diffs['top1'].half == pytest.approx(stat.half)
  assert stat.half == pytest.approx(
    7.6488 * stat.std / math.sqrt(3), rel=1e-3
  )  # t(1 - 0.05 / 6, 2)
  text = summary.markdown(rows, ['width', 'lr', 'seed'], 'tuned')
  assert '## Tuned keys: chosen on minival' in text
  assert 'at the edge of the tried range: lr' in text
  assert 'Bonferroni, 95% / 3' in text
  files = summary.csv_files(rows, ['width', 'lr', 'seed'])
  chosen = list(csv.DictReader(io.StringIO(files['choices.csv'])))
  assert [r['chosen'] for r in chosen] == ['lr=0.2', 'lr=0.1', 'lr=0.1']
  assert [r['edges'] for r in chosen] == ['lr', '', '']
  assert 'chosen_comparisons.csv' in files


def test_no_tuned_key_no_choice_and_no_minival_no_choice():
  rows = [r for r in _tuned_rows() if r['lr'] == '0.1']
  assert verdicts.choose(verdicts.group(rows, ['width', 'lr', 'seed'])) == []
  assert 'choices.csv' not in summary.csv_files(rows, ['width', 'lr', 'seed'])
  rows = _tuned_rows()
  for row in rows:
    row['minival_top1'] = None  # runs from before the minival split
  assert verdicts.choose(verdicts.group(rows, ['width', 'lr', 'seed'])) == []


def test_equal_cost_pairs_differ_in_two_keys_within_the_mac_ratio():
  """width x res at (MACs): 0.35@64 (4.75M), 0.5@40 (4.70M), 0.75@32
  (4.25M), 0.35@32 (1.2M). Three pairs within 1.15x, each two keys apart;
  0.35@32 is cheaper than all by far; no pair one key apart."""
  macs = {('0.35', '64'): 4.75e6, ('0.5', '40'): 4.70e6}
  macs.update({('0.75', '32'): 4.25e6, ('0.35', '32'): 1.2e6})
  rows = []
  for seed in range(3):
    for (width, res), mac in macs.items():
      row = _row(seed, width=width, res=res, top1=0.8 + mac / 1e8 + seed / 100)
      row['macs'] = mac
      rows.append(row)
  points = verdicts.group(rows, ['width', 'res', 'seed'])
  found = verdicts.compare_equal_cost(points)
  assert [(c.key, c.base, c.other) for c in found] == [
    ('width+res', 'width=0.75,res=32', 'width=0.5,res=40'),
    ('width+res', 'width=0.75,res=32', 'width=0.35,res=64'),
    ('width+res', 'width=0.5,res=40', 'width=0.35,res=64'),
  ]
  assert found[0].confidence == pytest.approx(1 - 0.05 / 3)
  # Seed by seed the difference is exactly the MACs' term: std 0, 'better'.
  assert found[0].diffs['top1'].mean == pytest.approx(0.0045)
  assert [c.verdict() for c in found] == ['better'] * 3
  (near,) = verdicts.compare_equal_cost(points, ratio=1.05)  # a family of 1
  assert (near.base, near.other, near.confidence) == (
    'width=0.5,res=40',
    'width=0.35,res=64',
    0.95,
  )
  text = summary.markdown(rows, ['width', 'res', 'seed'], 'equal cost')
  assert '## Equal-cost comparisons' in text and 'one family of 3' in text
  files = summary.csv_files(rows, ['width', 'res', 'seed'])
  assert len(files['equal_cost_comparisons.csv'].splitlines()) == 4


def test_train_x_test_resolution_table_and_whether_testing_larger_helps():
  """Points trained at 32 and 48 px, each also evaluated at 48 and 64:
  testing 16 px above the training size adds 2 points, seed by seed."""
  rows = []
  for seed in range(3):
    for res in ('32', '48'):
      row = _row(seed, width='0.5', res=res, top1=0.80 + 0.01 * seed)
      row['at_resolution'] = {
        str(size): dict(
          top1=row['top1'] + 0.02 * (size - int(res)) / 16, ema_top1=0.5
        )
        for size in (48, 64)
        if size != int(res)
      }
      # Re-estimated statistics: 1 point at the training size, 3 per 16 px.
      row['at_resolution_bn'] = {
        str(size): dict(
          top1=row['top1'] + 0.01 + 0.03 * (size - int(res)) / 16,
          ema_top1=0.5,
        )
        for size in (32, 48, 64)
        if size >= int(res)
      }
      rows.append(row)
  points = verdicts.group(rows, ['width', 'res', 'seed'])
  assert verdicts.test_sizes(points) == ['48', '64']
  found = verdicts.compare_test_resolutions(points)
  assert [(c.context['res'], c.other) for c in found] == [
    ('32', '48'),
    ('32', '64'),
    ('48', '64'),
  ]
  assert [round(c.diffs['top1'].mean, 6) for c in found] == [0.02, 0.04, 0.02]
  assert found[0].confidence == pytest.approx(1 - 0.05 / 3)
  assert [c.verdict() for c in found] == ['better'] * 3
  text = summary.markdown(rows, ['width', 'res', 'seed'], 'fixres')
  assert '| width | res | test 32 px | test 48 px | test 64 px |' in text
  assert '| 0.5 | 32 | 81.00 ± 2.48 (1.00) | 83.00 ± 2.48 (1.00) |' in text
  bn = verdicts.compare_test_resolutions(points, verdicts.REESTIMATED)
  assert [(c.context['res'], c.other) for c in bn] == [
    ('32', '32'),
    ('32', '48'),
    ('32', '64'),
    ('48', '48'),
    ('48', '64'),
  ]
  assert [round(c.diffs['top1'].mean, 6) for c in bn] == [
    0.01,
    0.04,
    0.07,
    0.01,
    0.04,
  ]
  assert bn[0].confidence == pytest.approx(1 - 0.05 / 5)
  assert '## Train x test resolution, BatchNorm statistics re-estimated' in (
    text
  )
  assert '| 0.5 | 48 |  | 82.00 ± 2.48 (1.00) | 85.00 ± 2.48 (1.00) |' in text
  files = summary.csv_files(rows, ['width', 'res', 'seed'])
  assert 'at_resolution' not in files['results.csv']  # not a column
  assert len(files['test_resolution_comparisons.csv'].splitlines()) == 1 + 8


def test_the_front_keeps_the_points_no_cheaper_point_beats():
  rows = []
  for seed in range(2):
    for width, res, mac, top1 in (
      ('0.35', '32', 1.2e6, 0.80),
      ('0.5', '32', 2.0e6, 0.79),  # beaten by a cheaper point
      ('0.35', '48', 3.2e6, 0.83),
      ('0.75', '32', 4.2e6, 0.83),  # only ties a cheaper one
      ('0.75', '48', 11e6, 0.86),
    ):
      row = _row(seed, width=width, res=res, top1=top1 + seed / 1000)
      row['macs'] = mac
      rows.append(row)
  points = verdicts.group(rows, ['width', 'res', 'seed'])
  assert [(p.args['width'], p.args['res']) for p in verdicts.front(points)] == [
    ('0.35', '32'),
    ('0.35', '48'),
    ('0.75', '48'),
  ]
  name, png = summary.plot(rows, ['width', 'res', 'seed'], 'front')
  assert name == 'accuracy_vs_macs.png' and png[:8] == b'\x89PNG\r\n\x1a\n'
