"""Signals with real processes: `train.py` training a pack of two seeds is
killed, then sent SIGTERM, then SIGINT twice; each signal saves the step in
flight and exits with 128 + the signal's number, and the same command
resumes to the bits of a pack that was never stopped. Two processes of one
`jax.distributed` job stop at the same step when only one is signalled
(SIGUSR1); a submitit task saves on SIGUSR2
and is requeued. `tools/signal_drill.py` measures each signal.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from fake_data import tiny_config
import jax
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax.runtime import files
from mnv2_flax.sweep import grid
from mnv2_flax.sweep import slurm
from mnv2_flax.train import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
# 40 images, batch 8: 5 steps an epoch, 60 steps; a save every 10.
EPOCHS, SAVE_EVERY = 12, 10
STEPS = EPOCHS * 5
CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from fake_data import tiny_config

def get_config():
  config = tiny_config({data_dir!r}, num_epochs={epochs})
  config.checkpoint.every_steps = {save_every}
  config.train.log_every_steps = 5
  config.train.compilation_cache_dir = {cache!r}
  return config
"""


def _env():
  # The reference trains in this process, with conftest's settings.
  return dict(
    os.environ, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1'
  )


@pytest.fixture(scope='module')
def command(data_dirs, tmp_path_factory):
  """A `train.py` command line in a fresh workdir (call it for one)."""
  tmp = tmp_path_factory.mktemp('signals')
  config = tmp / 'config.py'
  config.write_text(
    CONFIG.format(
      tests=TESTS,
      data_dir=data_dirs[1],
      epochs=EPOCHS,
      save_every=SAVE_EVERY,
      # The reference's (conftest's): these runs load its programs.
      cache=jax.config.jax_compilation_cache_dir,
    )
  )
  count = iter(range(100))

  def new():
    workdir = tmp / f'run{next(count)}'
    return [
      sys.executable,
      os.path.join(ROOT, 'train.py'),
      f'--config={config}',
      f'--workdir={workdir}',
    ], str(workdir)

  return new


def _state(workdir):
  _, variables = checkpointing.restore(workdir)
  return jax.tree_util.tree_flatten_with_path(variables)[0]


def _max_difference(a, b):
  assert [k for k, _ in a] == [k for k, _ in b]
  return max(
    float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
    for (_, x), (_, y) in zip(a, b, strict=True)
  )


def _start(argv, log):
  """`argv` in a process writing its output to the file `log` (a pipe
  nobody reads while it trains would fill and block it)."""
  with open(log, 'w') as f:
    return subprocess.Popen(
      argv, env=_env(), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
    )


def _read(path):
  with open(path) as f:
    return f.read()


def _wait_for_step(workdir, step, process, log, timeout=300):
  """Waits until the checkpoint of `step` is on disk (training is on)."""
  path = os.path.join(workdir, 'checkpoints', str(step))
  deadline = time.monotonic() + timeout
  while not os.path.isdir(path):
    assert process.poll() is None, _read(log)[-3000:]
    assert time.monotonic() < deadline, 'no checkpoint in time'
    time.sleep(0.02)


def _stop(argv, workdir, *signums, after=SAVE_EVERY):
  """Starts `argv`, sends `signums` once step `after` is saved; returns
  (exit status, its output, seconds from the first signal to the exit)."""
  log = workdir + '.log'
  process = _start(argv, log)
  _wait_for_step(workdir, after, process, log)
  for signum in signums:
    process.send_signal(signum)
  sent = time.monotonic()
  process.wait(timeout=300)
  return process.returncode, _read(log), time.monotonic() - sent


def _last_line(err):
  return [line for line in err.splitlines() if line.strip()][-1]


# What TensorFlow's import logs before absl is initialised, on CPUs with
# AVX512/VNNI (oneDNN is on; the binary could use more instructions).
TF_IMPORT_NOTICES = {'port.cc', 'cpu_feature_guard.cc'}
# Orbax modules that logged INFO lines on every save and restore.
ORBAX_FILES = {
  'checkpoint_manager.py',
  'async_checkpointer.py',
  'atomicity.py',
  'composite_checkpoint_handler.py',
  'base_pytree_checkpoint_handler.py',
  'checkpoint.py',
}


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(data_dir, workdir, port, logs):
  """tests/multiprocess_worker.py as 2 processes of 1 CPU device each."""
  env = dict(
    _env(),
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    MNV2_TEST_EPOCHS='20',  # 40 images, batch 16: 40 steps
    MNV2_TEST_SAVE_EVERY='10',
    MNV2_TEST_CACHE=jax.config.jax_compilation_cache_dir,
  )
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w') as f:
      procs.append(
        subprocess.Popen(
          [sys.executable, os.path.join(TESTS, 'multiprocess_worker.py')]
          + [data_dir, workdir, str(i), '2', str(port)],
          env=env,
          stdout=f,
          stderr=subprocess.STDOUT,
        )
      )
  return procs


