"""Runs a sweep of training runs, resumably, and summarises it.

  python -m mnv2_flax.sweep --config=configs/ablation.py:fashion_mnist \
      --root=sweeps/fashion_mnist [--shard=i/n] [--dry_run] [--summarize_only]
      [--set=train.num_epochs=2 ...]

The config file provides `get_sweep(arg) -> [point arg, ...]` and
`get_config(point arg)`. Every point trains in `<root>/<point name>` through
the same `train_lib.train_and_evaluate` as `train.py`:

- a point whose `results.json` says `finished` is skipped; one with
  checkpoints resumes from them; a point that fails has its error recorded
  (`<workdir>/error.txt` and the summary) and the sweep goes on;
- `--shard=i/n` runs points i, i+n, i+2n, ... so n machines split a sweep;
- after every point, and with `--summarize_only`, the root gets
  `results.csv`, `results.md` and a figure: `accuracy_vs_macs.png` (top-1
  against MACs, one line per width) or, when all points share width and
  resolution (the Fig. 6 ablations), `variants.png`.
"""

from collections.abc import Callable
import csv
import dataclasses
import importlib.util
import io
import json
import os
import shlex
import sys
import time
import traceback
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from mnv2_flax import cli
from mnv2_flax import compilation_cache
from mnv2_flax import cpu
from mnv2_flax import hardware
from mnv2_flax import train_lib

COLUMNS = (
  'params',
  'macs',
  'top1',
  'top5',
  'ema_top1',
  'ema_top5',
  'wall_seconds',
  'train_seconds',
  'images_per_second',
  'steps',
  'status',
  'error',
)


@dataclasses.dataclass(frozen=True)
class Point:
  arg: str  # 'width=0.5,res=24'
  workdir: str

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)


def point_name(arg: str) -> str:
  """'width=0.5,res=24' -> 'width-0.5_res-24' (a shell-safe directory name)."""
  name = arg.replace('=', '-').replace(',', '_')
  safe = all(c.isalnum() or c in '-_.' for c in name)
  if not name or not safe:
    raise ValueError(f'point argument {arg!r} gives no valid directory name.')
  return name


def load_config_module(path: str):
  """Imports a config file by path, as `ml_collections.config_flags` does."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config: no config file at {path!r}.')
  # A config inside a package (configs/ablation.py imports configs.default)
  # needs the package's parent importable, wherever the command runs from.
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(folder, '__init__.py')):
    parent = os.path.dirname(folder)
    if parent not in sys.path:
      sys.path.insert(0, parent)
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'--config: {path} defines no get_sweep(arg).')
  return module


def parse_shard(shard: str) -> tuple[int, int]:
  """'1/4' -> (1, 4), checked."""
  index, _, count = shard.partition('/')
  try:
    index, count = int(index), int(count)
  except ValueError:
    index, count = -1, 0
  if not 0 <= index < count:
    raise ValueError(
      f'--shard={shard!r}: expected i/n with 0 <= i < n, e.g. 0/4.'
    )
  return index, count


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, str]
) -> ml_collections.ConfigDict:
  """Sets `{'train.num_epochs': '2'}` on `config`, typed like the default."""
  for key, text in overrides.items():
    *sections, field = key.split('.')
    node = config
    for section in sections:
      node = (
        node.get(section)
        if isinstance(node, dict | ml_collections.ConfigDict)
        else None
      )
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      raise ValueError(f'--set {key}={text}: the config has no field {key}.')
    kind = node.get_ref(field).get_type()  # a placeholder's type too
    if text == 'None' and node[field] is None:
      value = None
    elif kind is str:
      value = text
    elif kind is bool:
      if text not in ('True', 'False', 'true', 'false'):
        raise ValueError(f'--set {key}={text}: expected True or False.')
      value = text in ('True', 'true')
    elif kind in (int, float):
      try:
        value = kind(text)
      except ValueError:
        raise ValueError(
          f'--set {key}={text}: expected a {kind.__name__}.'
        ) from None
    else:
      raise ValueError(
        f'--set {key}: a {kind.__name__} field cannot be set here.'
      )
    node[field] = value
  return config


def _write_atomically(path: str, text: str | bytes) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb' if isinstance(text, bytes) else 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def point_status(point: Point) -> dict[str, Any]:
  """The point's results, wall time and status from its workdir."""
  results = _read_json(os.path.join(point.workdir, 'results.json'))
  sweep = _read_json(os.path.join(point.workdir, 'sweep.json'))
  row = {k: results.get(k) for k in COLUMNS}
  row['wall_seconds'] = sweep.get('wall_seconds')
  if results.get('finished'):
    row['status'] = 'finished'
  elif sweep.get('error'):
    row['status'], row['error'] = 'failed', sweep['error']
  elif os.path.isdir(os.path.join(point.workdir, 'checkpoints')):
    row['status'] = 'interrupted'
  else:
    row['status'] = 'pending'
  return row


