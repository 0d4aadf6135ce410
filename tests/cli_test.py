"""Bad input at the command line: one `error:` line, exit status 1, no
traceback, and nothing in an existing workdir changed.

Each case runs the real program in a subprocess. Mistakes found while
parsing flags cost a fraction of a second; the rest import TensorFlow and
JAX first (a few seconds each).
"""

import os
import shlex

from fake_data import run_python
from fake_data import snapshot
import pytest

from mnv2_flax.data import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')
ABLATION = os.path.join(ROOT, 'configs', 'ablation.py')


@pytest.fixture
def files(tmp_path):
  """A workdir with a file in it, config files with mistakes, an empty
  data_dir, a workdir whose latest step directory is empty."""
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  (tmp_path / 'syntax.py').write_text('def get_config(:\n  pass\n')
  (tmp_path / 'no_get_config.py').write_text('x = 1\n')
  (tmp_path / 'a_file').write_text('not a directory')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'incomplete' / 'checkpoints' / '3').mkdir(parents=True)
  (tmp_path / 'bad_idx').mkdir()
  for name in fashion_mnist.FILES.values():
    (tmp_path / 'bad_idx' / name).write_bytes(b'not gzip')
  return tmp_path


def _train(*args):
  return [
    'train.py',
    f'--config={QUICKSTART}',
    '--workdir={tmp}/workdir',
    *args,
  ]


CASES = [
  # train.py, found while parsing the flags.
  (
    _train('--config.train.no_such_field=1'),
    '--config.train.no_such_field: the config has no field train.no_such_field',
  ),
  (
    _train('--config.trian.num_epochs=1'),
    'no field trian; did you mean train?',
  ),
  (
    ['train.py', '--config=configs/nope.py', '--workdir={tmp}/workdir'],
    '--config=configs/nope.py: no such config file.',
  ),
  (
    ['train.py', '--config={tmp}/syntax.py', '--workdir={tmp}/workdir'],
    'syntax.py line 1: invalid syntax',
  ),
  (
    ['train.py', '--config={tmp}/no_get_config.py', '--workdir={tmp}/w'],
    '--config: the file defines no get_config().',
  ),
  (
    _train('--config.data.image_size=abc'),
    '--config.data.image_size=abc: invalid literal for int() with base 10',
  ),
  (
    ['train.py', f'--config={ABLATION}:width=0.5,colour=red', '--workdir=w'],
    "ValueError: ablation argument 'colour=red': expected key=value",
  ),
  (_train('--no_such_flag'), "Unknown command line flag 'no_such_flag'"),
  (['train.py', f'--config={QUICKSTART}'], 'Flag --workdir must have a value'),
  (_train('extra'), "unexpected arguments ['extra']"),
  # train.py: the config checked before TensorFlow and JAX load.
  (
    _train('--config.data.image_size=100000'),
    'config.data.image_size=100000 is not valid; expected an integer in '
    '[32, 4096]',
  ),
  (
    _train('--config.optim.optimizer=adam'),
    "config.optim.optimizer='adam' is not valid; expected rmsprop_tf or sgd",
  ),
  (_train('--config.data.batch_size=0'), 'config.data.batch_size=0'),
  (
    _train('--config.init_from={tmp}/no_run'),
    "no_run' does not exist; expected a workdir or step directory of this",
  ),
  # train.py: the workdir and the data, before anything is written.
  (
    ['train.py', f'--config={QUICKSTART}', '--workdir={tmp}/a_file'],
    "a_file' is a file; expected a directory.",
  ),
  # A placeholder field set from the command line reaches the pipeline.
  (
    _train('--config.data.name=cifar10', '--config.data.data_dir={tmp}/empty'),
    'cifar10 is not prepared in {tmp}/empty.',
  ),
  # Data files.
  (
    _train(
      '--config.data.data_dir={tmp}/empty',
      '--config.data.manual_dir={tmp}/bad_idx',
    ),
    'train-images-idx3-ubyte.gz is not a complete gzip file',
  ),
  # An accelerator required, JAX on the CPU: stop before anything runs.
  (
    _train('--config.train.require_accelerator=True'),
    'config.train.require_accelerator=True, but JAX found only CPU devices',
  ),
  (
    ['-m', 'mnv2_flax.sweep', f'--config={ABLATION}', '--root={tmp}/s']
    + ['--set=train.require_accelerator=True'],
    'make setup-gpu',
  ),
  # evaluate.
  (
    ['-m', 'mnv2_flax.evaluate', '--workdir={tmp}/incomplete'],
    'checkpoints/3 is incomplete (no _CHECKPOINT_METADATA',
  ),
  # sweep.
  (
    ['-m', 'mnv2_flax.sweep', f'--config={ABLATION}', '--root={tmp}/s']
    + ['--set=train.no_such=1', '--dry_run'],
    'the config has no field train.no_such; did you mean',
  ),
  (
    ['-m', 'mnv2_flax.sweep', f'--config={ABLATION}:grid,width=0.35|wide']
    + ['--root={tmp}/s'],
    "ablation argument width='wide' is not a number > 0.",
  ),
  (
    ['-m', 'mnv2_flax.sweep', f'--config={ABLATION}', '--root={tmp}/s']
    + ['--parallel=4096'],
    '--parallel=4096: this process may use',
  ),
  # stats and benchmark.
  (
    ['-m', 'mnv2_flax.stats', '--width_multiplier=0'],
    'width_multiplier=0.0 is not valid; expected a number > 0',
  ),
  (
    ['-m', 'mnv2_flax.stats', '--resolution=8'],
    'image resolution 8x8 is too small',
  ),
  (
    ['-m', 'mnv2_flax.benchmark', '--batch_size=0', '--resolution=32'],
    'batch_size=0',
  ),
  (
    ['-m', 'mnv2_flax.benchmark', '--aot_topology=v99:9x9'],
    "--aot_topology='v99:9x9': no TPU compiler for it",
  ),
]


