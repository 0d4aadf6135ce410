"""Tests of the ablation configs and the sweep launcher."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from configs import ablation
from mnv2_flax import models
from mnv2_flax import stats
from mnv2_flax.sweep import driver
from mnv2_flax.sweep import grid
from mnv2_flax.sweep import slurm
from mnv2_flax.sweep import verdicts
from mnv2_flax.sweep import workers
from mnv2_flax.train import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_named_sweeps():
  imagenet = ablation.get_sweep('imagenet')
  assert len(imagenet) == 21 and len(set(imagenet)) == 21
  assert imagenet[-1] == 'data=imagenet,width=1.4,res=224'
  assert 'data=imagenet,width=0.35,res=96' in imagenet
  fmnist = ablation.get_sweep(None)
  assert fmnist == ablation.get_sweep('fashion_mnist')
  assert len(fmnist) == len(set(fmnist)) >= 3 * 4  # seeds >= 3, 2x2 at least
  # Seeds vary slowest: a sweep stopped part-way has whole seeds done.
  seeds = [a.rsplit('seed=', 1)[1] for a in fmnist]
  assert seeds == sorted(seeds, key=int) and seeds[0] == '0'
  assert ablation.get_sweep('bottleneck,seeds=2') == [
    'bottleneck=linear,seed=0',
    'bottleneck=relu6,seed=0',
    'bottleneck=linear,seed=1',
    'bottleneck=relu6,seed=1',
  ]
  assert ablation.get_sweep('shortcut,data=imagenet,epochs=2,seed=7') == [
    f'data=imagenet,shortcut={s},epochs=2,seed=7'
    for s in ('bottleneck', 'expansion', 'none')
  ]
  # The 1.4 point comes with every seed of the grid.
  assert len(ablation.get_sweep('imagenet,seeds=2')) == 42
  with pytest.raises(ValueError, match="sweep 'fig5' is not known"):
    ablation.get_sweep('fig5')


def test_user_grids():
  args = ablation.get_sweep('grid,width=0.35|0.5|1.0,res=32|48,seeds=3')
  assert len(args) == 18 and len(set(args)) == 18
  assert args[:3] == [
    'width=0.35,res=32,seed=0',
    'width=0.35,res=48,seed=0',
    'width=0.5,res=32,seed=0',
  ]
  assert args[-1] == 'width=1.0,res=48,seed=2'
  # Without a name it is a grid too; chosen seeds; one-value keys are fixed.
  assert ablation.get_sweep('expand=4|6,seed=3|9,epochs=2') == [
    'expand=4,epochs=2,seed=3',
    'expand=6,epochs=2,seed=3',
    'expand=4,epochs=2,seed=9',
    'expand=6,epochs=2,seed=9',
  ]
  # A named sweep's axis gives way to the user's.
  assert ablation.get_sweep('fashion_mnist,width=1.0,seeds=1') == [
    'width=1.0,res=32,seed=0',
    'width=1.0,res=48,seed=0',
  ]
  for arg, words in [
    ('grid,depth=3|4', "'depth=3|4': expected key=value with key one of"),
    ('grid,width=0.35|wide', "width='wide' is not a number > 0"),
    ('grid,res=32|32', "res='32|32' repeats a value"),
    ('grid,seeds=0', "seeds='0': expected one count N >= 1"),
    ('grid,seeds=2|3', "seeds='2|3': expected one count"),
    ('grid,seeds=2,seed=1', 'seeds and seed: give one'),
    ('grid,bottleneck=linear|tanh', "bottleneck='tanh': valid are linear"),
    ('grid,width=1,width=2', 'width is given twice'),
  ]:
    with pytest.raises(ValueError, match=re.escape(words)):
      ablation.get_sweep(arg)
  # A single run (train.py) takes one value per key.
  with pytest.raises(ValueError, match='one value per run'):
    ablation.get_config('width=0.35|0.5')


def test_point_configs():
  config = ablation.get_config('width=0.5,res=24,bottleneck=relu6,expand=4')
  assert config.model.width_multiplier == 0.5
  assert config.data.image_size == 24
  assert config.model.bottleneck_activation == 'relu6'
  assert config.model.expand_ratio == 4.0
  assert config.data.name == 'fashion_mnist'
  assert config.train.num_epochs == 1.0
  assert config.data.crop_area_range == (1.0, 1.0)  # no random crops
  assert ablation.get_config('crop=0.25').data.crop_area_range == (0.25, 1.0)
  config = ablation.get_config('data=imagenet,width=1.4,res=224')
  assert config.data.name.startswith('imagenet2012')
  assert (config.model.width_multiplier, config.data.image_size) == (1.4, 224)
  for arg, words in [
    ('depth=3', "'depth=3'"),
    ('width', "'width'"),
    ('res=big', "res='big' is not an integer > 0"),
    ('seed=-1', "seed='-1' is not an integer >= 0"),
    ('crop=1.5', "crop='1.5' is not a number > 0 and <= 1"),
    ('data=cifar', "data='cifar'"),
  ]:
    with pytest.raises(ValueError, match=words):
      ablation.get_config(arg)


def test_point_names_are_distinct_and_shell_safe():
  args = sum(
    (ablation.get_sweep(name) for name in ablation.SWEEPS if name != 'grid'),
    start=[],
  )
  names = [grid.point_name(a) for a in args]
  assert grid.point_name('width=0.5,res=24') == 'width-0.5_res-24'
  assert len(set(names)) == len(set(args))
  assert all(
    n.replace('-', '').replace('_', '').replace('.', '').isalnum()
    for n in names
  )
  with pytest.raises(ValueError, match='no valid directory name'):
    grid.point_name('width=0.5,res=../x')


def _simulate(points, costs, count):
  """Workers taking packs by `workers.next_pack`, each pack taking
  its cost in time: (order of (time, worker, arg) starts, finish time of
  each worker)."""
  queue = [[grid.Point(arg, '')] for arg in points]
  built = [set() for _ in range(count)]
  free_at, starts = [0.0] * count, []
  while queue:
    w = min(range(count), key=lambda i: free_at[i])
    pack = queue.pop(workers.next_pack(queue, built[w], costs))
    built[w].add(grid.pack_key(pack[0].arg))
    starts.append((free_at[w], w, pack[0].arg))
    free_at[w] += costs[grid.pack_key(pack[0].arg)]
  return starts, free_at


def test_workers_take_the_costliest_points_first_and_keep_their_shapes():
  points = ablation.get_sweep('fashion_mnist')  # 4 points x seeds 0-4
  costs = {grid.pack_key(a): grid.cost(ablation.get_config(a)) for a in points}
  assert costs['width=0.75,res=48'] == max(costs.values())
  assert costs['width=0.35,res=32'] == min(costs.values())
  starts, free_at = _simulate(points, costs, count=2)
  # The costliest point starts first; seeds stay slowest: no pack starts
  # while a seed two below it is still queued.
  assert starts[0][2] == 'width=0.75,res=48,seed=0'
  seeds = [int(arg.rsplit('seed=', 1)[1]) for _, _, arg in starts]
  assert all(s <= min(seeds[i:]) + 1 for i, s in enumerate(seeds))
  # Each shape is built on one worker only, but for the last pack: a free
  # worker takes what is left rather than idle.
  owner = {}
  for _, w, arg in starts[:-1]:
    assert owner.setdefault(grid.pack_key(arg), w) == w, arg
  # The two workers end within the cost of the cheapest point of each
  # other; the order of the grid (first point first) idles one for longer.
  assert abs(free_at[0] - free_at[1]) <= min(costs.values()) * 1.01
  _, in_order = _simulate_in_order(points, costs, workers=2)
  assert abs(in_order[0] - in_order[1]) > abs(free_at[0] - free_at[1])


def test_a_parallel_sweep_builds_the_kernels_once_while_it_prepares_data(
  monkeypatch,
):
  # Built in a thread beside the data preparation, waited for before the
  # workers start (each would otherwise build them at its start); not
  # where the fast path is off or the workers would not run on the CPU.
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  from mnv2_flax.cpu import kernels  # pylint: disable=g-import-not-at-top
  from mnv2_flax.runtime import hardware  # pylint: disable=g-import-not-at-top

  events = []

  def build():
    events.append(('build', threading.current_thread().name))
    time.sleep(0.3)
    events.append(('built', None))
    return 'library'

  monkeypatch.setattr(kernels, 'build', build)
  config = ablation.get_config('width=0.35,res=32')
  with driver._kernels_built([config]):
    time.sleep(0.1)
    events.append(('preparing', threading.current_thread().name))
  events.append(('workers', None))
  assert [e for e, _ in events] == ['build', 'preparing', 'built', 'workers']
  assert events[0][1] != events[1][1]

  events.clear()
  config.train.cpu_fast_path = False
  with driver._kernels_built([config]):
    pass
  monkeypatch.setattr(hardware, 'expected_platform', lambda: 'gpu')
  config.train.cpu_fast_path = True
  with driver._kernels_built([config]):
    pass
  assert not events


def _simulate_in_order(points, costs, workers):
  free_at, starts = [0.0] * workers, []
  for arg in points:
    w = min(range(workers), key=lambda i: free_at[i])
    starts.append((free_at[w], w, arg))
    free_at[w] += costs[grid.pack_key(arg)]
  return starts, free_at


@pytest.mark.parametrize('count', [1, 2, 3, 4, 7])
def test_shards_split_disjointly_and_completely(count):
  args = ablation.get_sweep('imagenet')
  shards = [
    driver.dry_run_commands('configs/ablation.py', args, '/r', shard=(i, count))
    for i in range(count)
  ]
  flat = sum(shards, start=[])
  assert sorted(flat) == sorted(
    driver.dry_run_commands('configs/ablation.py', args, '/r')
  )
  assert len(flat) == len(set(flat)) == 21
  assert flat[0] == (
    'python train.py --config=configs/ablation.py:'
    'data=imagenet,width=0.35,res=96 '
    '--workdir=/r/data-imagenet_width-0.35_res-96'
  )
  with pytest.raises(ValueError, match='--shard'):
    driver.parse_shard(f'{count}/{count}')


def test_overrides_are_typed_and_checked():
  config = ablation.get_config(None)
  grid.apply_overrides(
    config,
    {
      'train.num_epochs': '2',
      'data.data_dir': '/d',
      'checkpoint.async_save': 'False',
      'data.batch_size': '16',
      'model.output_stride': '8',  # a placeholder(int)
      'data.test_image_sizes': '(40, 48)',
      'data.crop_area_range': '[0.25, 1.0]',
    },
  )
  assert config.data.test_image_sizes == (40, 48)
  assert config.data.crop_area_range == (0.25, 1.0)
  assert config.train.num_epochs == 2.0 and config.data.data_dir == '/d'
  assert config.model.output_stride == 8
  assert config.checkpoint.async_save is False
  assert config.data.batch_size == 16
  with pytest.raises(
    ValueError, match='no field train.epochs; did you mean train.num_epochs?'
  ):
    grid.apply_overrides(config, {'train.epochs': '1'})
  with pytest.raises(ValueError, match=r'no field nothing_like_it\.$'):
    grid.apply_overrides(config, {'nothing_like_it': '1'})
  with pytest.raises(ValueError, match='data.batch_size=many: expected a int'):
    grid.apply_overrides(config, {'data.batch_size': 'many'})
  with pytest.raises(
    ValueError, match=r'sizes=40: expected a tuple, e.g. \(40,\)'
  ):
    grid.apply_overrides(config, {'data.test_image_sizes': '40'})


def _tiny(data_dir, **extra):
  overrides = {
    'data.data_dir': data_dir,
    'data.batch_size': '8',
    'data.eval_batch_size': '8',
    'data.shuffle_buffer': '64',
    'train.num_epochs': '0.4',  # 2 steps of 8 out of 40 images
    'train.log_every_steps': '1',
    'train.compilation_cache_dir': '',
    'checkpoint.every_steps': '1',
    'checkpoint.async_save': 'False',
  }
  overrides.update(extra)
  return overrides


def _mtimes(root, names):
  return {
    n: os.path.getmtime(os.path.join(root, n, 'results.json')) for n in names
  }


@pytest.mark.slow
def test_seeded_sweep_interrupted_and_rerun_redoes_nothing_finished(
  data_dirs, tmp_path
):
  _, data_dir = data_dirs
  root = str(tmp_path / 'sweep')
  points = ablation.get_sweep('grid,width=0.35,res=32,seeds=3')
  names = [grid.point_name(p) for p in points]
  calls, resumed = [], []

  def train(config, workdir):  # the real loop, its calls recorded
    name = os.path.basename(workdir)
    calls.append(name)
    resumed.append(os.path.isdir(os.path.join(workdir, 'checkpoints', '1')))
    if name == names[1] and interrupt:
      # Killed part-way: one step saved, then Ctrl-C.
      config = config.copy_and_resolve_references()
      config.train.stop_after_step = 1
      train_lib.train_and_evaluate(config, workdir)
      raise KeyboardInterrupt
    return train_lib.train_and_evaluate(config, workdir)

  # 1. Seed 0 finishes; seed 1 is interrupted after a step; seed 2 waits.
  interrupt = True
  with pytest.raises(KeyboardInterrupt):
    driver.run(ablation, points, root, _tiny(data_dir), train_fn=train, pack=1)
  assert calls == names[:2]
  statuses = [
    grid.point_status(p)['status'] for p in grid.make_points(points, root)
  ]
  assert statuses == ['finished', 'interrupted', 'pending']
  finished = _mtimes(root, names[:1])

  # 2. Rerun, with seed 2's disk broken (a file where its checkpoints go):
  # seed 0 is not touched, seed 1 resumes from its step, seed 2 fails alone.
  interrupt = False
  calls.clear(), resumed.clear()
  os.makedirs(os.path.join(root, names[2]))
  with open(os.path.join(root, names[2], 'checkpoints'), 'w') as f:
    f.write('not a directory')
  rows = driver.run(
    ablation, points, root, _tiny(data_dir), train_fn=train, pack=1
  )
  assert calls == names[1:] and resumed == [True, False]
  assert [r['status'] for r in rows] == ['finished', 'finished', 'failed']
  assert rows[2]['error'] and os.path.exists(
    os.path.join(root, names[2], 'error.txt')
  )
  assert _mtimes(root, names[:1]) == finished
  results = json.loads(
    open(os.path.join(root, names[1], 'results.json')).read()
  )
  assert results['completed_steps'] == 2 and results['finished']

  # 3. Disk repaired, rerun: only the failed seed runs.
  calls.clear()
  os.remove(os.path.join(root, names[2], 'checkpoints'))
  finished = _mtimes(root, names[:2])
  rows = driver.run(
    ablation, points, root, _tiny(data_dir), train_fn=train, pack=1
  )
  assert calls == names[2:]
  assert [r['status'] for r in rows] == ['finished'] * 3
  assert _mtimes(root, names[:2]) == finished

  # The summary pools the three seeds of the one point.
  with open(os.path.join(root, 'points.csv')) as f:
    (point,) = list(csv.DictReader(f))
  assert (point['width'], point['res'], point['n']) == ('0.35', '32', '3')
  top1 = [r['top1'] for r in rows]
  assert float(point['top1_mean']) == pytest.approx(sum(top1) / 3)
  assert float(point['top1_ci_low']) <= min(top1) or len(set(top1)) == 1
  with open(os.path.join(root, 'results.csv')) as f:
    table = list(csv.DictReader(f))
  assert [r['seed'] for r in table] == ['0', '1', '2']
  for r in table:
    assert 0.0 <= float(r['top1']) <= 1.0 and int(r['steps']) == 2
    assert int(r['params']) > 0 and float(r['wall_seconds']) > 0
  markdown = open(os.path.join(root, 'results.md')).read()
  assert '| 0.35 | 32 | 3 |' in markdown and '3 finished' in markdown
  with open(os.path.join(root, 'variants.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_hyperparameter_keys_are_axes_whose_runs_share_packs(tmp_path):
  points = ablation.get_sweep('grid,width=0.35,lr=0.05|0.1,wd=0|4e-5,seeds=2')
  assert len(points) == 8
  config = ablation.get_config('width=0.35,lr=0.1,wd=0,ls=0.1,ema=0.9,seed=1')
  optim = config.optim
  assert (optim.learning_rate, optim.weight_decay) == (0.1, 0.0)
  assert (optim.label_smoothing, optim.ema_decay, config.seed) == (0.1, 0.9, 1)
  packs = grid.make_packs(grid.make_points(points, str(tmp_path)), 0)
  # Without weight decay apart (no decay step: another optimizer state).
  assert [len(p) for p in packs] == [4, 4]
  for pack in packs:
    assert len({'wd=0' in p.arg for p in pack}) == 1
    assert len({grid.pack_key(p.arg) for p in pack}) == 1
  for bad, match in (('ls=1', '>= 0 and < 1'), ('ema=0', '> 0 and < 1')):
    with pytest.raises(ValueError, match=match):
      ablation.get_sweep(f'grid,{bad}')


@pytest.mark.slow
def test_a_sweep_packs_runs_of_one_program(data_dirs, tmp_path):
  """`--pack=2`: the two learning rates of seed 0 train as one pack, those
  of seed 1 (saved at different steps) one at a time; the files and
  summary are those of runs trained one at a time."""
  _, data_dir = data_dirs
  root = str(tmp_path / 'sweep')
  points = ablation.get_sweep('grid,width=0.35,res=32,lr=0.05|0.1,seeds=2')
  names = [grid.point_name(p) for p in points]
  configs = grid.point_configs(
    ablation, grid.make_points(points, root), _tiny(data_dir)
  )
  assert [len(p) for p in grid.make_packs(list(configs), 2)] == [2, 2]
  # Seed 3 was stopped after its first step by an earlier run.
  config = configs[grid.make_points(points, root)[3]]
  config.train.stop_after_step = 1
  train_lib.train_and_evaluate(config, os.path.join(root, names[3]))

  rows = driver.run(ablation, points, root, _tiny(data_dir), pack=2)
  assert [r['status'] for r in rows] == ['finished'] * 4
  results = [
    json.loads(open(os.path.join(root, n, 'results.json')).read())
    for n in names
  ]
  # Seed 0's two rates: one pack. Seed 1's (at steps 0 and 1): one at a
  # time, the second resumed.
  assert [r.get('pack') for r in results] == [2, 2, None, None]
  assert all(r['completed_steps'] == 2 for r in results)
  for name in names:  # each point records its share of the wall time
    record = json.loads(open(os.path.join(root, name, 'sweep.json')).read())
    assert record['wall_seconds'] > 0 and record['error'] is None
  with open(os.path.join(root, 'points.csv')) as f:
    table = list(csv.DictReader(f))
  assert [(p['lr'], p['n']) for p in table] == [('0.05', '2'), ('0.1', '2')]
  # A rerun finds everything finished.
  rows = driver.run(ablation, points, root, _tiny(data_dir))
  assert [r['status'] for r in rows] == ['finished'] * 4
  assert [len(p) for p in grid.make_packs(list(configs), 0)] == [4]
  with pytest.raises(ValueError, match='--pack=-1'):
    grid.make_packs(list(configs), -1)
  # No packs by default on the CPU (measured slower there).
  assert grid.default_pack() == 1


def test_a_bad_point_stops_the_sweep_before_anything_runs(tmp_path):
  points = ablation.get_sweep('grid,width=0.35,res=32|24')
  with pytest.raises(ValueError, match="sweep point 'width=0.35,res=24'"):
    driver.run(ablation, points, str(tmp_path / 's'), train_fn=None)
  assert not os.path.exists(tmp_path / 's')


# Worker processes compile without XLA's optimisation passes, as this
# suite's own process does (conftest.py).
FAST_COMPILES = dict(JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')


def _parallel_sweep(config_arg, root, overrides, cwd, *flags):
  """`python -m mnv2_flax.sweep --parallel=2` in a subprocess."""
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'mnv2_flax.sweep',
      f'--config={config_arg}',
      f'--root={root}',
      '--parallel=2',
      *flags,
      *(f'--set={k}={v}' for k, v in overrides.items()),
    ],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=dict(os.environ, **FAST_COMPILES),
    timeout=600,
    check=False,
  )


@pytest.mark.slow
def test_parallel_runs_a_user_grid_in_two_pinned_processes(data_dirs, tmp_path):
  """Two points of 2 seeds, `--pack=2`: each worker trains one point's
  seeds as a pack, on its own core."""
  # An empty tfds directory: the dataset is prepared once, before the two
  # workers start (both preparing it at once collide).
  idx_dir, _ = data_dirs
  data_dir = str(tmp_path / 'tfds')
  root = tmp_path / 'sweep'
  sweep_arg = 'grid,width=0.35|0.5,res=32,seeds=2'
  overrides = _tiny(data_dir, **{'data.manual_dir': idx_dir})
  result = _parallel_sweep(
    f'{ROOT}/configs/ablation.py:{sweep_arg}',
    root,
    overrides,
    tmp_path,
    '--pack=2',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  # Both packs ran at once (the costlier first), each pinned to its own
  # core, each logged in its first seed's workdir.
  assert (
    'running width=0.5,res=32,seed=0, width=0.5,res=32,seed=1, '
    'width=0.35,res=32,seed=0, width=0.35,res=32,seed=1'
  ) in result.stderr
  assert 'Sweep: 4 of 4 runs ended (0 failed)' in result.stderr
  cores = []
  for width in ('0.35', '0.5'):
    first, second = (
      root / grid.point_name(f'width={width},res=32,seed={s}') for s in (0, 1)
    )
    log = (first / 'log.txt').read_text()
    cores.append(re.search(r'CPU cores: ([\d,]+);', log).group(1))
    assert 'seed 1: eval step 2' in log
    assert 'Trained in a pack of 2 seeds' in (second / 'log.txt').read_text()
    for workdir in (first, second):
      assert json.loads((workdir / 'results.json').read_text())['pack'] == 2
  assert len(set(cores)) == 2
  assert '| 0.35 | 32 | 2 |' in result.stdout  # the pooled points
  assert '| 0.5 | 32 | 2 |' in result.stdout
  with open(root / 'results.csv') as f:
    assert [r['status'] for r in csv.DictReader(f)] == ['finished'] * 4


_CRASHING_CONFIG = """
import os, signal, sys
sys.path.insert(0, {root!r})
from configs import ablation