@pytest.mark.slow
def test_two_processes_stop_at_one_step_when_only_one_is_signalled(
  data_dirs, tmp_path
):
  """SIGUSR1 to process 1 of a 2-process `jax.distributed` job: both save
  the same step (JAX's preemption sync point) and exit; both resume."""
  workdir = str(tmp_path / 'two')
  logs = [str(tmp_path / f'process{i}.log') for i in range(2)]
  procs = _two_processes(data_dirs[1], workdir, _free_port(), logs)
  _wait_for_step(workdir, 10, procs[1], logs[1])
  procs[1].send_signal(signal.SIGUSR1)
  for p in procs:
    p.wait(timeout=300)
  outs = [_read(log) for log in logs]
  # Process 1 was signalled; process 0 stopped for it (a SIGTERM notice).
  assert [p.returncode for p in procs] == [143, 138], outs[0][-2000:]
  steps = [int(out.split('after step ')[-1].split(',')[0]) for out in outs]
  assert steps[0] == steps[1] > 10, steps
  assert 'Another process was signalled' in outs[0]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(steps[0])))
  procs = _two_processes(data_dirs[1], workdir, _free_port(), logs)
  for p in procs:
    p.wait(timeout=300)
  outs = [_read(log) for log in logs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
  assert f'Resuming from step {steps[0]} of 40' in outs[0]
  assert files.read_json(os.path.join(workdir, 'results.json'))['finished']


@pytest.mark.slow
def test_a_submitit_task_saves_on_sigusr2_is_requeued_and_resumes(
  data_dirs, tmp_path, monkeypatch
):
  """A task of submitit's local executor gets SIGUSR2, as Slurm sends it
  before a time limit: the point saves, submitit requeues the task (its own
  handler, after the save), the requeued task resumes the point from the
  saved step."""
  submitit = pytest.importorskip('submitit')
  from configs import ablation  # pylint: disable=g-import-not-at-top

  for key, value in _env().items():
    monkeypatch.setenv(key, value)
  point = 'width=0.35,res=32,seed=0'
  root = tmp_path / 'sweep'
  overrides = {
    'data.data_dir': data_dirs[1],
    'data.train_split': 'train',  # all 40 images, none held out
    'data.minival_split': '',
    'data.batch_size': '8',
    'data.eval_batch_size': '8',
    'data.shuffle_buffer': '64',
    'train.num_epochs': '8',  # 40 steps of 8 out of 40 images
    'train.log_every_steps': '5',
    'train.compilation_cache_dir': jax.config.jax_compilation_cache_dir,
    'checkpoint.every_steps': '10',
    'checkpoint.async_save': 'False',
  }
  executor = submitit.AutoExecutor(
    folder=str(tmp_path / 'jobs'), cluster='local'
  )
  executor.update_parameters(timeout_min=10)
  job = executor.submit(
    slurm.PointTask(ablation.__file__, str(root), overrides), [point]
  )
  workdir = root / grid.point_name(point)
  deadline = time.monotonic() + 300
  while not (workdir / 'checkpoints' / '10').is_dir():
    assert not job.done(), job.stderr()
    assert time.monotonic() < deadline
    time.sleep(0.02)
  # Slurm signals the task's processes; submitit's local controller (the
  # job's process) starts the task as its child.
  controller = job._process.pid  # pylint: disable=protected-access
  with open(f'/proc/{controller}/task/{controller}/children') as f:
    (task,) = map(int, f.read().split())
  os.kill(task, signal.SIGUSR2)
  assert job.result() == [None]
  log = job.stderr()
  step = int(log.split('Stopped by SIGUSR2 at step ')[1].split(',')[0])
  assert step > 10
  assert 'Requeued job' in log
  assert f'Resuming from step {step} of 40' in log
  assert files.read_json(str(workdir / 'results.json'))['finished']


@pytest.mark.slow
def test_a_pack_killed_then_signalled_resumes_to_the_bits_never_stopped(
  command, data_dirs, tmp_path
):
  """`train.py --config.train.seeds=2`, one scenario in four processes:
  kill -9 once both seeds saved step 20 (seed 1's step 20 then removed, as
  a kill between the two seeds' saves leaves it); the same command resumes
  the pack from step 10 (seed 0's step 20 set aside) and gets SIGTERM; the
  next gets SIGINT twice (Ctrl-C twice); the last trains to the end. Each
  seed ends with the bits of the pack never stopped."""
  configs = []
  for seed in (0, 1):
    config = tiny_config(data_dirs[1], num_epochs=EPOCHS)  # 60 steps
    config.train.log_every_steps = 5
    config.seed = seed
    configs.append(config)
  reference = [str(tmp_path / f'reference/seed-{s}') for s in (0, 1)]
  train_lib.train_seeds(configs, reference)

  argv, workdir = command()
  # Every step kept: what the kill left is there to look at.
  argv = argv + ['--config.train.seeds=2', '--config.checkpoint.keep=100']
  seeds = [os.path.join(workdir, f'seed-{s}') for s in (0, 1)]
  log = workdir + '.log'
  process = _start(argv, log)
  _wait_for_step(seeds[1], 20, process, log)
  _wait_for_step(seeds[0], 20, process, log)
  process.kill()
  process.wait(timeout=60)
  for seed in seeds:  # both hold complete steps 10 and 20 (or later)
    assert {10, 20} <= {int(s) for s in os.listdir(f'{seed}/checkpoints')}
  for seed in seeds:  # as if killed between the seeds' saves of step 20
    for step in os.listdir(f'{seed}/checkpoints'):
      if int(step) > 20 or (seed == seeds[1] and int(step) == 20):
        shutil.rmtree(f'{seed}/checkpoints/{step}')

  # SIGTERM: the step in flight is saved, exit 128 + 15.
  code, out, seconds = _stop(argv, seeds[1], signal.SIGTERM, after=30)
  assert code == 143, out[-3000:]
  assert 'the pack resumes from step 10' in out
  assert os.path.isdir(f'{seeds[0]}/checkpoints_ahead/20')
  assert f'Resuming from step 10 of {STEPS}' in out
  assert 'Traceback' not in out
  step = None
  for seed in seeds:
    stopped = files.read_json(os.path.join(seed, 'results.json'))['stopped']
    assert stopped['signal'] == 'SIGTERM'
    assert step in (None, stopped['step'])
    step = stopped['step']
    assert os.path.isdir(os.path.join(seed, 'checkpoints', str(step)))
  assert step > 30, 'stopped at a step it had saved before the signal'
  assert _last_line(out) == (
    f'stopped by SIGTERM after step {step}, which is saved; run the same '
    'command again to resume from it.'
  )
  print(f'SIGTERM: saved step {step}, exit {seconds:.2f} s after the signal')

  # A second signal while the first is handled: out at once (or, if the
  # save was quicker, on its way out anyway).
  after = (step // SAVE_EVERY + 1) * SAVE_EVERY  # its next save
  assert after < STEPS
  code, out, _ = _stop(
    argv, seeds[1], signal.SIGINT, signal.SIGINT, after=after
  )
  assert code == 130, out[-3000:]
  assert f'Resuming from step {step} of {STEPS}' in out
  assert 'Traceback' not in out
  assert _last_line(out).startswith(
    ('error: SIGINT while stopping', 'stopped by SIGINT')
  ), out[-3000:]

  done = subprocess.run(
    argv, env=_env(), capture_output=True, text=True, cwd=ROOT, check=False
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Resuming from step ' in done.stderr
  # A save and a restore in a line or two: no orbax INFO lines, no warning
  # about its optional metadata file, no INFO lines of TensorFlow's C++
  # (tf.data's, ...) but its import notices, which TF_CPP_MIN_LOG_LEVEL
  # cannot reach.
  orbax = re.findall(r'^[IW]\d{4} .*/?(\w+\.py):\d+\] (.*)$', done.stderr, re.M)
  noisy = [f for f in orbax if f[0] in ORBAX_FILES]
  assert not noisy, noisy[:5]
  assert 'Metadata file does not exist' not in done.stderr
  tf_info = re.findall(
    r'^I\d{4} [\d:. ]+ (\w+\.cc):\d+\] (.*)$', done.stderr, re.M
  )
  noisy = [f for f in tf_info if f[0] not in TF_IMPORT_NOTICES]
  assert not noisy, noisy[:5]
  for seed, ref in zip(seeds, reference, strict=True):
    # What the cut-short saves left was removed.
    left = os.listdir(os.path.join(seed, 'checkpoints'))
    assert not [name for name in left if 'tmp' in name], left
    result = files.read_json(os.path.join(seed, 'results.json'))
    assert result['finished'] and 'stopped' not in result
    assert result['pack'] == 2
    assert _max_difference(_state(seed), _state(ref)) == 0.0
