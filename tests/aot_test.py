"""The training programs for GPUs and TPUs, checked on this CPU host: they
lower for 'cuda' and 'tpu' with nothing that runs only on a CPU, and (with
libtpu installed) compile ahead of time for a TPU topology."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import quickstart
from mnv2_flax import models
from mnv2_flax.benchmark import aot
from mnv2_flax.cpu import fast_path
from mnv2_flax.cpu import kernels


@pytest.mark.parametrize(
  'name, config',
  [
    ('default (bf16, 224 px)', default.get_config()),
    ('quickstart', quickstart.get_config()),
  ],
)
@pytest.mark.slow
def test_train_and_eval_steps_lower_for_gpu_and_tpu(name, config):
  # Batches of 2 per device: lowering does not depend on the batch size.
  config.data.batch_size = config.data.eval_batch_size = 2
  lowered = aot.lower(config, ('cuda', 'tpu'))
  assert set(lowered) == {
    (p, s) for p in ('cuda', 'tpu') for s in ('train step', 'eval step')
  }
  for key, program in lowered.items():
    assert aot.problems(program) == [], (name, key)
  # The real steps: collectives for the gradient and BN averages, uint8
  # images in, bf16 convolutions in the default config.
  text = lowered['tpu', 'train step'].as_text()
  assert 'all_reduce' in text and 'ui8' in text
  if config.train.dtype == 'bfloat16':
    assert 'bf16' in text


def test_the_check_finds_what_would_not_run_on_an_accelerator():
  def lowered(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=('cuda',))

  x = jnp.zeros((1, 32, 32, 3))
  assert aot.problems(lowered(lambda x: jnp.tanh(x).sum(), x)) == []
  # A host callback does not even lower for another platform.
  with_callback = lambda x: jax.pure_callback(
    np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x
  )
  with pytest.raises(ValueError, match='lowering platform cuda'):
    lowered(with_callback, x)
  # float64.
  with jax.enable_x64(True):
    f64 = lowered(lambda x: x.astype(jnp.float64).sum(), x)
  assert aot.problems(f64) == ['float64 values']
  # The CPU layers' kernels, traced on this host.
  layers = fast_path.layers()
  if layers and kernels.available():
    model = models.MobileNetV2(num_classes=10, width_multiplier=0.35, **layers)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    found = aot.problems(
      lowered(lambda v, x: model.apply(v, x, train=False), variables, x)
    )
    assert found and all(p.startswith('custom call') for p in found), found


@pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason='libtpu not installed (make setup-tpu)',
)
@pytest.mark.slow
def test_a_deviceless_tpu_compile_reports_the_cost():
  # A small one (compile time); `make aot` compiles the default config.
  config = quickstart.get_config()
  config.model.width_multiplier = 0.35
  config.data.batch_size = 16
  cost = aot.tpu_cost(config, 'v5e:1x1')
  assert cost.devices == 1 and cost.per_device_batch == 16
  assert cost.gflop > 0 and cost.temp_gbytes > 0
  assert cost.mbytes_per_image == pytest.approx(cost.gbytes_accessed * 1e3 / 16)
  assert 'GFLOP' in cost.format()
