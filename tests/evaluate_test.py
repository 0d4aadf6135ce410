"""`mnv2_flax.evaluate`: a checkpoint's own metrics, defaults, CLI errors."""

import json
import os
import subprocess
import sys

from absl import flags
from fake_data import tiny_config
import pytest
from train_lib_test import ROOT

from mnv2_flax import evaluate
from mnv2_flax.train import train_lib

# Its tests share a trained module fixture: under `--dist loadgroup` one
# xdist worker runs them all (`make test`'s loadfile keeps a file together).
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope='module')
def trained(data_dirs, tmp_path_factory):
  """5 steps (one epoch), checkpoints at 4 and 5; (workdir, result)."""
  _, data_dir = data_dirs
  config = tiny_config(data_dir, num_epochs=1.0)
  config.checkpoint.every_steps = 4
  workdir = tmp_path_factory.mktemp('trained')
  return workdir, train_lib.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_evaluates_a_workdir_to_its_final_metrics(trained, data_dirs):
  workdir, result = trained
  metrics = evaluate.evaluate_checkpoint(str(workdir), data_dir=data_dirs[1])
  for key in ('top1', 'ema_top1', 'flip_top1', 'loss', 'num_examples'):
    assert metrics[key] == result[key], key


@pytest.mark.slow
def test_a_step_and_a_step_directory_select_that_checkpoint(trained):
  workdir, result = trained
  by_step = evaluate.evaluate_checkpoint(str(workdir), step=4)
  by_dir = evaluate.evaluate_checkpoint(str(workdir / 'checkpoints' / '4'))
  assert by_step == by_dir
  assert by_step['loss'] != result['loss']  # not the final step's


@pytest.mark.slow
def test_an_older_config_gets_defaults_and_loses_removed_fields(trained):
  workdir, result = trained
  config_file = workdir / 'checkpoints' / '5' / 'config' / 'metadata'
  original = config_file.read_text()
  saved = json.loads(original)
  del saved['model']['shortcut']
  del saved['data']['eval_flip_average']
  saved['model']['depthwise_impl'] = 'native'  # a field since removed
  config_file.write_text(json.dumps(saved))
  try:
    metrics = evaluate.evaluate_checkpoint(str(workdir))
  finally:
    config_file.write_text(original)
  # Defaults: the paper's shortcut; no flip-averaged metrics.
  assert metrics['top1'] == result['top1']
  assert 'flip_top1' not in metrics


@pytest.mark.slow
def test_cli_prints_the_metrics(trained):
  workdir, result = trained
  out = subprocess.run(
    [sys.executable, '-m', 'mnv2_flax.evaluate', f'--workdir={workdir}'],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    cwd=ROOT,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout)['top1'] == result['top1']


def test_main_names_a_missing_checkpoint(tmp_path):
  flags.FLAGS(['evaluate', f'--workdir={tmp_path / "nowhere"}'])
  try:
    with pytest.raises(FileNotFoundError, match='No checkpoint directory at'):
      evaluate.main([])
  finally:
    flags.FLAGS.unparse_flags()


@pytest.mark.slow
def test_export_to_litert_runs_beside_flax(trained, tmp_path):
  """A run's EMA model as LiteRT float32 and int8 (calibrated on the run's
  training images), each checked on the eval images right after writing."""
  from mnv2_flax.export import lib as export_lib  # pylint: disable=g-import-not-at-top

  workdir, result = trained
  f32 = export_lib.export(str(workdir), str(tmp_path / 'f32.tflite'))
  assert f32['images'] == result['num_examples']
  assert f32['max_logit_diff'] <= 1e-4 and f32['top1_agreement'] == 1.0
  assert f32['flax_top1'] == result['ema_top1']
  int8 = export_lib.export(
    str(workdir), str(tmp_path / 'int8.tflite'), quantize='int8', batch_size=2
  )
  assert int8['bytes'] < f32['bytes'] / 2  # int8 weights
  assert int8['images'] == 2 * (result['num_examples'] // 2)
  # Nothing is overwritten; quantising a SavedModel is refused.
  with pytest.raises(FileExistsError, match='nothing is overwritten'):
    export_lib.export(str(workdir), str(tmp_path / 'f32.tflite'))
  with pytest.raises(ValueError, match='--format=tflite'):
    export_lib.export(
      str(workdir), str(tmp_path / 'sm'), 'saved_model', quantize='float16'
    )
  # ONNX: the float32 LiteRT graph through tf2onnx, run by onnxruntime.
  onnx = export_lib.export(str(workdir), str(tmp_path / 'm.onnx'), 'onnx')
  assert onnx['max_logit_diff'] <= 1e-4 and onnx['top1_agreement'] == 1.0
  assert sorted(os.listdir(tmp_path)) == ['f32.tflite', 'int8.tflite', 'm.onnx']


def test_export_writes_inside_the_run_unless_told_otherwise():
  from mnv2_flax import defaults  # pylint: disable=g-import-not-at-top

  out = defaults.export_output('workdirs/q', 'tflite', 'int8', 1, None)
  assert out == os.path.join('workdirs/q', 'export', 'tflite_int8_b1.tflite')
  out = defaults.export_output(
    'workdirs/q/checkpoints/400/', 'onnx', 'none', 8, None
  )
  assert out == os.path.join('workdirs/q', 'export', 'onnx_b8_step400.onnx')
  out = defaults.export_output('w', 'saved_model', 'none', 1, 7)
  assert out == os.path.join('w', 'export', 'saved_model_b1_step7')
