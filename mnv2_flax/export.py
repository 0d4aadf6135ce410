"""Exports a run's eval model to a SavedModel, LiteRT (TFLite) or ONNX, checked.

  python -m mnv2_flax.export --workdir=workdirs/quickstart [--step=N] \
      --format=tflite|saved_model|onnx --quantize=none|float16|int8 \
      [--resolution=R] [--batch_size=1] [--raw] --output=quickstart.tflite

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

from collections.abc import Callable, Iterator, Sequence
import os
import time

from absl import flags
from absl import logging
import jax
from jax.experimental import jax2tf
import ml_collections
import numpy as np
import tensorflow as tf

from mnv2_flax import checkpointing
from mnv2_flax import cli
from mnv2_flax import defaults
from mnv2_flax import input_pipeline
from mnv2_flax import models
from mnv2_flax import preprocessing

FORMATS = ('tflite', 'saved_model', 'onnx')
ONNX_OPSET = 17
QUANTIZE = ('none', 'float16', 'int8')


def eval_model(
  config: ml_collections.ConfigDict, num_classes: int
) -> models.MobileNetV2:
  """The run's model in float32 with Flax's own layers."""
  return models.MobileNetV2(num_classes=num_classes, **config.model.to_dict())


def serving_fn(
  config: ml_collections.ConfigDict,
  variables: dict,
  num_classes: int,
  raw: bool = False,
) -> Callable[[jax.Array], jax.Array]:
  """pixels (float32, [0, 255]) -> logits, with the weights as constants."""
  model = eval_model(config, num_classes)
  params = variables['params'] if raw else variables['ema_params']
  weights = {'params': params, 'batch_stats': variables['batch_stats']}
  normalization = config.data.normalization

  def serve(pixels):
    images = preprocessing.normalize(pixels, normalization)
    return model.apply(weights, images, train=False)

  return serve


def save_model(fn, shape: tuple[int, ...], directory: str) -> None:
  """`fn` as a SavedModel with one fixed-shape float32 signature."""
  module = tf.Module()
  module.serve = tf.function(
    jax2tf.convert(fn, with_gradient=False),
    input_signature=[tf.TensorSpec(shape, tf.float32, name='pixels')],
    autograph=False,
  )
  tf.saved_model.save(
    module, directory, signatures=module.serve.get_concrete_function()
  )


def to_tflite(
  saved_model_dir: str,
  quantize: str,
  calibration: Callable[[], Iterator[list[np.ndarray]]] | None = None,
) -> bytes:
  """The SavedModel converted to LiteRT; float16 weights, or full int8
  (float input and output) calibrated on `calibration`'s batches."""
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
  if quantize == 'float16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantize == 'int8':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = calibration
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  return converter.convert()


def to_onnx(tflite_path: str, output: str) -> None:
  """The float32 LiteRT file as ONNX (tf2onnx; builtin ops map one to one:
  Conv, Clip, Add, ReduceSum, Gemm, Transpose)."""
  try:
    import tf2onnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
      '--format=onnx needs tf2onnx and onnxruntime: make setup-export (pip '
      'install -r requirements-export.txt).'
    ) from None
  try:
    tf2onnx.convert.from_tflite(
      tflite_path, opset=ONNX_OPSET, output_path=output
    )
  finally:
    os.remove(tflite_path)


def _images(ds: tf.data.Dataset, size: int, count: int) -> Iterator[dict]:
  """Batches of a project dataset as numpy (images float32, flat batch)."""
  seen = 0
  for batch in ds.as_numpy_iterator():
    images = batch['image'].reshape(-1, size, size, 3).astype(np.float32)
    mask = batch.get('mask')
    keep = slice(None) if mask is None else mask.reshape(-1) > 0
    labels = batch['label'].reshape(-1)[keep]
    yield dict(image=images[keep], label=labels)
    seen += len(labels)
    if seen >= count:
      return


def load_runner(path: str, fmt: str):
  """A function pixels -> logits that runs the exported file."""
  if fmt == 'saved_model':
    serve = tf.saved_model.load(path).signatures['serving_default']
    return lambda x: next(iter(serve(pixels=tf.constant(x)).values())).numpy()
  if fmt == 'onnx':
    import onnxruntime  # pylint: disable=g-import-not-at-top

    session = onnxruntime.InferenceSession(
      path, providers=['CPUExecutionProvider']
    )
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]
  try:
    from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top

    interpreter = litert.Interpreter(model_path=path)
  except ImportError:
    logging.warning(
      'ai-edge-litert is not installed (make setup-export): checking with '
      "TensorFlow's deprecated tf.lite.Interpreter."
    )
    interpreter = tf.lite.Interpreter(model_path=path)
  interpreter.allocate_tensors()
  (inp,) = interpreter.get_input_details()
  (out,) = interpreter.get_output_details()

  def run(x):
    interpreter.set_tensor(inp['index'], x)
    interpreter.invoke()
    return interpreter.get_tensor(out['index']).copy()

  return run


