"""The sweep's Slurm path through submitit's local executor (real processes).

In its own file so that `pytest --dist loadfile` can run it beside the other
slow sweep tests.
"""

import csv
import json
import os

import pytest
from sweep_test import FAST_COMPILES
from sweep_test import _tiny

from configs import ablation
from mnv2_flax import sweep


def test_submitit_local_array_runs_and_a_rerun_submits_nothing_finished(
  data_dirs, tmp_path, monkeypatch
):
  _, data_dir = data_dirs
  for key, value in FAST_COMPILES.items():
    monkeypatch.setenv(key, value)
  root = str(tmp_path / 'sweep')
  points = ablation.get_sweep('grid,width=0.35,res=32,seeds=2')
  args = (ablation, points, root, _tiny(data_dir), 'local')
  rows = sweep.submit(*args, dict(timeout_min=10), poll_seconds=1)
  assert [r['status'] for r in rows] == ['finished'] * 2
  jobs = os.listdir(os.path.join(root, 'submitit'))
  registry = json.loads(
    open(os.path.join(root, 'submitit', 'jobs.json')).read()
  )
  assert sorted(registry) == sorted(points)
  # One job per point, each with its log and result.
  for job_id in registry.values():
    for name in ('0_log.out', '0_result.pkl'):
      assert os.path.exists(
        os.path.join(root, 'submitit', job_id, f'{job_id}_{name}')
      )
  with open(os.path.join(root, 'points.csv')) as f:
    assert next(csv.DictReader(f))['n'] == '2'
  # Rerun: nothing is left to submit.
  rows = sweep.submit(*args, dict(timeout_min=10), poll_seconds=1)
  assert [r['status'] for r in rows] == ['finished'] * 2
  assert sorted(os.listdir(os.path.join(root, 'submitit'))) == sorted(jobs)
  # A rerun leaves a job that is still alive alone: it is waited for.
  assert sweep._job_alive(None, root, 'local', str(os.getpid()))
  assert not sweep._job_alive(None, root, 'local', registry[points[0]])
  # Unknown submitit parameters: one clear error, nothing submitted.
  with pytest.raises(ValueError, match='--submit_params'):
    sweep.submit(
      ablation,
      ablation.get_sweep('grid,width=0.35,res=40'),
      root,
      _tiny(data_dir),
      'local',
      dict(no_such_parameter=1),
    )
