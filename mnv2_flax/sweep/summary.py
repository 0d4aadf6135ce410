"""A sweep's summary: its tables, CSV files and figure.

Every (point, seed) is one run, one row. The statistics, the paired
comparisons and their verdicts are `verdicts`': a point's seeds pooled
(n, mean, sample std, Student-t 95% interval of each accuracy) beside its
cost (parameters, MACs, wall time, images/s); points compared seed by seed
along each varying key; where a recipe key (lr, wd, ls, ema) varies, each
point at its values of the best minival mean, compared as one family;
points of equal cost; test resolutions above the training one.

Files (in the sweep's root): `results.md` (the tables), `results.csv` (one
row per run), `points.csv`, `comparisons.csv`, `choices.csv` and
`chosen_comparisons.csv` (tuned keys), `equal_cost_comparisons.csv`,
`test_resolution_comparisons.csv`, and `accuracy_vs_macs.png` or, when all
points share width and resolution, `variants.png`.
"""

import contextlib
import csv
import io
import os
from typing import Any

from mnv2_flax.runtime import files as file_utils
from mnv2_flax.sweep import verdicts

# Per-run columns after the point's keys.
COLUMNS = (
  'params',
  'macs',
  *verdicts.METRICS,
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


def _resolution_parts(points: list[verdicts.Point]) -> list[str]:
  parts = []
  for key, statistics in verdicts.STATISTICS.items():
    sizes = verdicts.test_sizes(points, key)
    if not sizes:
      continue
    keys = list(points[0].args)
    if key == verdicts.AS_TRAINED:
      sizes = sorted(
        set(sizes) | {p.args['res'] for p in points if 'res' in p.args},
        key=int,
      )
    rows = []
    for p in points:
      cells = []
      for size in sizes:
        cells.append(
          format_interval(
            verdicts.interval(
              verdicts.at_size(r, size, key).get('top1') for r in p.finished
            )
          )
        )
      rows.append([p.args[k] for k in keys] + cells)
    parts += [
      f'## Train x test resolution, BatchNorm statistics {statistics}',
      '',
      'Top-1 % on the eval split of each point (trained at its `res`) '
      'evaluated at each test size: centre crop resized to it, BatchNorm '
      f'statistics {statistics}'
      + (
        ''
        if key == verdicts.AS_TRAINED
        else ' there on training images (`config.data.test_bn_examples`)'
      )
      + '.',
      '',
      '\n'.join(_table(keys + [f'test {s} px' for s in sizes], rows)),
      '',
    ]
    comparisons = verdicts.compare_test_resolutions(points, key)
    if comparisons:
      parts += [
        (
          'Testing above the training size'
          if key == verdicts.AS_TRAINED
          else 'Testing at each size with statistics re-estimated there'
        )
        + ' minus testing at the training size as trained, seed by seed '
        f'(one family of {len(comparisons)}, intervals at '
        f'{comparisons[0].confidence:.2%}, Bonferroni):',
        '',
        comparisons_table(comparisons),
        '',
      ]
  return parts


# ------------------------------------------------------------------ writing


def _pct(value: float) -> str:
  return f'{100 * value:.2f}'


def _cell(key: str, value: Any) -> str:
  """One per-run table cell."""
  if value is None or value == '':
    return ''
  if key in verdicts.METRICS:
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


def format_interval(stat: verdicts.Interval | None, sign: bool = False) -> str:
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


def points_table(points: list[verdicts.Point]) -> str:
  keys = list(points[0].args) if points else []
  header = keys + ['n'] + [NAMES[m] for m in verdicts.METRICS]
  header += ['params', 'MACs', 'wall', 'img/s', 'runs']
  rows = []
  for p in points:
    rows.append(
      [p.args[k] for k in keys]
      + [str(len(p.finished))]
      + [format_interval(p.stat(m)) for m in verdicts.METRICS]
      + [
        _cell('params', p.cost('params')),
        _cell('macs', p.cost('macs')),
        _cell('wall_seconds', p.cost('wall_seconds')),
        _cell('images_per_second', p.cost('images_per_second')),
        p.status(),
      ]
    )
  return '\n'.join(_table(header, rows))


def _at(comparison: verdicts.Comparison) -> str:
  return ', '.join(f'{k}={v}' for k, v in comparison.context.items()) or 'all'


def comparisons_table(comparisons: list[verdicts.Comparison]) -> str:
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


def _edge_note(choice: verdicts.Choice) -> str:
  if not choice.edges:
    return ''
  return 'at the edge of the tried range: ' + ', '.join(choice.edges)


def choices_table(choices: list[verdicts.Choice]) -> str:
  keys = list(choices[0].args)
  header = keys + ['chosen', 'tried', 'n']
  header += [NAMES[m] for m in (verdicts.CHOOSE_ON, 'top1', 'ema_top1')] + [
    'note'
  ]
  rows = [
    [c.args[k] for k in keys]
    + [c.values, str(c.tried), str(len(c.chosen.finished))]
    + [
      format_interval(c.chosen.stat(m))
      for m in (verdicts.CHOOSE_ON, 'top1', 'ema_top1')
    ]
    + [_edge_note(c)]
    for c in choices
  ]
  return '\n'.join(_table(header, rows))


def _tuned_parts(points: list[verdicts.Point]) -> list[str]:
  """The markdown of the tuned keys' choices and their comparisons."""
  choices = verdicts.choose(points)
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
  comparisons = verdicts.compare_choices(choices)
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
  points = verdicts.group(rows, keys)
  comparisons = verdicts.compare(points)
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
  equal_cost = verdicts.compare_equal_cost(points)
  if equal_cost:
    parts += [
      '## Equal-cost comparisons',
      '',
      'Points that differ in two or more keys with MACs within '
      f'{verdicts.MAC_RATIO:g}x of each other (at their chosen values where '
      'keys are tuned): the costlier minus the cheaper, seed by seed, in '
      f'accuracy points; one family of {len(equal_cost)}, intervals at '
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


def _interval_columns(
  prefix: str, stat: verdicts.Interval | None
) -> dict[str, Any]:
  fields = ('mean', 'std', 'ci_low', 'ci_high')
  values = (stat.mean, stat.std, stat.low, stat.high) if stat else (None,) * 4
  return {f'{prefix}_{f}': v for f, v in zip(fields, values, strict=True)}


def csv_files(rows: list[dict], keys: list[str]) -> dict[str, str]:
  """results.csv (runs), points.csv and comparisons.csv, as text."""
  points = verdicts.group(rows, keys)
  point_rows = []
  for p in points:
    row = dict(p.args, n=len(p.finished), runs=p.status())
    for m in verdicts.METRICS:
      row.update(_interval_columns(m, p.stat(m)))
    for c in ('params', 'macs', 'wall_seconds', 'images_per_second'):
      row[c] = p.cost(c)
    point_rows.append(row)
  files = {
    'results.csv': _csv(keys + list(COLUMNS), rows),
    'points.csv': _csv(list(point_rows[0]) if point_rows else [], point_rows),
    'comparisons.csv': _comparisons_csv(verdicts.compare(points)),
  }
  equal_cost = verdicts.compare_equal_cost(points)
  if equal_cost:
    files['equal_cost_comparisons.csv'] = _comparisons_csv(equal_cost)
  resolutions = [
    c
    for key in verdicts.STATISTICS
    for c in verdicts.compare_test_resolutions(points, key)
  ]
  if resolutions:
    files['test_resolution_comparisons.csv'] = _comparisons_csv(resolutions)
  choices = verdicts.choose(points)
  if choices:
    choice_rows = []
    for c in choices:
      row = dict(
        c.args, chosen=c.values, tried=c.tried, n=len(c.chosen.finished)
      )
      for m in verdicts.METRICS:
        row.update(_interval_columns(m, c.chosen.stat(m)))
      row['edges'] = ' '.join(c.edges)
      choice_rows.append(row)
    files['choices.csv'] = _csv(list(choice_rows[0]), choice_rows)
    files['chosen_comparisons.csv'] = _comparisons_csv(
      verdicts.compare_choices(choices)
    )
  return files


def _comparisons_csv(comparisons: list[verdicts.Comparison]) -> str:
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
    for m in verdicts.METRICS:
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

  planned = verdicts.group(rows, keys)
  points = [p for p in planned if p.finished]
  keys_varying = verdicts.varying(points)
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
    best = verdicts.front(points)
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
