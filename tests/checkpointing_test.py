"""Orbax checkpoints: restore anywhere, refuse mismatches, plain orbax reads."""

import json
import os
import shutil
import textwrap

from fake_data import run_on_fake_devices
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mnv2_flax import checkpointing
from mnv2_flax import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# Trains 3 steps with N fake devices (or restores and compares, see below).
_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax, numpy as np
    jax.config.update('jax_disable_most_optimizations', True)
    from train_lib_test import tiny_config
    from mnv2_flax import checkpointing, train_lib
    assert jax.local_device_count() == {devices}
    if {train}:
      config = tiny_config({data_dir!r}, num_epochs=0.6)  # 3 steps of 8
      config.data.batch_size = 8
      train_lib.train_and_evaluate(config, {workdir!r})
    _, variables = checkpointing.restore({workdir!r})
    np.savez({out!r}, **{{'/'.join(str(getattr(k, 'key', k)) for k in path): x
                          for path, x in jax.tree_util.tree_flatten_with_path(
                              variables)[0]}})
    print('RESULT' + json.dumps({{'devices': jax.local_device_count()}}))
""")


def _run(devices, *, train, data_dir, workdir, out):
  script = _SCRIPT.format(
    root=ROOT,
    tests=TESTS,
    devices=devices,
    train=train,
    data_dir=data_dir,
    workdir=str(workdir),
    out=str(out),
  )
  assert run_on_fake_devices(script, devices)['devices'] == devices
  return dict(np.load(out))


def _flat(variables):
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]
  }


@pytest.fixture(scope='module')
def trained_on_4(data_dirs, tmp_path_factory):
  """A workdir trained 3 steps on 4 fake devices, and its variables."""
  workdir = tmp_path_factory.mktemp('four')
  saved = _run(
    4,
    train=True,
    data_dir=data_dirs[1],
    workdir=workdir,
    out=workdir / 'saved.npz',
  )
  return workdir, saved


def test_saved_on_4_devices_restores_on_1(trained_on_4):
  workdir, saved = trained_on_4
  config, variables = checkpointing.restore(str(workdir))
  assert config.data.batch_size == 8 and config.model.width_multiplier == 0.35
  assert set(variables) == {'params', 'batch_stats', 'ema_params'}
  flat = _flat(variables)
  assert flat.keys() == saved.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(value, saved[key])
  leaf = variables['params']['stem_conv']['kernel']
  assert leaf.sharding.device_set == {jax.local_devices()[0]}


def test_saved_on_1_device_restores_on_4(data_dirs, tmp_path):
  from train_lib_test import tiny_config  # pylint: disable=g-import-not-at-top

  config = tiny_config(data_dirs[1], num_epochs=0.6)
  train_lib.train_and_evaluate(config, str(tmp_path))
  _, mine = checkpointing.restore(str(tmp_path))
  theirs = _run(
    4,
    train=False,
    data_dir=data_dirs[1],
    workdir=tmp_path,
    out=tmp_path / 'restored.npz',
  )
  for key, value in _flat(mine).items():
    np.testing.assert_array_equal(value, theirs[key])


def test_restore_accepts_workdir_checkpoints_dir_and_step_dir(trained_on_4):
  workdir, saved = trained_on_4
  step_dir = workdir / 'checkpoints' / '3'
  for path, step in (
    (workdir / 'checkpoints', None),
    (step_dir, None),
    (workdir, 3),
  ):
    _, variables = checkpointing.restore(str(path), step=step)
    np.testing.assert_array_equal(
      variables['params']['classifier']['bias'], saved['params/classifier/bias']
    )
  with pytest.raises(ValueError, match='step=7 is not in'):
    checkpointing.restore(str(workdir), step=7)
  with pytest.raises(FileNotFoundError):
    checkpointing.restore(str(workdir / 'nothing'))


def test_mismatched_model_is_refused_naming_entries(trained_on_4):
  workdir, _ = trained_on_4
  from train_lib_test import tiny_config  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  model = train_lib.create_model(config, num_classes=7, axis_name=None)
  target = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  )
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    checkpointing.restore(str(workdir), target=target)
  message = str(error.value)
  assert (
    'params/classifier/bias: checkpoint has (10,), model expects (7,)'
    in message
  )
  assert 'params/stem_conv/kernel' not in message  # only what differs

  # Resuming training into another width is refused the same way.
  config.model.width_multiplier = 0.5
  model = train_lib.create_model(config, num_classes=10, axis_name=None)
  lr = train_lib.create_learning_rate_fn(config, 10)
  state = train_lib.abstract_train_state(config, model, lr)
  manager = checkpointing.create_manager(str(workdir), config, read_only=True)
  with pytest.raises(
    checkpointing.CheckpointMismatchError,
    match=r'params/block_02/project_conv/kernel: checkpoint '
    r'has \(1, 1, 48, 8\), model expects '
    r'\(1, 1, 48, 16\)',
  ):
    checkpointing.restore_latest(manager, state, config)


def test_plain_orbax_reads_the_checkpoint(trained_on_4):
  workdir, saved = trained_on_4
  step_dir = os.path.join(str(workdir), 'checkpoints', '3')
  # No mnv2_flax involved: the layout documented in the README. Saved on 4
  # devices, so the target says where the arrays go now.
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(step_dir, 'state')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
    checkpointer.metadata(path).item_metadata,
  )
  state = checkpointer.restore(path, target)
  with open(os.path.join(step_dir, 'config', 'metadata')) as f:
    config = json.load(f)
  assert config['model']['width_multiplier'] == 0.35
  assert int(state['step']) == 3
  np.testing.assert_array_equal(
    state['params']['head_conv']['kernel'], saved['params/head_conv/kernel']
  )


def test_a_killed_save_is_never_taken_for_a_checkpoint(trained_on_4, tmp_path):
  workdir, saved = trained_on_4
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  # What a save killed half-way leaves: orbax's temporary directory.
  partial = copy / 'checkpoints' / '9.orbax-checkpoint-tmp'
  shutil.copytree(copy / 'checkpoints' / '3', partial)
  (partial / 'state' / 'manifest.ocdbt').unlink(missing_ok=True)
  _, variables = checkpointing.restore(str(copy))
  np.testing.assert_array_equal(
    variables['params']['classifier']['bias'], saved['params/classifier/bias']
  )
  from train_lib_test import tiny_config  # pylint: disable=g-import-not-at-top

  manager = checkpointing.create_manager(str(copy), tiny_config())
  assert manager.latest_step() == 3