CRASH = 'width=0.35,res=32,seed=crash'


def get_sweep(arg):
  return ablation.get_sweep('grid,width=0.35,res=32,seeds=3') + [CRASH]


def get_config(arg):
  if arg != CRASH:
    return ablation.get_config(arg)
  if '--worker' in sys.argv:  # the process that trains it dies at once
    os.kill(os.getpid(), signal.SIGKILL)
  return ablation.get_config('width=0.35,res=32,seed=9')
"""


@pytest.mark.skipif(
  len(os.sched_getaffinity(0)) < 2, reason='needs 2 cores for 2 workers'
)
@pytest.mark.slow
def test_workers_train_many_points_and_a_crash_is_recorded_alone(
  data_dirs, tmp_path
):
  _, data_dir = data_dirs
  config = tmp_path / 'crashing.py'
  config.write_text(_CRASHING_CONFIG.format(root=ROOT))
  root = tmp_path / 'sweep'

  def sweep_once():  # one seed at a time: the crash is its point's alone
    return _parallel_sweep(config, root, _tiny(data_dir), tmp_path, '--pack=1')

  result = sweep_once()
  # A failed point: the last line counts it, the status says so.
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
    'error: 3 of 4 runs finished, 1 failed; the same command retries'
  ), result.stderr[-3000:]
  assert 'Sweep: 4 of 4 runs ended (1 failed)' in result.stderr
  with open(root / 'results.csv') as f:
    status = {r['seed']: r['status'] for r in csv.DictReader(f)}
  assert status == dict.fromkeys('012', 'finished') | {'crash': 'failed'}
  crash = grid.point_name('width=0.35,res=32,seed=crash')
  record = json.loads((root / crash / 'sweep.json').read_text())
  assert record['error'].startswith('worker exited with status -9')
  # Two workers (plus the one that replaced the crashed one, if any points
  # were left) trained the 3 points: one of them trained two in turn.
  names = [grid.point_name(f'width=0.35,res=32,seed={i}') for i in '012']
  logs = [(root / name / 'log.txt').read_text() for name in names]
  pids = [re.search(r'worker process (\d+)\.', log).group(1) for log in logs]
  assert len(set(pids)) < 3, pids
  # Every finished point's cost is split: training, evaluation, the rest.
  result = json.loads((root / names[0] / 'results.json').read_text())
  assert result['eval_seconds'] > 0 and result['fixed_seconds'] > 0
  # A rerun retries the failed point alone (and it fails again, alone).
  again = sweep_once()
  assert 'Sweep: 4 runs, 4 in this shard, 1 to run' in again.stderr


@pytest.mark.slow
def test_submitit_local_array_runs_and_a_rerun_submits_nothing_finished(
  data_dirs, tmp_path, monkeypatch
):
  _, data_dir = data_dirs
  for key, value in FAST_COMPILES.items():
    monkeypatch.setenv(key, value)
  root = str(tmp_path / 'sweep')
  points = ablation.get_sweep('grid,width=0.35,res=32,seeds=2')
  args = (ablation, points, root, _tiny(data_dir), 'local')
  rows = slurm.submit(*args, dict(timeout_min=10), poll_seconds=1)
  assert [r['status'] for r in rows] == ['finished'] * 2
  jobs = os.listdir(os.path.join(root, 'submitit'))
  registry = json.loads(
    open(os.path.join(root, 'submitit', 'jobs.json')).read()
  )
  assert sorted(registry) == sorted(points)
  # One task for the point's two seeds (one process), with its log and result.
  assert len(set(registry.values())) == 1
  for job_id in set(registry.values()):
    for name in ('0_log.out', '0_result.pkl'):
      assert os.path.exists(
        os.path.join(root, 'submitit', job_id, f'{job_id}_{name}')
      )
  with open(os.path.join(root, 'points.csv')) as f:
    assert next(csv.DictReader(f))['n'] == '2'
  # Rerun: nothing is left to submit.
  rows = slurm.submit(*args, dict(timeout_min=10), poll_seconds=1)
  assert [r['status'] for r in rows] == ['finished'] * 2
  assert sorted(os.listdir(os.path.join(root, 'submitit'))) == sorted(jobs)
  # A rerun leaves a job that is still alive alone: it is waited for.
  assert slurm._job_alive(None, root, 'local', str(os.getpid()))
  assert not slurm._job_alive(None, root, 'local', registry[points[0]])
  # Unknown submitit parameters: one clear error, nothing submitted.
  with pytest.raises(ValueError, match='--submit_params'):
    slurm.submit(
      ablation,
      ablation.get_sweep('grid,width=0.35,res=40'),
      root,
      _tiny(data_dir),
      'local',
      dict(no_such_parameter=1),
    )


def test_config_loads_from_outside_the_repository_root(tmp_path):
  """configs/ablation.py imports configs.default: no PYTHONPATH needed."""
  path = os.path.join(ROOT, 'configs', 'ablation.py')
  code = (
    'from mnv2_flax.sweep import grid; '
    f'm = grid.load_config_module({path!r}); '
    'print(len(m.get_sweep(None)))'
  )
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=env,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-1] == '20'


def test_the_equal_cost_sweep_pairs_widths_with_resolutions_at_matched_macs():
  points = ablation.get_sweep('equal_cost')
  assert len(points) == 25 and points[0] == 'width=0.35,res=64,seed=0'
  with pytest.raises(ValueError, match='chooses its own width and res'):
    ablation.get_sweep('equal_cost,res=32')
  macs = {}
  for arg in points[:5]:
    config = ablation.get_config(arg)
    model = models.MobileNetV2(num_classes=10, **config.model)
    macs[arg.rsplit(',', 1)[0]] = stats.count(
      model, config.data.image_size
    ).macs
  # The two cost levels' points are within verdicts.MAC_RATIO of each other.
  for level in (
    ('width=0.35,res=64', 'width=0.5,res=40', 'width=0.75,res=32'),
    ('width=0.5,res=56', 'width=1.0,res=32'),
  ):
    costs = [macs[p] for p in level]
    assert max(costs) <= verdicts.MAC_RATIO * min(costs), costs


def test_every_point_must_read_the_one_resized_copy():
  # A copy for the sweep's points: one it does not cover is refused before
  # anything runs, naming the point (no point falls back to the original).
  points = grid.make_points(ablation.get_sweep('imagenet'), '/r')
  overrides = {'data.resized_short_side': '256', 'data.data_dir': '/d'}
  configs = grid.point_configs(ablation, points, overrides)
  assert {c.data.resized_short_side for c in configs.values()} == {256}
  overrides['data.resized_short_side'] = '183'
  with pytest.raises(ValueError, match=r"res=192'.*at least 220"):
    grid.point_configs(ablation, points, overrides)
