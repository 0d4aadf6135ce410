"""Tests of the benchmark harness (it runs; its numbers are consistent)."""

import os
import subprocess
import sys

import pytest

from mnv2_flax.benchmark import lib as benchmark_lib


@pytest.mark.parametrize('mode', ['train', 'infer'])
@pytest.mark.slow
def test_benchmark_times_the_library_step(mode):
  r = benchmark_lib.run(
    width_multiplier=0.35,
    resolution=32,
    batch_size=4,
    mode=mode,
    num_classes=10,
    steps=3,
    warmup=1,
    profile_steps=2,
  )
  assert r['compile_seconds'] > 0 and r['median_step_seconds'] > 0
  assert r['min_step_seconds'] <= r['median_step_seconds']
  assert r['images_per_second'] == pytest.approx(4 / r['median_step_seconds'])
  flops = (3 if mode == 'train' else 1) * 2 * r['macs_per_image'] * 4
  assert r['gflops_per_second'] == pytest.approx(
    flops / r['median_step_seconds'] / 1e9
  )
  # On CPU the run's layers are mnv2_flax.cpu's.
  assert r['cpu_fast_path'] == (r['backend'] == 'cpu')
  assert r['peak_rss_mib'] > 100
  # The per-op profile: XLA ops that ran, traced back to the model.
  ops = r['ops']
  assert ops and all(op['ms_per_step'] >= 0 for op in ops)
  assert [op['ms_per_step'] for op in ops] == sorted(
    (op['ms_per_step'] for op in ops), reverse=True
  )
  assert any('depthwise_conv' in op['source'] for op in ops)
  assert 'op time per step' in benchmark_lib.format_ops(ops, top=5)


@pytest.mark.slow
def test_benchmark_times_a_pack_in_turn_with_one_seed():
  r = benchmark_lib.run(
    width_multiplier=0.35,
    resolution=32,
    batch_size=4,
    num_classes=10,
    steps=3,
    warmup=1,
    pack=2,
  )
  # images/s counts both seeds' images; the speed-up compares the pack's
  # per-image time with one seed's step timed in the same process.
  assert r['pack'] == 2
  assert r['images_per_second'] == pytest.approx(8 / r['median_step_seconds'])
  assert r['alone_images_per_second'] == pytest.approx(
    4 / r['alone_median_step_seconds']
  )
  assert r['pack_speedup'] == pytest.approx(
    r['images_per_second'] / r['alone_images_per_second']
  )
  text = benchmark_lib.format_result(r)
  assert 'pack of 2 seeds' in text and 'one seed alone' in text


@pytest.mark.parametrize(
  'field, value, words',
  [
    ('mode', 'eval', "--mode='eval'"),
    ('dtype', 'float16', "--dtype='float16'"),
    ('devices', 3, '--devices=3'),
    ('pack', 0, '--pack=0'),
  ],
)
def test_benchmark_rejects_bad_flags(field, value, words):
  with pytest.raises(ValueError, match=words):
    benchmark_lib.run(resolution=32, batch_size=4, **{field: value})


def test_the_profile_reads_device_op_lines_and_cpu_runtime_threads():
  assert benchmark_lib._is_op_line('/device:GPU:0', 'XLA Ops')
  assert benchmark_lib._is_op_line('/device:TPU:3', 'XLA Ops')
  assert not benchmark_lib._is_op_line('/device:GPU:0', 'XLA Modules')
  assert benchmark_lib._is_op_line('/host:CPU', 'tf_XLACpuWorker/1234')
  assert not benchmark_lib._is_op_line('/host:CPU', 'python3')


@pytest.mark.slow
def test_the_input_pipeline_is_timed_from_the_command_line(data_dirs):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'mnv2_flax.benchmark',
      '--input_pipeline',
      '--config=configs/quickstart.py',
      f'--config.data.data_dir={data_dirs[1]}',
      '--config.data.batch_size=8',
      '--config.data.shuffle_buffer=64',
      '--steps=3',
    ],
    capture_output=True,
    text=True,
    cwd=root,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith('fashion_mnist train pipeline at 32px, batch 8')
  assert '(3 batches in' in line