def export(
  workdir: str,
  output: str,
  fmt: str = 'tflite',
  quantize: str = 'none',
  step: int | None = None,
  resolution: int | None = None,
  batch_size: int = 1,
  raw: bool = False,
  check_images: int = 500,
  calibration_images: int = 200,
  timing_calls: int = 200,
) -> dict[str, float]:
  """Writes the export and checks it; returns the check's numbers."""
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}: valid are {" or ".join(FORMATS)}.')
  if quantize not in QUANTIZE:
    raise ValueError(
      f'--quantize={quantize!r}: valid are {", ".join(QUANTIZE)}.'
    )
  if fmt != 'tflite' and quantize != 'none':
    raise ValueError(
      f'--quantize={quantize}: quantisation is a LiteRT step; use '
      '--format=tflite (--format={fmt} is float32).'
    )
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size}: expected 1 or more.')
  if os.path.exists(output):
    raise FileExistsError(
      f'--output={output!r} exists; choose a new path (nothing is overwritten).'
    )
  config, variables = checkpointing.restore(workdir, step)
  config = defaults.with_defaults(config)
  if resolution:
    config.data.image_size = resolution
  size = config.data.image_size
  builder = input_pipeline.get_builder(config)
  num_classes = input_pipeline.dataset_meta(builder, config).num_classes
  serve = serving_fn(config, variables, num_classes, raw)
  shape = (batch_size, size, size, 3)

  saved_model_dir = (
    output if fmt == 'saved_model' else f'{output}.saved_model.tmp'
  )
  save_model(serve, shape, saved_model_dir)
  if fmt != 'saved_model':

    def calibration():
      config.data.batch_size = batch_size
      ds = input_pipeline.create_train_dataset(builder, config)
      for batch in _images(ds, size, calibration_images):
        for i in range(0, len(batch['image']) - batch_size + 1, batch_size):
          yield [batch['image'][i : i + batch_size]]

    content = to_tflite(saved_model_dir, quantize, calibration)
    tf.io.gfile.rmtree(saved_model_dir)
    with open(f'{output}.tmp', 'wb') as f:
      f.write(content)
    if fmt == 'onnx':
      to_onnx(f'{output}.tmp', f'{output}.onnx.tmp')
      os.replace(f'{output}.onnx.tmp', f'{output}.tmp')
    os.replace(f'{output}.tmp', output)

  # The check: the exported model beside Flax on real eval images.
  config.data.eval_batch_size = max(batch_size, 100 // batch_size * batch_size)
  run = load_runner(output, fmt)
  flax_logits = jax.jit(serve)
  diffs, agree, correct, flax_correct, n = [], 0, 0, 0, 0
  eval_ds = input_pipeline.create_eval_dataset(builder, config)
  for batch in _images(eval_ds, size, check_images):
    for i in range(0, len(batch['image']) - batch_size + 1, batch_size):
      x = batch['image'][i : i + batch_size]
      labels = batch['label'][i : i + batch_size]
      got, want = run(x), np.asarray(flax_logits(x))
      diffs.append(np.abs(got - want).max())
      agree += int((got.argmax(-1) == want.argmax(-1)).sum())
      correct += int((got.argmax(-1) == labels).sum())
      flax_correct += int((want.argmax(-1) == labels).sum())
      n += len(labels)
  # Latency of one call on one batch, median of `timing_calls` (warm).
  x = batch['image'][:batch_size]
  latency = {}
  for name, fn in (
    ('export', run),
    ('flax', lambda x: np.asarray(flax_logits(x))),
  ):
    fn(x)
    times = []
    for _ in range(timing_calls):
      start = time.perf_counter()
      fn(x)
      times.append(time.perf_counter() - start)
    latency[name] = 1e3 * float(np.median(times))
  return dict(
    latency_ms=latency['export'],
    flax_latency_ms=latency['flax'],
    bytes=_size(output),
    images=n,
    max_logit_diff=float(max(diffs)),
    top1_agreement=agree / n,
    top1=correct / n,
    flax_top1=flax_correct / n,
  )


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, fs in os.walk(path)
    for f in fs
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(
      f'unexpected arguments {argv[1:]}; flags take the form --name=value.'
    )
  result = export(
    _WORKDIR.value,
    _OUTPUT.value,
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
    f'{_OUTPUT.value}: {result["bytes"] / 1e6:.2f} MB; on {result["images"]} '
    f'eval images: max |logit - Flax logit| {result["max_logit_diff"]:.2e}, '
    f'top-1 agreement {100 * result["top1_agreement"]:.2f}%, top-1 '
    f'{100 * result["top1"]:.2f}% (Flax {100 * result["flax_top1"]:.2f}%); '
    f'one call {result["latency_ms"]:.3f} ms (Flax on this CPU '
    f'{result["flax_latency_ms"]:.3f} ms), medians of 200.'
  )


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory or step dir.')
  _OUTPUT = flags.DEFINE_string(
    'output', None, 'File (.tflite, .onnx) or directory.'
  )
  _FORMAT = flags.DEFINE_string('format', 'tflite', ' or '.join(FORMATS))
  _QUANTIZE = flags.DEFINE_string('quantize', 'none', ', '.join(QUANTIZE))
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (latest).')
  _RESOLUTION = flags.DEFINE_integer('resolution', None, "Run's resolution.")
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 1, 'Fixed batch size.')
  _RAW = flags.DEFINE_bool('raw', False, 'Trained parameters, not the EMA.')
  _CHECK_IMAGES = flags.DEFINE_integer('check_images', 500, 'Eval images.')
  _CALIBRATION_IMAGES = flags.DEFINE_integer(
    'calibration_images', 200, 'Training images for int8 calibration.'
  )
  flags.mark_flags_as_required(['workdir', 'output'])
  cli.run(main)
