"""One writer per workdir, one preparer per dataset: real processes holding
real `flock`s."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

from fake_data import run_python
from fake_data import snapshot
from fake_data import tiny_config
import pytest

from mnv2_flax.runtime import workdir_lock
from mnv2_flax.sweep import driver
from mnv2_flax.sweep import grid
from mnv2_flax.train import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys, time
from mnv2_flax.runtime import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('held', flush=True)
  time.sleep(600)
"""


@pytest.fixture
def held(tmp_path):
  """A workdir whose lock another process holds; (workdir, that process)."""
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  process = subprocess.Popen(
    [sys.executable, '-c', HOLD, str(workdir)],
    stdout=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  assert process.stdout.readline() == 'held\n'
  yield str(workdir), process
  process.kill()
  process.wait()


def test_a_second_writer_is_refused_naming_the_holder(held, data_dirs):
  workdir, holder = held
  before = snapshot(workdir)
  with pytest.raises(workdir_lock.DirectoryInUseError) as error:
    train_lib.train_and_evaluate(tiny_config(data_dirs[1]), workdir)
  message = str(error.value)
  assert f'workdir {workdir} is in use by process {holder.pid} on host ' in (
    message
  )
  assert socket.gethostname() in message and '-c' in message
  assert snapshot(workdir) == before


def test_train_py_refuses_in_one_line(held, data_dirs, tmp_path):
  workdir, holder = held
  config = tmp_path / 'config.py'
  config.write_text(
    f'import sys\nsys.path.insert(0, {os.path.join(ROOT, "tests")!r})\n'
    'from fake_data import tiny_config\n'
    f'def get_config():\n  return tiny_config({data_dirs[1]!r})\n'
  )
  before = snapshot(workdir)
  result = _train_py(f'--config={config}', f'--workdir={workdir}')
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith(
    f'error: workdir {workdir} is in use by process {holder.pid} '
  ), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert snapshot(workdir) == before
  # Refused before JAX started (its first log line names the devices).
  assert 'device(s) in all' not in result.stderr


def _train_py(*args):
  return run_python(['train.py', *args], timeout=None)


@pytest.mark.parametrize(
  'field,value,before_jax',
  [
    ('model.width_multiplier', '0', True),
    ('data.name', 'fashion_mnits', False),
  ],
)
@pytest.mark.slow
def test_a_refused_run_leaves_no_workdir(field, value, before_jax, tmp_path):
  workdir = tmp_path / 'new' / 'run'
  result = _train_py(
    '--config=configs/quickstart.py',
    f'--workdir={workdir}',
    f'--config.{field}={value}',
  )
  assert result.returncode == 1
  assert (
    result.stderr.strip().splitlines()[-1].startswith(f'error: config.{field}=')
  ), result.stderr[-2000:]
  assert not (tmp_path / 'new').exists()
  assert ('device(s) in all' not in result.stderr) == before_jax


def test_a_sweep_point_in_use_is_left_alone(held):
  workdir, holder = held
  point = grid.Point('width=0.35', workdir)
  before = snapshot(workdir)

  def train(config, workdir):
    raise AssertionError('trained a point another process holds')

  assert grid.run_point(point, tiny_config(), train) is None
  assert snapshot(workdir) == before  # no sweep.json, no error.txt
  # Its status and the sweep's last line name who trains it; the sweep
  # that left it alone did not fail (two sweeps on one root share it).
  status = grid.point_status(point)
  assert status['status'] == grid.RUNNING_ELSEWHERE
  assert (
    f'process {holder.pid} on host {socket.gethostname()}'
    in (status['held_by'])
  )
  tally = driver.tally([status, {'status': 'finished'}])
  assert tally.startswith('1 of 2 runs finished, 1 being trained by another')
  assert str(holder.pid) in tally
  holder.kill()
  holder.wait()
  assert grid.point_status(point)['status'] == 'pending'


def test_a_lock_left_by_a_killed_process_is_taken_over(held, absl_log):
  workdir, holder = held
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert workdir_lock.holder(workdir)['pid'] == holder.pid  # left behind
  with workdir_lock.hold(workdir):
    assert workdir_lock.holder(workdir)['pid'] == os.getpid()
    with workdir_lock.hold(workdir):  # re-entrant in one process
      pass
  assert f'left by process {holder.pid} on host' in absl_log.text
  assert 'which no longer runs' in absl_log.text
  assert workdir_lock.holder(workdir) == {}  # released: nobody named


def test_without_working_locks_a_live_holder_here_still_refuses(
  held, monkeypatch
):
  """Where `flock` fails (ENOLCK: some network and FUSE filesystems) the
  holder named in the file is checked. No such filesystem here: `flock` is
  made to fail as it does there."""
  workdir, holder = held

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_locks)
  with pytest.raises(workdir_lock.DirectoryInUseError, match=str(holder.pid)):
    with workdir_lock.hold(workdir):
      pass
  holder.kill()
  holder.wait()
  with workdir_lock.hold(workdir):  # a holder that is gone: taken over
    assert workdir_lock.holder(workdir)['pid'] == os.getpid()


PREPARE = """
import sys
from absl import logging
from mnv2_flax import defaults
from mnv2_flax.data import prepare
logging.set_verbosity(logging.INFO)
config = defaults.get_config()
config.data.update(
  name='sklearn_digits', data_dir=sys.argv[1], eval_split='test'
)
print(prepare.dataset_meta(prepare.get_builder(config), config))
"""


@pytest.mark.slow
def test_two_processes_prepare_one_dataset_once(tmp_path):
  """Both start on an empty data_dir while this process holds its dataset
  lock: both wait; once it is released one prepares and the other reads
  what it prepared (at once, tfds' renames collide)."""
  data_dir = str(tmp_path / 'tfds')
  os.makedirs(data_dir)
  logs = [tmp_path / f'prepare{i}.txt' for i in range(2)]
  lock = dict(what='dataset directory', wait=True, file='.sklearn_digits.lock')
  with workdir_lock.hold(data_dir, **lock):
    procs = []
    for log in logs:
      with open(log, 'w') as f:
        procs.append(
          subprocess.Popen(
            [sys.executable, '-c', PREPARE, data_dir],
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS='cpu'),
          )
        )
    deadline = time.monotonic() + 300
    while not all('Waiting for' in log.read_text() for log in logs):
      assert all(p.poll() is None for p in procs), [
        log.read_text()[-3000:] for log in logs
      ]
      assert time.monotonic() < deadline, 'the processes did not wait'
      time.sleep(0.1)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  errs = [log.read_text() for log in logs]
  for p, err in zip(procs, errs, strict=True):
    assert p.returncode == 0, err[-3000:]
  metas = [out.splitlines()[-1] for out in outs]
  assert metas[0] == metas[1] and 'num_train_examples=1297' in metas[0]
  assert sum('Downloading and preparing' in out for out in outs) == 1
