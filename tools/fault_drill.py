"""Fault drill: real train.py runs killed, starved of disk and diverged.

  python tools/fault_drill.py --root=/tmp/drill [--epochs=0.5]

On Fashion-MNIST (the quickstart recipe, shortened), each scenario runs the
same command again after the fault and compares its final checkpoint with an
uninterrupted run's:
  kill -9     the process is killed while orbax's temporary directory of a
              save exists (a save in flight);
  disk full   the workdir is a tmpfs with room for one checkpoint (root only):
              the run stops with one line, the tmpfs is enlarged, the same
              command resumes;
  divergence  learning rate 1e6, a save every step: which checkpoints remain,
              whether each is finite, and the message.
Prints a Markdown report.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from mnv2_flax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = flags.DEFINE_string('root', '/tmp/mnv2_flax_drill', 'Scratch dir.')
_EPOCHS = flags.DEFINE_float('epochs', 0.5, 'Epochs of each run.')


def _command(workdir, *extra):
  return [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config=' + os.path.join(ROOT, 'configs', 'quickstart.py'),
    f'--workdir={workdir}',
    f'--config.train.num_epochs={_EPOCHS.value}',
    '--config.train.log_every_steps=20',
    '--config.train.eval_every_steps=100000',
    '--config.checkpoint.every_steps=20',
    *extra,
  ]


def _run(workdir, *extra):
  """(exit status, the stderr lines starting with 'error:', seconds)."""
  start = time.perf_counter()
  out = subprocess.run(
    _command(workdir, *extra),
    capture_output=True,
    text=True,
    check=False,
    cwd=ROOT,
  )
  errors = [ln for ln in out.stderr.splitlines() if ln.startswith('error:')]
  tracebacks = out.stderr.count('Traceback')
  return out.returncode, errors, tracebacks, time.perf_counter() - start


def _final(workdir):
  _, variables = checkpointing.restore(workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    return variables, json.load(f)


def _max_difference(a, b):
  return max(
    float(np.abs(np.asarray(x) - np.asarray(y)).max())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _kill_during_save(workdir):
  """Starts the run; kills -9 it while a save is in flight; returns the step
  directory that was being written."""
  proc = subprocess.Popen(
    _command(workdir),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    cwd=ROOT,
    start_new_session=True,  # its precompile child dies with it
  )
  pattern = os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')
  while proc.poll() is None:
    partial = glob.glob(pattern)
    # Past the first save: the kill costs progress that must be redone.
    if partial and not partial[0].split('/')[-1].startswith('20.'):
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      return os.path.basename(partial[0])
    time.sleep(0.002)
  raise RuntimeError('the run ended before a save could be interrupted')


def main(argv):
  del argv
  root = _ROOT.value
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  lines = ['| scenario | what happened | then | final vs uninterrupted |']
  lines.append('|---|---|---|---|')

  reference = os.path.join(root, 'reference')
  status, _, _, seconds = _run(reference)
  assert status == 0, 'the reference run failed'
  ref_vars, ref_results = _final(reference)
  lines.append(
    f'| uninterrupted | finished in {seconds:.0f} s, top-1 '
    f'{ref_results["top1"]:.4f} | | |'
  )

  def compare(workdir):
    variables, results = _final(workdir)
    return (
      f'top-1 {results["top1"]:.4f} vs {ref_results["top1"]:.4f}, max '
      f'|param diff| {_max_difference(variables, ref_vars):.1e}'
    )

  # kill -9 during a save.
  killed = os.path.join(root, 'killed')
  partial = _kill_during_save(killed)
  left = sorted(os.listdir(os.path.join(killed, 'checkpoints')))
  status, errors, tracebacks, _ = _run(killed)
  lines.append(
    f'| kill -9 while writing `{partial}` | left {left} | same command: '
    f'exit {status}, tmp dirs now '
    f'{glob.glob(os.path.join(killed, "checkpoints", "*tmp*"))} | '
    f'{compare(killed)} |'
  )

  # Disk full (a tmpfs: root only).
  disk = os.path.join(root, 'disk')
  os.makedirs(disk)
  step_dir = os.path.join(reference, 'checkpoints', str(ref_results['steps']))
  checkpoint = sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, names in os.walk(step_dir)
    for f in names
  )
  size = int(1.6 * checkpoint / 2**20) + 1  # MiB: room for one checkpoint
  if subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', f'size={size}m', 'tmpfs', disk],
    check=False,
    capture_output=True,
  ).returncode:
    lines.append('| disk full | not run: cannot mount a tmpfs | | |')
  else:
    try:
      workdir = os.path.join(disk, 'run')
      status, errors, tracebacks, _ = _run(workdir)
      left = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
      subprocess.run(
        ['mount', '-o', f'remount,size={size * 4}m', disk], check=True
      )
      status2, _, _, _ = _run(workdir)
      lines.append(
        f'| disk full ({size} MiB tmpfs, a checkpoint is '
        f'{checkpoint / 2**20:.1f} MiB) | exit {status}, {tracebacks} '
        f'tracebacks, {errors} ; left {left} | tmpfs enlarged, same '
        f'command: exit {status2} | {compare(workdir)} |'
      )
    finally:
      subprocess.run(['umount', '-l', disk], check=False)

  # Divergence.
  diverged = os.path.join(root, 'diverged')
  lr = ('--config.optim.learning_rate=1e6', '--config.checkpoint.every_steps=1')
  status, errors, tracebacks, _ = _run(diverged, *lr)
  finite = {}
  for step in sorted(
    int(s) for s in os.listdir(os.path.join(diverged, 'checkpoints'))
  ):
    _, variables = checkpointing.restore(diverged, step=step)
    finite[step] = all(
      bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(variables)
    )
  status2, errors2, _, _ = _run(diverged, *lr)
  lines.append(
    f'| lr 1e6, a save every step | exit {status}, {tracebacks} tracebacks, '
    f'{errors}; checkpoints left (finite?): {finite} | same command: exit '
    f'{status2}, {errors2} | |'
  )
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
