"""Bad input and faults in the library: one clear error, nothing written.

Each case runs `train_lib.train_and_evaluate` (or `checkpointing.restore`)
against a copy of a trained workdir and checks the message and that no file
in the workdir changed. The command-line side (exit status, no traceback) is
in cli_test.py.
"""

import os
import shutil
import subprocess

from fake_data import count_compiles
from fake_data import mount_tmpfs
from fake_data import snapshot
from fake_data import tiny_config
from fake_data import truncate_largest_array
import jax
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax import evaluate
from mnv2_flax.data import prepare
from mnv2_flax.train import divergence
from mnv2_flax.train import steps
from mnv2_flax.train import train_lib
from mnv2_flax.train import training_state

# Its tests share a trained module fixture: under `--dist loadgroup` one
# xdist worker runs them all (`make test`'s loadfile keeps a file together).
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope='module')
def trained(data_dirs, tmp_path_factory):
  """A workdir of the tiny config as an interrupted run leaves it: real
  checkpoints at steps 4 and 5 (of a random state: nothing here trains)
  and the run's model_stats.json."""
  config = tiny_config(data_dirs[1], num_epochs=1.0)
  workdir = tmp_path_factory.mktemp('trained')
  model = training_state.create_model(config, 10)
  abstract = training_state.abstract_train_state(
    config, model, training_state.create_learning_rate_fn(config, 5)
  )
  manager = checkpointing.create_manager(str(workdir), config)
  rng = np.random.default_rng(0)
  for step in (4, 5):  # random: array files are not compressed to nothing
    state = jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract
    )
    checkpointing.save(
      manager, step, state.replace(step=np.int32(step)), config
    )
  checkpointing.wait_until_finished(manager)
  manager.close()
  (workdir / 'model_stats.json').write_text('{"params": 408938}')
  return config, workdir


@pytest.fixture
def copy(trained, tmp_path):
  """(config, a fresh copy of the trained workdir, its snapshot)."""
  config, workdir = trained
  target = tmp_path / 'copy'
  shutil.copytree(workdir, target)
  return config.copy_and_resolve_references(), target, snapshot(target)


def _refused(config, workdir, error, words):
  with pytest.raises(error) as info:
    train_lib.train_and_evaluate(config, str(workdir))
  for word in words:
    assert word in str(info.value), str(info.value)
  return str(info.value)


# ------------------------------------------------------------ config values


@pytest.mark.parametrize(
  'field, value, words',
  [
    ('optim.learning_rte', 0.1, 'did you mean config.optim.learning_rate?'),
    ('data.crop_area_range', (0.1,), 'expected 2 numbers'),
    ('data.image_size', 100_000, 'config.data.image_size=100000'),
    ('data.image_size', 31, 'an integer in [32, 4096]'),
    ('checkpoint.keep', 0, 'config.checkpoint.keep=0'),
    ('checkpoint.every_steps', -1, 'config.checkpoint.every_steps=-1'),
    ('train.num_epochs', 0.0, 'config.train.num_epochs=0.0'),
    ('optim.schedule', 'linear', "config.optim.schedule='linear'"),
    ('data.process_sharding', 'rows', "'files' or 'batch'"),
    ('data.name', 'no_such_dataset', 'is not a tfds dataset'),
  ],
)
def test_bad_config_values_change_nothing(copy, field, value, words):
  config, workdir, before = copy
  section, name = field.split('.')
  with config.unlocked():
    if name in config[section]:
      del config[section][name]  # a new type, as a config file would give
    config[section][name] = value
  error = _refused(config, workdir, ValueError, [words])
  assert '\n' not in error
  assert snapshot(workdir) == before


def test_a_dataset_that_is_not_there_changes_nothing(copy, tmp_path):
  config, workdir, before = copy
  config.data.name = 'cifar10'
  config.data.data_dir = str(tmp_path / 'empty')
  _refused(config, workdir, prepare.DataError, ['cifar10 is not prepared'])
  assert snapshot(workdir) == before


# ----------------------------------------------------------------- workdirs


