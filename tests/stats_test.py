"""Parameter and MAC counts against the published numbers."""

import json
import math
import subprocess
import sys

import pytest

from mnv2_flax import models
from mnv2_flax import stats

# TF-slim's checkpoint table (research/slim/nets/mobilenet/README.md): width,
# resolution, MACs (millions, floored) and parameters (millions, 2 decimals),
# 1001 classes, parameters without BatchNorm.
TF_SLIM_TABLE = (
  (1.4, 224, 582, 6.06),
  (1.3, 224, 509, 5.34),
  (1.0, 224, 300, 3.47),
  (1.0, 192, 221, 3.47),
  (1.0, 160, 154, 3.47),
  (1.0, 128, 99, 3.47),
  (1.0, 96, 56, 3.47),
  (0.75, 224, 209, 2.61),
  (0.75, 192, 153, 2.61),
  (0.75, 160, 107, 2.61),
  (0.75, 128, 69, 2.61),
  (0.75, 96, 39, 2.61),
  (0.5, 224, 97, 1.95),
  (0.5, 192, 71, 1.95),
  (0.5, 160, 50, 1.95),
  (0.5, 128, 32, 1.95),
  (0.5, 96, 18, 1.95),
  (0.35, 224, 59, 1.66),
  (0.35, 192, 43, 1.66),
  (0.35, 160, 30, 1.66),
  (0.35, 128, 20, 1.66),
  (0.35, 96, 11, 1.66),
)


@pytest.mark.parametrize('width, resolution, macs_m, params_m', TF_SLIM_TABLE)
@pytest.mark.slow
def test_tf_slim_checkpoint_table(width, resolution, macs_m, params_m):
  model = models.MobileNetV2(num_classes=1001, width_multiplier=width)
  counts = stats.count(model, resolution)
  assert math.floor(counts.macs / 1e6) == macs_m
  assert round(counts.params_no_bn / 1e6, 2) == params_m


def test_width_1_at_224_exact():
  counts = stats.count(models.MobileNetV2(num_classes=1001), 224)
  assert counts.macs == 300_775_552  # 300.78M
  assert counts.params_no_bn == 3_472_041


@pytest.mark.parametrize(
  'width, params, keras_params',
  [(1.0, 3_504_872, 3_538_984), (0.5, 1_968_680, None)],
)
def test_torchvision_and_keras_parameter_counts(width, params, keras_params):
  counts = stats.count(models.MobileNetV2(width_multiplier=width), 224)
  assert counts.params == params
  if keras_params is not None:  # Keras adds the BN moving statistics.
    assert counts.params + counts.batch_stats == keras_params


def test_layers_sum_to_totals_in_call_order():
  counts = stats.count(models.MobileNetV2(width_multiplier=0.5), (160, 128))
  assert sum(layer.params for layer in counts.layers) == counts.params
  assert sum(layer.macs for layer in counts.layers) == counts.macs
  names = [layer.name for layer in counts.layers]
  assert names[:3] == ['stem_conv', 'stem_bn', 'block_01/depthwise_conv']
  assert names[-3:] == ['head_conv', 'head_bn', 'classifier']
  stem = counts.layers[0]
  assert stem.output_shape == (80, 64, 16)
  assert stem.macs == 80 * 64 * 3 * 3 * 3 * 16
  assert all(
    layer.macs == 0 for layer in counts.layers if layer.kind == 'BatchNorm'
  )
  table = stats.format_table(counts)
  assert 'block_17/project_conv' in table and f'{counts.macs:,}' in table


def test_counts_follow_the_model_knobs():
  base = stats.count(models.MobileNetV2(), 224)
  narrow = stats.count(models.MobileNetV2(expand_ratio=4), 224)
  assert narrow.macs < base.macs and narrow.params < base.params
  relu6 = stats.count(models.MobileNetV2(bottleneck_activation='relu6'), 224)
  assert (relu6.macs, relu6.params) == (base.macs, base.params)


def _run_cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'mnv2_flax.stats', *args],
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )


@pytest.mark.slow
def test_cli_json_and_table():
  result = _run_cli(
    '--width_multiplier=0.75',
    '--resolution=160',
    '--num_classes=1001',
    '--json',
  )
  assert result.returncode == 0, result.stderr
  printed = json.loads(result.stdout)
  counts = stats.count(
    models.MobileNetV2(num_classes=1001, width_multiplier=0.75), 160
  )
  assert printed['params'] == counts.params
  assert printed['params_no_bn'] == counts.params_no_bn
  assert printed['macs'] == counts.macs
  assert math.floor(printed['macs'] / 1e6) == 107
  table = _run_cli('--width_multiplier=0.35', '--resolution=96')
  assert table.returncode == 0 and 'MACs per image' in table.stdout


def test_cli_rejects_bad_width_with_one_line():
  result = _run_cli('--width_multiplier=0', '--json')
  assert result.returncode != 0
  assert 'width_multiplier=0.0' in result.stderr
  assert 'Traceback' not in result.stderr
