"""Tests of the ablation configs and the sweep launcher."""

import csv
import json
import os
import subprocess
import sys

import pytest

from configs import ablation
from mnv2_flax import sweep
from mnv2_flax import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grids():
  imagenet = ablation.get_sweep('imagenet')
  assert len(imagenet) == 21 and len(set(imagenet)) == 21
  assert imagenet[-1] == 'data=imagenet,width=1.4,res=224'
  assert 'data=imagenet,width=0.35,res=96' in imagenet
  fmnist = ablation.get_sweep(None)
  assert fmnist == ablation.get_sweep('fashion_mnist') and len(fmnist) == 6
  assert ablation.get_sweep('bottleneck') == [
    'bottleneck=linear',
    'bottleneck=relu6',
  ]
  assert ablation.get_sweep('shortcut,data=imagenet,epochs=2') == [
    f'data=imagenet,shortcut={s},epochs=2'
    for s in ('bottleneck', 'expansion', 'none')
  ]
  with pytest.raises(ValueError, match="sweep 'fig5' is not known"):
    ablation.get_sweep('fig5')


def test_point_configs():
  config = ablation.get_config('width=0.5,res=24,bottleneck=relu6,expand=4')
  assert config.model.width_multiplier == 0.5
  assert config.data.image_size == 24
  assert config.model.bottleneck_activation == 'relu6'
  assert config.model.expand_ratio == 4.0
  assert config.data.name == 'fashion_mnist'
  assert config.train.num_epochs == 1.0
  config = ablation.get_config('data=imagenet,width=1.4,res=224')
  assert config.data.name.startswith('imagenet2012')
  assert (config.model.width_multiplier, config.data.image_size) == (1.4, 224)
  for arg, words in [
    ('depth=3', "'depth=3'"),
    ('width', "'width'"),
    ('res=big', "res='big' is not a int"),
    ('data=cifar', "data='cifar'"),
  ]:
    with pytest.raises(ValueError, match=words):
      ablation.get_config(arg)


def test_point_names_are_distinct_and_shell_safe():
  args = sum((ablation.get_sweep(name) for name in ablation.SWEEPS), start=[])
  names = [sweep.point_name(a) for a in args]
  assert sweep.point_name('width=0.5,res=24') == 'width-0.5_res-24'
  assert len(set(names)) == len(set(args))
  assert all(
    n.replace('-', '').replace('_', '').replace('.', '').isalnum()
    for n in names
  )
  with pytest.raises(ValueError, match='no valid directory name'):
    sweep.point_name('width=0.5,res=../x')


@pytest.mark.parametrize('count', [1, 2, 3, 4, 7])
def test_shards_split_disjointly_and_completely(count):
  args = ablation.get_sweep('imagenet')
  shards = [
    sweep.dry_run_commands('configs/ablation.py', args, '/r', shard=(i, count))
    for i in range(count)
  ]
  flat = sum(shards, start=[])
  assert sorted(flat) == sorted(
    sweep.dry_run_commands('configs/ablation.py', args, '/r')
  )
  assert len(flat) == len(set(flat)) == 21
  assert flat[0] == (
    'python train.py --config=configs/ablation.py:'
    'data=imagenet,width=0.35,res=96 '
    '--workdir=/r/data-imagenet_width-0.35_res-96'
  )
  with pytest.raises(ValueError, match='--shard'):
    sweep.parse_shard(f'{count}/{count}')


def test_overrides_are_typed_and_checked():
  config = ablation.get_config(None)
  sweep.apply_overrides(
    config,
    {
      'train.num_epochs': '2',
      'data.data_dir': '/d',
      'checkpoint.async_save': 'False',
      'data.batch_size': '16',
      'model.output_stride': '8',  # a placeholder(int)
    },
  )
  assert config.train.num_epochs == 2.0 and config.data.data_dir == '/d'
  assert config.model.output_stride == 8
  assert config.checkpoint.async_save is False
  assert config.data.batch_size == 16
  with pytest.raises(ValueError, match='no field train.epochs'):
    sweep.apply_overrides(config, {'train.epochs': '1'})
  with pytest.raises(ValueError, match='data.batch_size=many: expected a int'):
    sweep.apply_overrides(config, {'data.batch_size': 'many'})


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


def test_sweep_runs_resumes_skips_and_isolates_a_failure(data_dirs, tmp_path):
  _, data_dir = data_dirs
  root = str(tmp_path / 'sweep')
  points = ['width=0.35,res=32', 'width=0.35,res=40', 'width=-1,res=32']
  calls = []

  def train(config, workdir):  # the real loop, with its calls recorded
    calls.append(os.path.basename(workdir))
    return train_lib.train_and_evaluate(config, workdir)

  # 1. Every point stops after its first step (as if the job were killed).
  rows = sweep.run(
    ablation,
    points,
    root,
    _tiny(data_dir, **{'train.stop_after_step': '1'}),
    train_fn=train,
  )
  assert [r['status'] for r in rows] == ['interrupted', 'interrupted', 'failed']
  assert 'width_multiplier' in rows[2]['error']
  assert os.path.exists(os.path.join(root, 'width--1_res-32', 'error.txt'))

  # 2. Again: the two good points resume from step 1 and finish.
  calls.clear()
  rows = sweep.run(ablation, points, root, _tiny(data_dir), train_fn=train)
  assert calls == ['width-0.35_res-32', 'width-0.35_res-40', 'width--1_res-32']
  assert [r['status'] for r in rows] == ['finished', 'finished', 'failed']
  results = json.loads(
    open(os.path.join(root, 'width-0.35_res-32', 'results.json')).read()
  )
  assert results['completed_steps'] == 2 and results['finished']
  mtimes = {
    p: os.path.getmtime(os.path.join(root, p, 'results.json'))
    for p in ('width-0.35_res-32', 'width-0.35_res-40')
  }

  # 3. Again: finished points are skipped; the failed one is retried.
  calls.clear()
  rows = sweep.run(ablation, points, root, _tiny(data_dir), train_fn=train)
  assert calls == ['width--1_res-32']
  for p, mtime in mtimes.items():
    assert os.path.getmtime(os.path.join(root, p, 'results.json')) == mtime

  # The summary: one row per point, with its numbers; a valid PNG.
  with open(os.path.join(root, 'results.csv')) as f:
    table = list(csv.DictReader(f))
  assert [(r['width'], r['res'], r['status']) for r in table] == [
    ('0.35', '32', 'finished'),
    ('0.35', '40', 'finished'),
    ('-1', '32', 'failed'),
  ]
  for r in table[:2]:
    assert 0.0 <= float(r['top1']) <= 1.0 and float(r['ema_top5']) >= 0
    assert int(r['params']) > 0 and int(r['steps']) == 2
    assert float(r['wall_seconds']) > 0
  assert float(table[1]['macs']) > float(table[0]['macs'])
  markdown = open(os.path.join(root, 'results.md')).read()
  assert markdown.count('\n') == 5 and '| failed |' in markdown
  with open(os.path.join(root, 'accuracy_vs_macs.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_config_loads_from_outside_the_repository_root(tmp_path):
  """configs/ablation.py imports configs.default: no PYTHONPATH needed."""
  path = os.path.join(ROOT, 'configs', 'ablation.py')
  code = (
    'from mnv2_flax import sweep; '
    f'm = sweep.load_config_module({path!r}); '
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
  assert result.stdout.split()[-1] == '6'
