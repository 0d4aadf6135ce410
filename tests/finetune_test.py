"""Fine-tuning: `config.init_from` sources, the classifier swap, mismatches,
a frozen backbone and frozen BatchNorm."""

import os

from convert_test import TIMM_FIXTURES
from fake_data import tiny_config
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax import convert
from mnv2_flax import defaults
from mnv2_flax.train import finetune
from mnv2_flax.train import steps
from mnv2_flax.train import training_state

# Its tests share a trained module fixture: under `--dist loadgroup` one
# xdist worker runs them all (`make test`'s loadfile keeps a file together).
pytestmark = pytest.mark.xdist_group(__name__)


def _fresh_state(config, num_classes, seed):
  model = training_state.create_model(config, num_classes, axis_name=None)
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=10)
  return training_state.create_train_state(
    config, model, lr, jax.random.key(seed)
  )


def _flat(tree):
  return {
    '/'.join(k): np.asarray(v)
    for k, v in traverse_util.flatten_dict(dict(tree)).items()
  }


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A real Orbax checkpoint of a 10-class run whose EMA and raw parameters
  differ (EMA = raw + 1)."""
  config = tiny_config(cpu_fast_path=False)
  state = _fresh_state(config, 10, seed=0)
  state = state.replace(ema_params=jax.tree.map(lambda p: p + 1, state.params))
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  manager = checkpointing.create_manager(workdir, config)
  checkpointing.save(manager, 3, state, config)
  checkpointing.wait_until_finished(manager)
  manager.close()
  return workdir, state


@pytest.mark.slow
def test_another_class_count_loads_everything_but_the_classifier(
  saved_run, absl_log
):
  workdir, source = saved_run
  config = tiny_config(cpu_fast_path=False)
  config.init_from = workdir
  fresh = _fresh_state(config, 7, seed=1)
  state = finetune.load(fresh, config)
  got, ema = _flat(state.params), _flat(source.ema_params)
  for path, value in got.items():
    if path.startswith('classifier/'):
      np.testing.assert_array_equal(value, _flat(fresh.params)[path])
    else:
      np.testing.assert_array_equal(value, ema[path])
  assert got['classifier/kernel'].shape[-1] == 7
  jax.tree.map(
    np.testing.assert_array_equal, state.batch_stats, source.batch_stats
  )
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)
  assert 'has 10 classes, this run 7 classes' in absl_log.text

  # The raw parameters, a step directory, and a regex kept fresh.
  config.init_from = os.path.join(workdir, 'checkpoints', '3')
  config.init_from_ema, config.init_reset = False, '^block_17/'
  state = finetune.load(fresh, config)
  got, raw = _flat(state.params), _flat(source.params)
  np.testing.assert_array_equal(
    got['stem_conv/kernel'], raw['stem_conv/kernel']
  )
  for path in got:
    if path.startswith('block_17/'):
      np.testing.assert_array_equal(got[path], _flat(fresh.params)[path])
  assert 'Kept fresh (config.init_reset): block_17/' in absl_log.text


@pytest.mark.slow
def test_another_width_stops_with_every_entry_named(saved_run):
  workdir, _ = saved_run
  config = tiny_config(cpu_fast_path=False)
  config.model.width_multiplier = 0.5
  config.init_from = workdir
  with pytest.raises(finetune.InitFromError) as error:
    finetune.load(_fresh_state(config, 10, seed=0), config)
  message = str(error.value)
  assert (
    'params/block_03/depthwise_conv/kernel has shape (3, 3, 1, 48), ' in message
  )
  assert 'this run (3, 3, 1, 96)' in message and '181 more.' in message
  assert 'width_multiplier=0.35 there, 0.5 here' in message


@pytest.mark.slow
def test_timm_and_keras_files(tmp_path, absl_log):
  from safetensors import numpy as safetensors_np

  meta, state_dict, _ = TIMM_FIXTURES['mobilenetv2_035']
  path = str(tmp_path / 'timm.safetensors')
  safetensors_np.save_file(state_dict, path)
  config = tiny_config(cpu_fast_path=False)
  config.init_from = path
  config.model.update(padding='torch', bn_epsilon=1e-5)
  state = finetune.load(_fresh_state(config, 10, seed=0), config)
  expected = convert.from_timm(state_dict, width_multiplier=0.35)
  jax.tree.map(np.testing.assert_array_equal, state.params, expected['params'])
  assert 'timm state dict' in absl_log.text and 'WARNING' not in absl_log.text

  # The TF-padded model with torch weights loads, with a warning.
  config.model.update(padding='tf', bn_epsilon=1e-3)
  finetune.load(_fresh_state(config, 10, seed=0), config)
  assert "trained with padding='torch'" in absl_log.text

  import keras

  keras_file = str(tmp_path / 'notop.keras')
  keras.applications.MobileNetV2(
    alpha=0.35, include_top=False, weights=None, input_shape=(32, 32, 3)
  ).save(keras_file)
  config.init_from = keras_file
  state = finetune.load(_fresh_state(config, 10, seed=0), config)
  expected = convert.from_keras(keras_file)
  np.testing.assert_array_equal(
    state.params['head_conv']['kernel'],
    expected['params']['head_conv']['kernel'],
  )
  assert 'Keras has none, this run 10 classes' in absl_log.text


@pytest.mark.parametrize(
  'make, words',
  [
    (lambda d: d + '/absent', ['does not exist', 'workdir or step directory']),
    (lambda d: _write(d, 'w.pth', b'x'), ['pickle file', 'safetensors']),
    (lambda d: _write_sd(d, {'fc.weight': np.zeros(2)}), ['neither a timm']),
    (lambda d: _write(d, 'w.txt', b'x'), ['not a state dict file']),
  ],
)
def test_bad_sources_give_one_clear_error(tmp_path, make, words):
  config = tiny_config(cpu_fast_path=False)
  config.init_from = make(str(tmp_path))
  with pytest.raises(ValueError) as error:
    defaults.check(config)
    finetune.read(config.init_from, config)
  assert f'config.init_from={config.init_from!r}' in str(error.value)
  for word in words:
    assert word in str(error.value)


def test_bad_init_reset_regex_is_named():
  config = tiny_config()
  config.init_reset = 'classifier/('
  with pytest.raises(ValueError, match=r"config.init_reset='classifier/\('"):
    defaults.check(config)


def _write(directory, name, data):
  path = os.path.join(directory, name)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def _write_sd(directory, state_dict):
  from safetensors import numpy as safetensors_np

  path = os.path.join(directory, 'other.safetensors')
  safetensors_np.save_file(state_dict, path)
  return path


@pytest.mark.slow
def test_frozen_backbone_and_batch_norm_train_only_the_classifier():
  config = tiny_config(cpu_fast_path=False)
  config.optim.freeze_backbone = True
  config.model.bn_frozen = True
  state = _fresh_state(config, 10, seed=0)
  rng = np.random.default_rng(0)
  batch = {
    'image': jnp.asarray(rng.uniform(0, 255, (8, 32, 32, 3)), jnp.float32),
    'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
  }
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=10)
  step = jax.jit(
    lambda s, b: steps.train_step(
      s,
      b,
      jax.random.key(0),
      training_state.hyperparameters(config),
      config=config,
      learning_rate_fn=lr,
      axis_name=None,
    )
  )
  new, metrics = step(state, batch)
  new, metrics = step(new, batch)
  assert np.isfinite(metrics['loss'])
  before, after = _flat(state.params), _flat(new.params)
  changed = [p for p in before if not np.array_equal(before[p], after[p])]
  assert changed == ['classifier/bias', 'classifier/kernel']
  jax.tree.map(
    np.testing.assert_array_equal, new.batch_stats, state.batch_stats
  )
  # Frozen BN normalises with the running statistics in training too.
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  model = training_state.create_model(config, 10, axis_name=None)
  train_logits, _ = model.apply(
    variables, batch['image'], train=True, mutable=['batch_stats']
  )
  np.testing.assert_allclose(
    train_logits, model.apply(variables, batch['image']), rtol=1e-6, atol=1e-6
  )
