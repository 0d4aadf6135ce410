"""Exports a run's eval model to a SavedModel, LiteRT (TFLite) or ONNX, and
checks the file beside Flax: the library of `python -m mnv2_flax.export`,
whose docstring says what the export holds and how it is checked."""

from collections.abc import Callable, Iterator
import os
import time

from absl import logging
import jax
from jax.experimental import jax2tf
import ml_collections
import numpy as np
import tensorflow as tf

from mnv2_flax import checkpointing
from mnv2_flax import defaults
from mnv2_flax import models
from mnv2_flax import preprocessing
from mnv2_flax.data import input_pipeline
from mnv2_flax.data import prepare
from mnv2_flax.train import training_state

ONNX_OPSET = 17


def eval_model(
  config: ml_collections.ConfigDict, num_classes: int
) -> models.MobileNetV2:
  """The run's model in float32 with Flax's own layers."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.update(dtype='float32', cpu_fast_path=False)
  return training_state.create_model(config, num_classes, axis_name=None)


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
  defaults.check_export(output, fmt, quantize, batch_size)
  config, variables = checkpointing.restore(workdir, step)
  config = defaults.with_defaults(config)
  if resolution:
    config.data.image_size = resolution
  size = config.data.image_size
  builder = prepare.get_builder(config)
  num_classes = prepare.dataset_meta(builder, config).num_classes
  serve = serving_fn(config, variables, num_classes, raw)
  shape = (batch_size, size, size, 3)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

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