@pytest.mark.parametrize(
  'args, words', CASES, ids=[' '.join(c[0][:3])[-60:] for c in CASES]
)
@pytest.mark.slow
def test_one_line_exit_1_nothing_changed(files, args, words):
  before = snapshot(files)
  args = [a.replace('{tmp}', str(files)) for a in args]
  result = run_python(args)
  words = words.replace('{tmp}', str(files))
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [
    line for line in result.stderr.splitlines() if line.startswith('error: ')
  ]
  assert len(errors) == 1, result.stderr[-3000:]
  assert words in errors[0], errors[0]
  assert snapshot(files) == before


@pytest.mark.slow
def test_stats_counts_any_resolution_without_allocating_it():
  # 100000 px: a real input array would be 120 GB.
  result = run_python(
    ['-m', 'mnv2_flax.stats', '--resolution=100000', '--json']
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"macs": 59688751280000' in result.stdout


@pytest.mark.slow
def test_a_dry_run_command_with_a_placeholder_field_runs(files):
  """The sweep prints train.py commands; one with --set data.data_dir runs
  (and reaches the data: cifar10 is not prepared in that empty data_dir)."""
  data_dir = files / 'empty dir'  # a space: the command must quote it
  data_dir.mkdir()
  result = run_python(
    [
      '-m',
      'mnv2_flax.sweep',
      f'--config={ABLATION}',
      f'--root={files}/sweep',
      f'--set=data.data_dir={data_dir}',
      '--set=data.name=cifar10',
      '--dry_run',
    ],
  )
  assert result.returncode == 0, result.stderr[-2000:]
  command = result.stdout.splitlines()[0]
  assert command.startswith('python train.py ')
  argv = shlex.split(command)[1:]
  ran = run_python(argv)
  assert ran.returncode == 1
  assert f'error: cifar10 is not prepared in {data_dir}.' in ran.stderr
