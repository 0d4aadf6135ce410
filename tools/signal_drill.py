"""Signal drill: real train.py runs stopped by signals, then resumed.

  python tools/signal_drill.py --root=/tmp/signal_drill [--epochs=1]

The quickstart recipe on Fashion-MNIST for `--epochs` (a save every 500
steps, as shipped). For each of SIGTERM, SIGINT, SIGUSR1 and SIGUSR2: the
run is sent the signal once it logs step `--at`, then the same command runs
to the end. Also: two SIGTERMs at once; a second `train.py` on a workdir in
use; a 2-process `jax.distributed` run (`--two_epochs`) where only process 1
gets SIGUSR1. Prints a Markdown report: the step the signal was sent at (the
last logged step), the step saved, seconds from the signal to the exit, the
exit status and last line, and the resumed run's max |parameter difference|
against a run never stopped.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from mnv2_flax import checkpointing
from mnv2_flax.runtime import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = flags.DEFINE_string('root', '/tmp/mnv2_flax_signal_drill', 'Scratch.')
_EPOCHS = flags.DEFINE_float('epochs', 1.0, 'Epochs of each 1-process run.')
_AT = flags.DEFINE_integer('at', 240, 'Signal once this step is logged.')
_TWO_EPOCHS = flags.DEFINE_float('two_epochs', 0.3, 'Epochs, 2 processes.')


def _command(workdir, epochs, *extra):
  return [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config=' + os.path.join(ROOT, 'configs', 'quickstart.py'),
    f'--workdir={workdir}',
    f'--config.train.num_epochs={epochs}',
    '--config.train.log_every_steps=20',
    *extra,
  ]


def _start(argv, log):
  with open(log, 'w') as f:
    return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def _read(path):
  with open(path) as f:
    return f.read()


def _last_line(text):
  return [line for line in text.splitlines() if line.strip()][-1]


def _wait_for_logged_step(log, step, process):
  pattern = re.compile(r'step (\d+)/')
  while process.poll() is None:
    logged = [int(s) for s in pattern.findall(_read(log))]
    if logged and logged[-1] >= step:
      return logged[-1]
    time.sleep(0.05)
  raise RuntimeError(f'the run ended before step {step}: {log}')


def _state(workdir):
  _, variables = checkpointing.restore(workdir)
  return jax.tree.leaves(variables)


def _difference(a, b):
  return max(
    float(np.abs(np.asarray(x) - np.asarray(y)).max())
    for x, y in zip(a, b, strict=True)
  )


def _finish(argv, log):
  process = _start(argv, log)
  process.wait()
  assert process.returncode == 0, _read(log)[-3000:]


def _stop(argv, log, signums, at):
  """(logged step when signalled, seconds to exit, exit status, last line)."""
  process = _start(argv, log)
  sent_at = _wait_for_logged_step(log, at, process)
  start = time.perf_counter()
  for signum in signums:
    process.send_signal(signum)
    time.sleep(0.2)
  process.wait()
  seconds = time.perf_counter() - start
  return sent_at, seconds, process.returncode, _last_line(_read(log))


def main(argv):
  del argv
  root = _ROOT.value
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  epochs = _EPOCHS.value
  reference = os.path.join(root, 'reference')
  start = time.perf_counter()
  _finish(_command(reference, epochs), reference + '.log')
  print(f'Reference: {time.perf_counter() - start:.0f} s.', flush=True)
  expected = _state(reference)
  lines = [
    '| signal | sent at step | saved step | seconds to exit | exit | last '
    'line | resumed vs never stopped |',
    '|---|---|---|---|---|---|---|',
  ]
  cases = [[s] for s in (signal.SIGTERM, signal.SIGINT)]
  cases += [[signal.SIGUSR1], [signal.SIGUSR2]]
  cases += [[signal.SIGTERM, signal.SIGTERM]]
  for signums in cases:
    name = '+'.join(signal.Signals(s).name for s in signums)
    workdir = os.path.join(root, name)
    argv_ = _command(workdir, epochs)
    sent, seconds, code, last = _stop(
      argv_, workdir + '.log', signums, _AT.value
    )
    stopped = files.read_json(os.path.join(workdir, 'results.json'))
    saved = stopped.get('stopped', {}).get('step', '-')
    _finish(argv_, workdir + '.resume.log')
    resumed = re.search(
      r'Resuming from step (\d+)', _read(workdir + '.resume.log')
    )
    lines.append(
      f'| {name} | {sent} | {saved} | {seconds:.1f} | {code} | `{last}` | '
      f'resumed from {resumed.group(1) if resumed else "-"}, max |diff| '
      f'{_difference(_state(workdir), expected):.1e} |'
    )
    print(lines[-1], flush=True)

  # A second writer while the first trains.
  workdir = os.path.join(root, 'second_writer')
  first = _start(_command(workdir, epochs), workdir + '.log')
  _wait_for_logged_step(workdir + '.log', 20, first)
  before = sorted(os.listdir(workdir))
  start = time.perf_counter()
  second = subprocess.run(
    _command(workdir, epochs), capture_output=True, text=True, cwd=ROOT
  )
  seconds = time.perf_counter() - start
  first.send_signal(signal.SIGTERM)
  first.wait()
  lines.append(
    f'\nSecond `train.py` on a workdir in use: exit {second.returncode} after '
    f'{seconds:.1f} s, last line `{_last_line(second.stderr)}`; the workdir '
    f'held {before} before it.'
  )
  print(lines[-1], flush=True)

  # Two processes, SIGUSR1 to process 1 only.
  lines.append(_two_processes(root))
  print('\n'.join(lines))


def _two_processes(root):
  def run(workdir, stop):
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    env = dict(os.environ, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
    procs, logs = [], []
    for i in range(2):
      logs.append(f'{workdir}.{i}.log')
      argv = _command(
        workdir,
        _TWO_EPOCHS.value,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      )
      with open(logs[-1], 'w') as f:
        procs.append(
          subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env
          )
        )
    sent = None
    if stop:
      sent = _wait_for_logged_step(logs[0], 60, procs[0])
      start = time.perf_counter()
      procs[1].send_signal(signal.SIGUSR1)
    for p in procs:
      p.wait()
    seconds = time.perf_counter() - start if stop else None
    return sent, seconds, [p.returncode for p in procs], logs

  reference = os.path.join(root, 'two_reference')
  _, _, codes, _ = run(reference, False)
  assert codes == [0, 0], codes
  workdir = os.path.join(root, 'two')
  sent, seconds, codes, logs = run(workdir, True)
  steps = [
    re.findall(r'Stopped by \w+ at step (\d+)', _read(log)) for log in logs
  ]
  _, _, again, _ = run(workdir, False)
  return (
    f'\nTwo processes, SIGUSR1 to process 1 at logged step {sent}: exits '
    f'{codes}, steps saved {steps}, {seconds:.1f} s to exit; resumed: exits '
    f'{again}, max |diff| against 2 processes never stopped '
    f'{_difference(_state(workdir), _state(reference)):.1e}.'
  )


if __name__ == '__main__':
  app.run(main)