def _record(point: Point, wall_seconds: float, error: str | None) -> None:
  path = os.path.join(point.workdir, 'sweep.json')
  previous = _read_json(path)
  record = dict(
    arg=point.arg,
    wall_seconds=previous.get('wall_seconds', 0.0) + wall_seconds,
    error=error,
  )
  _write_atomically(path, json.dumps(record, indent=2))


def _format_duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f'{minutes // 60}:{minutes % 60:02d}:{seconds:02d}'


def run(
  module,
  point_args: list[str],
  root: str,
  overrides: dict[str, str] | None = None,
  shard: tuple[int, int] = (0, 1),
  train_fn: Callable[..., dict] = train_lib.train_and_evaluate,
) -> list[dict[str, Any]]:
  """Runs this shard's unfinished points; returns the summary rows."""
  points = make_points(point_args, root)
  # Configs are built (and checked) before anything runs.
  configs = {}
  for point in points[shard[0] :: shard[1]]:
    configs[point] = apply_overrides(
      module.get_config(point.arg), overrides or {}
    )
  todo = [p for p in configs if point_status(p)['status'] != 'finished']
  logging.info(
    'Sweep: %d points, %d in this shard, %d to run.',
    len(points),
    len(configs),
    len(todo),
  )
  durations, rows = [], None
  for k, point in enumerate(todo):
    eta = (
      _format_duration(sum(durations) / len(durations) * (len(todo) - k))
      if durations
      else '?'
    )
    logging.info(
      'Sweep point %d/%d: %s (ETA of the sweep %s)',
      k + 1,
      len(todo),
      point.arg,
      eta,
    )
    os.makedirs(point.workdir, exist_ok=True)
    start = time.perf_counter()
    error = None
    try:
      train_fn(configs[point], point.workdir)
    except Exception as e:  # pylint: disable=broad-except
      error = f'{type(e).__name__}: {e}'
      logging.error('Sweep point %s failed: %s', point.arg, error)
      with open(os.path.join(point.workdir, 'error.txt'), 'w') as f:
        f.write(traceback.format_exc())
    durations.append(time.perf_counter() - start)
    _record(point, durations[-1], error)
    rows = summarize(module, point_args, root)
  if rows is None:  # nothing ran: the summary is still written
    rows = summarize(module, point_args, root)
  logging.info(
    'Sweep done: %d finished, %d failed, %d not run here. Summary: %s',
    sum(r['status'] == 'finished' for r in rows),
    sum(r['status'] == 'failed' for r in rows),
    sum(r['status'] in ('pending', 'interrupted') for r in rows),
    os.path.join(root, 'results.md'),
  )
  return rows


def make_points(point_args: list[str], root: str) -> list[Point]:
  points = [Point(a, os.path.join(root, point_name(a))) for a in point_args]
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f'the sweep has repeated points: {names}.')
  return points


def dry_run_commands(
  config_path: str,
  point_args: list[str],
  root: str,
  overrides: dict[str, str] | None = None,
  shard: tuple[int, int] = (0, 1),
) -> list[str]:
  """One `train.py` command per point of the shard (for a scheduler)."""
  extra = ''.join(
    f' --config.{k}={shlex.quote(v)}' for k, v in (overrides or {}).items()
  )
  return [
    f'python train.py --config={config_path}:{p.arg} --workdir={p.workdir}'
    + extra
    for p in make_points(point_args, root)[shard[0] :: shard[1]]
  ]


# ------------------------------------------------------------------ summaries


def _args(arg: str) -> dict[str, str]:
  return dict(item.split('=', 1) for item in arg.split(',') if item)


def summarize(module, point_args: list[str], root: str) -> list[dict]:
  """Writes results.csv, results.md and the figure; returns the rows."""
  os.makedirs(root, exist_ok=True)
  points = make_points(point_args, root)
  keys = []
  for point in points:
    keys += [k for k in _args(point.arg) if k not in keys]
  rows = [
    {**{k: _args(p.arg).get(k, '') for k in keys}, **point_status(p)}
    for p in points
  ]
  header = keys + list(COLUMNS)
  out = io.StringIO()
  writer = csv.DictWriter(out, header, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  _write_atomically(os.path.join(root, 'results.csv'), out.getvalue())
  _write_atomically(os.path.join(root, 'results.md'), _markdown(rows, keys))
  _plot(module, rows, root)
  return rows


def _cell(key: str, value: Any) -> str:
  if value is None or value == '':
    return ''
  if key in ('top1', 'top5', 'ema_top1', 'ema_top5'):
    return f'{100 * value:.2f}'
  if key == 'macs':
    return f'{value / 1e6:.2f}M'
  if key == 'params':
    return f'{value:,}'
  if key in ('wall_seconds', 'train_seconds'):
    return _format_duration(value)
  if key == 'images_per_second':
    return f'{value:,.0f}'
  if key == 'error':
    return str(value).replace('|', '/').replace('\n', ' ')[:80]
  return str(value)


def _markdown(rows: list[dict], keys: list[str]) -> str:
  names = dict(
    top1='top-1 %',
    top5='top-5 %',
    ema_top1='EMA top-1 %',
    ema_top5='EMA top-5 %',
    wall_seconds='wall',
    train_seconds='train',
    images_per_second='img/s',
  )
  header = keys + list(COLUMNS)
  lines = [
    '| ' + ' | '.join(names.get(h, h) for h in header) + ' |',
    '|' + '---|' * len(header),
  ]
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(h, row[h]) for h in header) + ' |')
  return '\n'.join(lines) + '\n'


