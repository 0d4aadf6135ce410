"""Exports a run's eval model to a SavedModel, LiteRT (TFLite) or ONNX, checked.

  python -m mnv2_flax.export --workdir=workdirs/quickstart [--step=N] \
      --format=tflite|saved_model|onnx --quantize=none|float16|int8 \
      [--resolution=R] [--batch_size=1] [--raw] [--output=PATH]

`--output` defaults to `<workdir>/export/<format>[_<quantize>]_b<batch>`
(`.tflite`, `.onnx`; a directory for saved_model), beside the run it came
from; an existing path is never overwritten.

The exported model takes float32 pixels in [0, 255], NHWC, at a fixed batch
size and resolution, and normalises them itself; it returns logits. It holds
the EMA parameters (`--raw`: the trained ones) in Flax's own layers: the CPU
kernels are custom calls that do not serialise. The batch is fixed because
jax 0.12 writes StableHLO that TF 2.21 reads only without symbolic shapes.
int8 is calibrated on the run's own training images (its input pipeline,
`--calibration_images`). Right after writing, the exported model runs beside
Flax on real eval images and the largest logit difference and top-1
agreement are printed, then the median latency of one call beside Flax's
(jitted, this host's CPU). `make setup-export` installs the LiteRT interpreter
(ai-edge-litert) that checks .tflite files; TensorFlow writes them. ONNX
(float32) is the float32 LiteRT graph converted by tf2onnx and checked with
onnxruntime (both in requirements-export.txt): tf2onnx cannot read the
SavedModel's StableHLO (XlaCallModule) ops, but reads LiteRT's builtin ones.
"""

from collections.abc import Sequence

from absl import flags

from mnv2_flax import cli
from mnv2_flax import defaults


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(
      f'unexpected arguments {argv[1:]}; flags take the form --name=value.'
    )
  output = _OUTPUT.value or defaults.export_output(
    _WORKDIR.value,
    _FORMAT.value,
    _QUANTIZE.value,
    _BATCH_SIZE.value,
    _STEP.value,
  )
  defaults.check_export(
    output, _FORMAT.value, _QUANTIZE.value, _BATCH_SIZE.value
  )
  cli.start_jax()
  from mnv2_flax.export import lib as export_lib  # pylint: disable=g-import-not-at-top

  result = export_lib.export(
    _WORKDIR.value,
    output,
    _FORMAT.value,
    _QUANTIZE.value,
    _STEP.value,
    _RESOLUTION.value,
    _BATCH_SIZE.value,
    _RAW.value,
    _CHECK_IMAGES.value,
    _CALIBRATION_IMAGES.value,
  )
  print(
    f'{output}: {result["bytes"] / 1e6:.2f} MB; on {result["images"]} '
    f'eval images: max |logit - Flax logit| {result["max_logit_diff"]:.2e}, '
    f'top-1 agreement {100 * result["top1_agreement"]:.2f}%, top-1 '
    f'{100 * result["top1"]:.2f}% (Flax {100 * result["flax_top1"]:.2f}%); '
    f'one call of batch {_BATCH_SIZE.value} {result["latency_ms"]:.3f} ms '
    f'(Flax on this CPU '
    f'{result["flax_latency_ms"]:.3f} ms), medians of 200.'
  )


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory or step dir.')
  _OUTPUT = flags.DEFINE_string(
    'output',
    None,
    'File (.tflite, .onnx) or directory (saved_model); default '
    '<workdir>/export/<format>[_<quantize>]_b<batch>.',
  )
  _FORMAT = flags.DEFINE_string(
    'format', 'tflite', ' or '.join(defaults.EXPORT_FORMATS)
  )
  _QUANTIZE = flags.DEFINE_string(
    'quantize', 'none', ', '.join(defaults.EXPORT_QUANTIZE)
  )
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (latest).')
  _RESOLUTION = flags.DEFINE_integer('resolution', None, "Run's resolution.")
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 1, 'Fixed batch size.')
  _RAW = flags.DEFINE_bool('raw', False, 'Trained parameters, not the EMA.')
  _CHECK_IMAGES = flags.DEFINE_integer('check_images', 500, 'Eval images.')
  _CALIBRATION_IMAGES = flags.DEFINE_integer(
    'calibration_images', 200, 'Training images for int8 calibration.'
  )
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