def test_a_workdir_that_is_a_file(trained, tmp_path):
  config, _ = trained
  path = tmp_path / 'file'
  path.write_text('mine')
  _refused(config, path, ValueError, ['is a file; expected a directory'])
  assert path.read_text() == 'mine'


def test_a_read_only_workdir_is_refused_before_the_data(trained, tmp_path):
  config, _ = trained
  workdir = tmp_path / 'ro'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  before = snapshot(workdir)
  # Root ignores permission bits: a read-only bind mount is read-only.
  if subprocess.run(
    ['mount', '--bind', '-o', 'ro', str(workdir), str(workdir)],
    capture_output=True,
    check=False,
  ).returncode:
    pytest.skip('cannot mount here (needs root)')
  try:
    subprocess.run(['mount', '-o', 'remount,ro,bind', str(workdir)], check=True)
    config = config.copy_and_resolve_references()
    config.data.name = 'not_read_before_the_workdir_check'
    _refused(config, workdir, ValueError, ['is not writable'])
  finally:
    subprocess.run(['umount', str(workdir)], check=False)
  assert snapshot(workdir) == before


# ---------------------------------------------------------------- resuming


def test_another_model_is_refused_before_writing_or_compiling(copy):
  config, workdir, before = copy
  config.model.width_multiplier = 0.5
  _, compiled = count_compiles(
    lambda: _refused(
      config,
      workdir,
      checkpointing.CheckpointMismatchError,
      ['does not match the model', 'params/'],
    )
  )
  assert compiled.total == 0, compiled.names
  assert snapshot(workdir) == before  # model_stats.json included


def test_an_empty_step_directory_is_named_not_a_mismatch(copy):
  config, workdir, _ = copy
  (workdir / 'checkpoints' / '7').mkdir()
  before = snapshot(workdir)
  _refused(
    config,
    workdir,
    checkpointing.CorruptCheckpointError,
    [
      'checkpoints/7 is incomplete',
      'Step 5 is the previous complete one',
      '--config.checkpoint.skip_corrupt=True',
    ],
  )
  assert snapshot(workdir) == before
  with pytest.raises(checkpointing.CorruptCheckpointError, match='7 is inc'):
    evaluate.evaluate_checkpoint(str(workdir))


@pytest.mark.slow
def test_a_truncated_array_file_is_named_with_the_previous_step(copy):
  config, workdir, _ = copy
  truncate_largest_array(workdir / 'checkpoints' / '5')
  before = snapshot(workdir)
  error = _refused(
    config,
    workdir,
    checkpointing.CorruptCheckpointError,
    ['checkpoints/5 is unreadable', 'Step 4 is the previous complete one'],
  )
  assert '\n' not in error
  assert snapshot(workdir) == before
  with pytest.raises(checkpointing.CorruptCheckpointError, match='5 is unre'):
    checkpointing.restore(str(workdir))
  _, variables = checkpointing.restore(str(workdir), step=4)  # still fine
  assert variables['params']['classifier']['bias'].shape == (10,)


def test_unreadable_metadata_is_named_not_a_mismatch(copy):
  config, workdir, _ = copy
  metadata = workdir / 'checkpoints' / '5' / 'state' / '_METADATA'
  metadata.write_bytes(metadata.read_bytes()[:100])
  before = snapshot(workdir)
  _refused(
    config,
    workdir,
    checkpointing.CorruptCheckpointError,
    ['checkpoints/5 is unreadable', 'Step 4 is the previous complete one'],
  )
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_skip_corrupt_moves_the_step_aside_and_restores_the_previous(copy):
  config, workdir, _ = copy
  truncate_largest_array(workdir / 'checkpoints' / '5')
  manager = checkpointing.create_manager(str(workdir), config)
  model = training_state.create_model(config, 10)
  lr = training_state.create_learning_rate_fn(config, 5)
  abstract = training_state.abstract_train_state(config, model, lr)
  state, step = checkpointing.restore_latest(
    manager, abstract, config, skip_corrupt=True
  )
  assert step == 4 and int(state.step) == 4
  assert manager.all_steps() == [4]
  assert os.listdir(workdir / 'corrupt_checkpoints') == ['5']  # kept