def _plot(module, rows: list[dict], root: str) -> None:
  """accuracy_vs_macs.png, or variants.png for same-size variants."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  done = [
    r for r in rows if r['status'] == 'finished' and r['top1'] is not None
  ]
  sizes = {(r.get('width', ''), r.get('res', '')) for r in rows}
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
  if len(sizes) == 1:  # Fig. 6: variants of one size
    variant_keys = [
      k for k in ('bottleneck', 'shortcut', 'expand', 'seed') if k in rows[0]
    ]
    labels = [
      ','.join(f'{k}={r[k]}' for k in variant_keys if r[k]) or 'default'
      for r in done
    ]
    ax.bar(range(len(done)), [100 * r['top1'] for r in done])
    ax.set_xticks(range(len(done)), labels, rotation=15)
    for i, r in enumerate(done):
      ax.annotate(
        f'{100 * r["top1"]:.1f}', (i, 100 * r['top1']), ha='center', va='bottom'
      )
    ax.set_ylabel('top-1 accuracy (%)')
    if done:
      low = min(100 * r['top1'] for r in done)
      ax.set_ylim(max(0, low - 10), 100)
    name = 'variants.png'
  else:
    widths = sorted({r['width'] for r in done}, key=float)
    for width in widths:
      line = sorted(
        (r for r in done if r['width'] == width), key=lambda r: r['macs']
      )
      ax.plot(
        [r['macs'] / 1e6 for r in line],
        [100 * r['top1'] for r in line],
        'o-',
        label=f'width {width}',
      )
      for r in line:
        ax.annotate(
          r['res'],
          (r['macs'] / 1e6, 100 * r['top1']),
          textcoords='offset points',
          xytext=(3, 3),
          fontsize=8,
        )
    if any(r.get('data') == 'imagenet' for r in rows):
      published = getattr(module, 'PUBLISHED', {})
      for width in sorted({w for w, _ in published}):
        line = sorted(v for (w, _), v in published.items() if w == width)
        ax.plot(
          *zip(*line, strict=True),
          'x--',
          alpha=0.6,
          label=f'width {width}, TF-slim published',
        )
    ax.set_xscale('log')
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}')
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel('MACs (millions, log scale)')
    ax.set_ylabel('top-1 accuracy (%)')
    if done:
      ax.legend(fontsize=8)
    name = 'accuracy_vs_macs.png'
  ax.set_title(
    f'{os.path.basename(os.path.abspath(root))}: '
    f'{len(done)} of {len(rows)} points'
  )
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out = io.BytesIO()
  fig.savefig(out, format='png')
  plt.close(fig)
  _write_atomically(os.path.join(root, name), out.getvalue())


# ------------------------------------------------------------------------ CLI


_CONFIG = flags.DEFINE_string('config', None, 'path/to/config.py:sweep_arg')
_ROOT = flags.DEFINE_string(
  'root', None, 'Directory of the sweep (one workdir per point).'
)
_SHARD = flags.DEFINE_string('shard', '0/1', 'i/n: run points i, i+n, ...')
_DRY_RUN = flags.DEFINE_bool(
  'dry_run', False, 'Print one train.py command per point.'
)
_SUMMARIZE_ONLY = flags.DEFINE_bool(
  'summarize_only', False, 'Only write the summaries.'
)
_SET = flags.DEFINE_multi_string(
  'set', [], 'key=value config override for every point.'
)


def main(argv):
  del argv
  cpu.configure_host()  # before JAX starts its CPU client
  path, _, sweep_arg = _CONFIG.value.partition(':')
  module = load_config_module(path)
  point_args = module.get_sweep(sweep_arg or None)
  overrides = dict(s.split('=', 1) if '=' in s else (s, '') for s in _SET.value)
  shard = parse_shard(_SHARD.value)
  # Every override checked before anything runs.
  configs = [
    apply_overrides(module.get_config(a), overrides) for a in point_args
  ]
  if _DRY_RUN.value:
    for command in dry_run_commands(
      path, point_args, _ROOT.value, overrides, shard
    ):
      print(command)
    return
  if _SUMMARIZE_ONLY.value:
    rows = summarize(module, point_args, _ROOT.value)
  else:
    logging.info('%s', hardware.describe())
    hardware.check_accelerator(
      any(c.train.require_accelerator for c in configs)
    )
    # The cache directory is the points' own, `--set` overrides included.
    compilation_cache.enable(configs[0])
    rows = run(module, point_args, _ROOT.value, overrides, shard)
  print(f'{len(rows)} points; table: {os.path.join(_ROOT.value, "results.md")}')
  print(
    _markdown(rows, [k for k in rows[0] if k not in COLUMNS]) if rows else ''
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'root'])
  cli.run(main)
