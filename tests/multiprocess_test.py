"""Two processes (jax.distributed on 127.0.0.1) train as one process does."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker(data_dir, workdir, process_id, num_processes, port, devices):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )
  args = [data_dir, workdir, process_id, num_processes, port]
  return subprocess.Popen(
    [sys.executable, os.path.join(ROOT, 'tests', 'multiprocess_worker.py')]
    + [str(a) for a in args],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_two_processes_equal_one_process_with_four_devices(data_dirs, tmp_path):
  _, data_dir = data_dirs
  port = _free_port()
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  procs = [_worker(data_dir, one, 0, 1, 0, devices=4)] + [
    _worker(data_dir, two, i, 2, port, devices=2) for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  results = [out.split('RESULT')[-1].split() for out in outputs]
  # process index, process count, global devices, steps
  assert results == [
    ['0', '1', '4', '3'],
    ['0', '2', '4', '3'],
    ['1', '2', '4', '3'],
  ]

  # Read back with plain orbax: params, batch_stats (BN statistics across
  # processes), EMA and the momentum traces (every step's gradient).
  def final_state(workdir):
    path = os.path.join(workdir, 'checkpoints', '3', 'state')
    ckpt = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      ckpt.metadata(path).item_metadata,
    )
    return ckpt.restore(path, target)

  expected, actual = final_state(one), final_state(two)
  flat = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert len(flat) > 500
  for (path, x), y in zip(flat, jax.tree.leaves(actual), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    scale = float(np.abs(x).max())
    diff = float(np.abs(x - y).max())
    assert diff <= 2e-4 * scale + 2e-5, (jax.tree_util.keystr(path), diff)