def test_a_save_without_the_space_for_it_writes_nothing(trained, tmp_path):
  config, workdir = trained
  disk = tmp_path / 'disk'
  disk.mkdir()
  if not mount_tmpfs(disk, '1m'):
    pytest.skip('cannot mount a tmpfs here (needs root)')
  try:
    manager = checkpointing.create_manager(str(disk / 'run'), config)
    _, state = checkpointing.restore(str(workdir))
    with pytest.raises(
      checkpointing.CheckpointSaveError,
      match=r'not enough disk space to save step 6 in .*: [0-9.]+ MiB free',
    ) as info:
      checkpointing.save(manager, 6, state, config)
    assert 'No checkpoint was completed before.' in str(info.value)
    assert os.listdir(disk / 'run' / 'checkpoints') == []
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)


def test_a_killed_save_leaves_nothing_behind_at_the_next_start(copy):
  config, workdir, _ = copy
  partial = workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-1234'
  shutil.copytree(workdir / 'checkpoints' / '5', partial)
  manager = checkpointing.create_manager(str(workdir), config)
  assert manager.latest_step() == 5
  assert not partial.exists()


# -------------------------------------------------------------- divergence


@pytest.fixture(scope='module')
def diverged(data_dirs, tmp_path_factory):
  """Learning rate 1e6, a save every step, a log every 5: (config, workdir,
  the error)."""
  config = tiny_config(data_dirs[1], num_epochs=2.0, log_every_steps=5)
  config.optim.learning_rate = 1e6
  config.checkpoint.update(every_steps=1, keep=2)
  workdir = tmp_path_factory.mktemp('diverged')
  with pytest.raises(divergence.TrainingDivergedError) as info:
    train_lib.train_and_evaluate(config, str(workdir))
  return config, workdir, str(info.value)


@pytest.mark.slow
def test_divergence_never_saves_a_non_finite_state(diverged):
  _, workdir, error = diverged
  steps = sorted(
    int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit()
  )
  # The message names the step it stopped at and the kept one before it.
  stopped = int(error.split('diverged at step ')[1].split(':')[0])
  assert steps[-1] == stopped - 1, (steps, error)
  assert f'the last checkpoint, step {stopped - 1} (finite' in error
  for step in steps:
    _, variables = checkpointing.restore(str(workdir), step=step)
    for leaf in jax.tree.leaves(variables):
      assert np.isfinite(np.asarray(leaf)).all(), step


@pytest.mark.slow
def test_resuming_a_diverged_run_unchanged_is_refused(diverged):
  config, workdir, _ = diverged
  before = snapshot(workdir)
  _refused(
    config,
    workdir,
    divergence.TrainingDivergedError,
    ['this run diverged at step', 'it would diverge again', 'diverged.json'],
  )
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_resuming_a_diverged_run_with_a_changed_config_warns(
  diverged, absl_log
):
  config, workdir, _ = diverged
  config = config.copy_and_resolve_references()
  config.optim.learning_rate = 0.01
  divergence.check_resumable(str(workdir), config)  # no error
  assert 'config.optim.learning_rate: 1000000.0 -> 0.01' in absl_log.text


@pytest.mark.slow
def test_the_finite_flag_sees_a_single_inf_anywhere():
  config = tiny_config()
  model = training_state.create_model(config, 10, axis_name=None)
  abstract = training_state.abstract_train_state(
    config, model, training_state.create_learning_rate_fn(config, 10)
  )
  state = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract)
  flag = jax.jit(steps.all_finite)  # what train_step returns as 'finite'
  assert bool(flag(np.float32(2.3), state))
  assert not bool(flag(np.float32(np.nan), state))
  assert bool(flag(np.float32(3e38), state))  # large is still finite
  for tree in ('params', 'ema_params', 'batch_stats'):
    leaves, treedef = jax.tree.flatten(getattr(state, tree))
    leaves[-1] = leaves[-1].copy()
    leaves[-1].flat[0] = np.inf
    bad = state.replace(**{tree: jax.tree.unflatten(treedef, leaves)})
    assert not bool(flag(np.float32(1.0), bad)), tree
