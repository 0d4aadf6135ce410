"""Tests of the benchmark harness (it runs; its numbers are consistent)."""

import os
import subprocess
import sys
import types

import pytest

from mnv2_flax import defaults
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


def _trace(*planes):
  """A trace as jax.profiler.ProfileData reads it: planes of lines of
  events, given as {plane: {line: [(event, ns), ...]}}."""
  ns = types.SimpleNamespace
  return ns(
    planes=[
      ns(
        name=plane,
        lines=[
          ns(name=line, events=[ns(name=e, duration_ns=t) for e, t in events])
          for line, events in lines.items()
        ],
      )
      for plane, lines in planes
    ]
  )


HLO = """
%fusion.3 = f32[8,4,4,8]{3,2,1,0} fusion(...), metadata={op_name="jit(s)/conv"}
%dot.1 = f32[8,10]{1,0} dot(...), metadata={op_name="jit(s)/classifier"}
"""


@pytest.mark.parametrize('device', ['/device:GPU:0', '/device:TPU:3'])
def test_profiled_ops_come_from_the_accelerators_op_line_only(device):
  trace = _trace(
    (
      device,
      {
        'XLA Ops': [('fusion.3', 4_000_000), ('dot.1', 1_000_000)],
        'XLA Modules': [('jit_step', 6_000_000)],  # the whole program
      },
    ),
    ('/host:CPU', {'python3': [('fusion.3', 9_000_000)]}),
  )
  ops = benchmark_lib.ops_of_trace(trace, HLO, steps=2)
  assert [(o['name'], o['ms_per_step']) for o in ops] == [
    ('fusion.3', 2.0),
    ('dot.1', 0.5),
  ]
  assert ops[0]['kind'] == 'fusion' and ops[0]['source'] == 'jit(s)/conv'
  assert ops[1]['shape'] == 'f32[8,10]{1,0}'


def test_profiled_ops_on_the_cpu_are_the_xla_runtime_threads():
  trace = _trace(
    (
      '/host:CPU',
      {
        'tf_XLACpuWorker/1234': [
          ('fusion.3', 3_000_000),
          ('ThunkExecutor::Execute', 8_000_000),  # the runtime, not an op
        ],
        'tf_XLAEigen/77': [('fusion.3', 1_000_000)],
        'python3': [('dot.1', 5_000_000)],
      },
    )
  )
  ops = benchmark_lib.ops_of_trace(trace, HLO, steps=1)
  assert [(o['name'], o['ms_per_step']) for o in ops] == [('fusion.3', 4.0)]


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


def test_the_photo_pipeline_table_times_every_source_and_copy():
  from mnv2_flax.benchmark import pipeline  # noqa: PLC0415

  config = defaults.get_config()
  config.data.batch_size = 8
  result = pipeline.benchmark_photos(
    config, (64,), num_images=16, steps=2, warmup=1
  )
  rows = result['pipeline']
  assert [r['source'] for r in rows] == [n for n, _ in pipeline.PHOTO_SOURCES]
  assert all(r['images_per_second'] > 0 and r['short_side'] == 74 for r in rows)
  copies = {c['format']: c for c in result['copies']}
  assert sorted(copies) == ['jpeg', 'raw']
  # Raw pixels take more room than the JPEG copy; the JPEG copy at 74 px
  # less than the 333-500 px originals.
  assert copies['jpeg']['mb_per_1000'] < copies['raw']['mb_per_1000']
  assert copies['jpeg']['mb_per_1000'] < copies['jpeg']['original_mb_per_1000']
  table = pipeline.format_photos(result, threads=1)
  assert '| 64 | 74 |' in table and 'per core' in table
