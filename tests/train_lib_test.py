"""Tests of the train state, steps, optimizer and the training loop."""

import functools
import glob
import json
import os
import re
import shutil
import subprocess
import textwrap

import chex
from fake_data import count_compiles
from fake_data import logged
from fake_data import mount_tmpfs
from fake_data import run_on_fake_devices
from fake_data import tiny_config
from fake_data import truncate_largest_array
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax import checkpointing
from mnv2_flax import preprocessing
from mnv2_flax.train import programs
from mnv2_flax.train import steps
from mnv2_flax.train import train_lib
from mnv2_flax.train import training_state

# Its tests share a trained module fixture: under `--dist loadgroup` one
# xdist worker runs them all (`make test`'s loadfile keeps a file together).
pytestmark = pytest.mark.xdist_group(__name__)

# First-step loss for seed 0 (TF-slim init, width 0.35, res 32, float32, CPU).
GOLDEN_FIRST_LOSS = 4.347808
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_and_step(config, axis_name=None):
  model = training_state.create_model(config, 10, axis_name=axis_name)
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=10)
  state = training_state.create_train_state(
    config, model, lr, jax.random.key(0)
  )
  step = functools.partial(
    steps.train_step,
    hparams=training_state.hyperparameters(config),
    config=config,
    learning_rate_fn=lr,
    axis_name=axis_name,
  )
  return state, step


def _fixed_batch(n=8, size=32):
  """Pixels in [0, 255] (float: the steps normalise any dtype)."""
  rng = np.random.default_rng(0)
  pixels = (rng.uniform(-1, 1, (n, size, size, 3)) + 1) * 127.5
  return {
    'image': jnp.asarray(pixels, jnp.float32),
    'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32),
  }


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch_and_golden_first_loss():
  config = tiny_config()
  state, step = _state_and_step(config)
  step = jax.jit(step)
  batch = _fixed_batch()
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  np.testing.assert_allclose(losses[0], GOLDEN_FIRST_LOSS, rtol=1e-3)
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 15
  # The EMA follows the parameters but lags behind them.
  leaf = lambda t: t['classifier']['kernel']  # noqa: E731
  assert not np.allclose(leaf(state.ema_params), leaf(state.params))


_PMAP_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update('jax_disable_most_optimizations', True)
    from fake_data import tiny_config
    from train_lib_test import _fixed_batch
    from mnv2_flax.train import steps, training_state
    config = tiny_config()
    model = training_state.create_model(config, 10)
    lr = training_state.create_learning_rate_fn(config, steps_per_epoch=10)
    state = training_state.create_train_state(
        config, model, lr, jax.random.key(0))
    step = functools.partial(
        steps.train_step, config=config, learning_rate_fn=lr,
        hparams=training_state.hyperparameters(config))
    batch = _fixed_batch()
    out = {{}}
    for n in (1, {devices}):
      p_step = jax.pmap(step, axis_name='batch', in_axes=(None, 0, None),
                        out_axes=(None, None), devices=jax.devices()[:n])
      sharded = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
      # Placed as the step returns it: one compile per n, not two.
      mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('batch',))
      placed = jax.device_put(state, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))
      new, metrics = p_step(placed, sharded, jax.random.key(1))
      new, metrics = p_step(new, sharded, jax.random.key(1))
      out[n] = dict(loss=float(metrics['loss']),
                    params=[np.asarray(x).tolist() for x in
                            jax.tree.leaves(new.params)[:6]],
                    stats=[np.asarray(x).tolist() for x in
                           jax.tree.leaves(new.batch_stats)[:6]],
                    max_param_diff=0.0)
      out.setdefault('leaves', []).append(new)
    # Per device: the BN running statistics the step returns agree to the
    # bit on every device without an average of their own.
    p_each = jax.pmap(step, axis_name='batch', in_axes=(None, 0, None),
                      out_axes=(0, None), devices=jax.devices()[:{devices}])
    each, _ = p_each(placed, sharded, jax.random.key(1))
    stats_agree = all(bool((x == x[0]).all())
                      for x in jax.tree.leaves(each.batch_stats))
    a, b = out.pop('leaves')
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    rows = [(float(np.abs(np.asarray(x) - np.asarray(y)).max()),
             float(np.abs(np.asarray(x)).max()), jax.tree_util.keystr(path))
            for (path, x), y in zip(flat_a, jax.tree.leaves(b))]
    print('RESULT' + json.dumps(dict(loss1=out[1]['loss'],
                                     lossn=out[{devices}]['loss'],
                                     stats_agree=stats_agree,
                                     rows=rows)))
""")


@pytest.mark.slow
def test_pmap_step_on_4_devices_equals_1_device_whole_batch():
  script = _PMAP_SCRIPT.format(
    root=ROOT, tests=os.path.dirname(__file__), devices=4
  )
  out = run_on_fake_devices(script, 4)
  np.testing.assert_allclose(out['lossn'], out['loss1'], rtol=1e-5)
  assert out['stats_agree']
  # Params, batch_stats, opt state and EMA after two steps, leaf by leaf:
  # relative to each leaf's scale (float32 sums over the batch in another
  # order), except leaves that are ~0 (BN biases
  # whose gradient is analytically zero: a conv and a train-mode BN follow
  # them), where only float32 noise differs.
  assert len(out['rows']) > 200
  for diff, scale, name in out['rows']:
    assert diff <= 5e-4 * scale + 1e-4, (name, diff, scale)


@pytest.mark.slow
def test_eval_step_flip_average():
  config = tiny_config()
  state, _ = _state_and_step(config)
  batch = dict(_fixed_batch(), mask=jnp.array([1.0] * 7 + [0.0]))
  plain = steps.eval_step(state, batch, axis_name=None)
  both = steps.eval_step(state, batch, flip_average=True, axis_name=None)
  assert set(both) == set(plain) | {
    f'{p}flip_{m}' for p in ('', 'ema_') for m in ('loss', 'top1', 'top5')
  }
  for key, value in plain.items():  # the plain metrics stay single-view
    np.testing.assert_allclose(both[key], value, rtol=1e-6)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def probs(images):
    images = preprocessing.normalize(images, config.data.normalization)
    return np.asarray(
      jax.nn.softmax(state.apply_fn(variables, images, train=False))
    )

  mean = (probs(batch['image']) + probs(batch['image'][:, :, ::-1])) / 2
  labels, mask = np.asarray(batch['label']), np.asarray(batch['mask'])
  np.testing.assert_allclose(
    both['flip_top1'], ((mean.argmax(-1) == labels) * mask).sum()
  )
  np.testing.assert_allclose(
    both['flip_loss'],
    (-np.log(mean[np.arange(8), labels]) * mask).sum(),
    rtol=1e-5,
  )
  # Mirror-symmetric images: averaging with the mirror changes nothing.
  symmetric = dict(
    batch, image=(batch['image'] + batch['image'][:, :, ::-1]) / 2
  )
  out = steps.eval_step(state, symmetric, flip_average=True, axis_name=None)
  for m in ('loss', 'top1', 'top5'):
    np.testing.assert_allclose(out[f'flip_{m}'], out[m], rtol=1e-5)


@pytest.mark.slow
def test_weight_decay_masks():
  config = tiny_config()
  state, _ = _state_and_step(config)
  slim = training_state.weight_decay_mask(state.params, 'tf_slim')
  assert slim['block_05']['expand_conv']['kernel']
  assert slim['classifier']['kernel']
  assert not slim['block_05']['depthwise_conv']['kernel']
  assert not slim['block_05']['expand_bn']['scale']
  assert not slim['classifier']['bias']
  no_norm = training_state.weight_decay_mask(state.params, 'no_norm')
  assert no_norm['block_05']['depthwise_conv']['kernel']
  assert no_norm['classifier']['bias']
  assert not no_norm['head_bn']['bias']


def test_learning_rate_schedules():
  config = tiny_config()
  config.data.batch_size = 192
  config.optim.update(
    schedule='exponential',
    learning_rate=0.045,
    lr_reference_batch=96,
    decay_rate=0.98,
    decay_epochs=2.5,
    warmup_epochs=0.0,
  )
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=100)
  np.testing.assert_allclose(lr(0), 0.09, rtol=1e-6)  # scaled with batch
  np.testing.assert_allclose(lr(249), 0.09, rtol=1e-6)  # staircase
  np.testing.assert_allclose(lr(250), 0.09 * 0.98, rtol=1e-6)
  np.testing.assert_allclose(lr(1000), 0.09 * 0.98**4, rtol=1e-6)
  config.optim.update(schedule='cosine', warmup_epochs=1.0)
  config.train.num_epochs = 3
  lr = training_state.create_learning_rate_fn(config, steps_per_epoch=100)
  np.testing.assert_allclose(lr(50), 0.045, rtol=1e-6)  # half-way warm-up
  np.testing.assert_allclose(lr(100), 0.09, rtol=1e-6)
  np.testing.assert_allclose(lr(200), 0.045, rtol=1e-5)  # cosine midpoint
  assert float(lr(300)) < 1e-6


def test_rmsprop_has_tf1_semantics():
  config = tiny_config()
  config.optim.update(
    optimizer='rmsprop_tf',
    weight_decay=0.0,
    schedule='constant',
    learning_rate=0.1,
    lr_reference_batch=8,
    warmup_epochs=0.0,
  )
  tx = training_state.create_optimizer(config, lambda _: 0.1)
  params = {'w': jnp.array([1.0])}
  grads = {'w': jnp.array([2.0])}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # ms starts at 1: ms = 0.9 + 0.1 * g^2; update = lr * g / sqrt(ms + eps).
  ms = 0.9 * 1.0 + 0.1 * 4.0
  np.testing.assert_allclose(
    updates['w'], [-0.1 * 2.0 / np.sqrt(ms + 1.0)], rtol=1e-6
  )
  updates, _ = tx.update(grads, state, params)
  ms2 = 0.9 * ms + 0.1 * 4.0
  mom = 0.9 * 0.1 * 2.0 / np.sqrt(ms + 1.0) + 0.1 * 2.0 / np.sqrt(ms2 + 1.0)
  np.testing.assert_allclose(updates['w'], [-mom], rtol=1e-6)


def test_adamw_decay_is_decoupled_and_masked():
  config = tiny_config()
  config.optim.update(
    optimizer='adamw', weight_decay=0.5, weight_decay_mask='tf_slim'
  )
  tx = training_state.create_optimizer(config, lambda _: 0.1)
  params = {
    'expand_conv': {'kernel': jnp.array([2.0])},
    'depthwise_conv': {'kernel': jnp.array([2.0])},
    'expand_bn': {'scale': jnp.array([2.0])},
  }
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Zero gradients: only the decoupled decay, lr * wd * w, where masked.
  np.testing.assert_allclose(updates['expand_conv']['kernel'], [-0.1])
  np.testing.assert_allclose(updates['depthwise_conv']['kernel'], [0.0])
  np.testing.assert_allclose(updates['expand_bn']['scale'], [0.0])


@pytest.mark.parametrize(
  'field, value, words',
  [
    ('optim.optimizer', 'adam', "config.optim.optimizer='adam'"),
    ('optim.schedule', 'step', "config.optim.schedule='step'"),
    ('train.num_epochs', 0.0, 'config.train.num_epochs=0.0'),
    ('data.batch_size', 0, 'config.data.batch_size=0'),
    ('data.image_size', 8, 'config.data.image_size=8'),
    ('train.cpu_fast_path', None, 'config.train.cpu_fast_path=None'),
  ],
)
def test_config_errors(field, value, words):
  config = tiny_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=words.replace('.', r'\.')):
    train_lib.check_config(config)


def _final_params(workdir):
  _, variables = checkpointing.restore(workdir)
  return variables


@pytest.fixture(scope='module')
def full_run(data_dirs, tmp_path_factory):
  """10 steps (32 of the 40 examples, batch 8, 2.5 epochs; the other 8 held
  out as the minival split), evaluating at step 5 too.

  Returns (config, result, workdir, its `fake_data.Compiles`).
  """
  _, data_dir = data_dirs
  config = tiny_config(data_dir, num_epochs=2.5, eval_every_steps=5)
  config.data.update(train_split='train[:32]', minival_split='train[32:]')
  config.checkpoint.every_steps = 5
  workdir = tmp_path_factory.mktemp('full')
  result, compiled = count_compiles(
    lambda: train_lib.train_and_evaluate(config, str(workdir))
  )
  return config, result, workdir, compiled


@pytest.mark.slow
def test_a_run_writes_results_stats_events_and_checkpoints(full_run):
  _, result, workdir, _ = full_run
  assert result['num_examples'] == 23 and result['finished']
  assert 0.0 <= result['top1'] <= 1.0 and 'ema_flip_top5' in result
  # The held-out examples, evaluated beside the test split and labelled.
  assert result['minival_num_examples'] == 8
  assert 0.0 <= result['minival_ema_top1'] <= 1.0
  assert (result['eval_split'], result['minival_split']) == (
    'test',
    'train[32:]',
  )
  assert result['bits_depend_on']['backend'] == 'cpu'
  assert result['steps'] == result['completed_steps'] == 10
  assert result['macs'] > 0 and result['images_per_second'] > 0
  # The run's wall time: training, evaluation (twice here) and the rest.
  assert result['eval_seconds'] > 0 and result['fixed_seconds'] > 0
  assert result['wall_seconds'] == pytest.approx(
    result['train_seconds'] + result['eval_seconds'] + result['fixed_seconds']
  )
  assert json.loads((workdir / 'results.json').read_text()) == result
  assert glob.glob(str(workdir / 'events.out.tfevents.*'))
  stats = json.loads((workdir / 'model_stats.json').read_text())
  assert stats['params'] == result['params']
  steps = [p.name for p in (workdir / 'checkpoints').iterdir()]
  assert sorted(int(s) for s in steps if s.isdigit()) == [5, 10]


@pytest.mark.slow
def test_a_run_compiles_its_steps_ahead_and_never_again(full_run):
  # The train step and the eval step (the run evaluates at step 5) are
  # compiled before training, and not again once it runs (not the step for
  # the state the first step returns); the loop's other compiles are small
  # eager ops (an add of eval sums).
  *_, compiles = full_run
  assert compiles.steps == 2, compiles.names
  assert compiles.steps_in_loop == 0, compiles.names


@pytest.mark.slow
def test_a_finished_run_is_not_run_again(full_run, absl_log):
  config, result, workdir, _ = full_run
  again = train_lib.train_and_evaluate(config, str(workdir))
  assert again == result and 'Already finished' in absl_log.text


@pytest.fixture(scope='module')
def resumed_run(data_dirs, full_run, tmp_path_factory):
  """The full run's config stopped after step 6, then run again.

  Returns (workdir, log of the second run, log of the first). Each run
  builds its programs itself (none kept from an earlier run in this
  process), so that both logs name them.
  """
  config = full_run[0].copy_and_resolve_references()
  config.train.eval_every_steps = 1000
  workdir = tmp_path_factory.mktemp('interrupted')
  config.train.stop_after_step = 6
  programs.forget()
  partial, first_log = logged(
    lambda: train_lib.train_and_evaluate(config, str(workdir))
  )
  assert partial['completed_steps'] == 6 and not partial['finished']
  config.train.stop_after_step = 0
  programs.forget()
  _, log = logged(lambda: train_lib.train_and_evaluate(config, str(workdir)))
  return workdir, log, first_log


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_parameters(
  full_run, resumed_run
):
  workdir, log, _ = resumed_run
  assert 'Resuming from step 6 of 10' in log
  chex.assert_trees_all_close(
    _final_params(workdir), _final_params(full_run[2]), rtol=1e-6, atol=1e-6
  )


@pytest.mark.slow
def test_a_resumed_run_lowers_the_same_train_step_as_a_fresh_one(resumed_run):
  # The same program, so the same persistent-cache entry: with a weakly
  # typed step in the fresh state every resume once compiled it again.
  _, log, first_log = resumed_run
  program = re.compile(r'Train step: program (\w+)\.')
  fresh, resumed = program.findall(first_log), program.findall(log)
  assert len(fresh) == len(resumed) == 1 and fresh == resumed


@pytest.mark.slow
def test_a_resume_names_the_config_fields_that_changed(resumed_run):
  # Only the field this test changed: the config's tuples equal the lists
  # they were saved as.
  _, log, _ = resumed_run
  assert (
    'differs from the saved one: config.train.stop_after_step: 6 -> 0.' in (log)
  )


@pytest.mark.slow
def test_a_corrupt_last_step_resumes_from_the_previous_to_the_same_end(
  full_run, tmp_path
):
  config, _, workdir, _ = full_run
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  os.remove(copy / 'results.json')  # interrupted after its last save
  truncate_largest_array(copy / 'checkpoints' / '10')
  with pytest.raises(checkpointing.CorruptCheckpointError, match='Step 5 is'):
    train_lib.train_and_evaluate(config, str(copy))
  config = config.copy_and_resolve_references()
  config.checkpoint.skip_corrupt = True
  result = train_lib.train_and_evaluate(config, str(copy))
  assert result['finished']
  assert os.listdir(copy / 'corrupt_checkpoints') == ['10']
  chex.assert_trees_all_close(
    _final_params(copy), _final_params(workdir), rtol=1e-6, atol=1e-6
  )


# TensorStore's writes that fail after the save gave up report to nobody.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.slow
def test_a_disk_full_mid_save_then_the_same_command_finishes_as_before(
  full_run, tmp_path, monkeypatch
):
  """On a 10 MB disk a checkpoint (~6 MB) fits once: the disk fills during
  the write of step 10 (the free-space check blinded, as when another
  process fills the disk); with space again the same config finishes with
  the uninterrupted run's parameters."""
  config, _, workdir, _ = full_run
  disk = tmp_path / 'disk'
  disk.mkdir()
  if not mount_tmpfs(disk, '10m'):
    pytest.skip('cannot mount a tmpfs here (needs root)')
  run = disk / 'run'
  try:
    with monkeypatch.context() as patch:
      patch.setattr(
        checkpointing.shutil,
        'disk_usage',
        lambda path: shutil._ntuple_diskusage(2**40, 0, 2**40),
      )
      with pytest.raises(
        checkpointing.CheckpointSaveError, match='failed: the disk is full'
      ) as info:
        train_lib.train_and_evaluate(config, str(run))
    assert 'The last complete checkpoint, step 5, is kept.' in str(info.value)
    assert os.listdir(run / 'checkpoints') == ['5']  # partial 10 removed

    subprocess.run(['mount', '-o', 'remount,size=40m', str(disk)], check=True)
    assert train_lib.train_and_evaluate(config, str(run))['finished']
    chex.assert_trees_all_close(
      _final_params(run), _final_params(workdir), rtol=1e-6, atol=1e-6
    )
  finally:
    subprocess.run(['umount', '-l', str(disk)], check=False)


@pytest.mark.slow
def test_a_linear_probe_from_a_finished_run(full_run, tmp_path, absl_log):
  """init_from a workdir, the classifier reset, backbone and BN frozen: the
  run trains the classifier alone, from the source's EMA weights."""
  config, _, source, _ = full_run
  config = config.copy_and_resolve_references()
  config.update(init_from=str(source), init_reset='^classifier/')
  config.train.num_epochs = 1.0
  config.optim.freeze_backbone = True
  config.model.bn_frozen = True
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result['finished'] and 'Initialised from config.init_from=' in (
    absl_log.text
  )
  pretrained, tuned = _final_params(source), _final_params(tmp_path)

  def backbone(params):
    return {k: v for k, v in params.items() if k != 'classifier'}

  expected = backbone(pretrained['ema_params'])
  chex.assert_trees_all_equal(backbone(tuned['params']), expected)
  # The EMA of a constant moves by float rounding only.
  chex.assert_trees_all_close(
    backbone(tuned['ema_params']), expected, rtol=1e-6, atol=1e-7
  )
  chex.assert_trees_all_equal(tuned['batch_stats'], pretrained['batch_stats'])
  assert not np.allclose(
    tuned['params']['classifier']['kernel'],
    pretrained['ema_params']['classifier']['kernel'],
  )


def test_test_image_sizes_are_checked_before_anything_runs(tmp_path):
  config = tiny_config()
  config.data.test_image_sizes = (48, 16)
  with pytest.raises(
    ValueError, match=r'config.data.test_image_sizes=\(48, 16\)'
  ):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
  'examples, message',
  [
    (4, r'config.data.test_bn_examples=4 is not valid; expected 0 .*>= '),
    (48, r"test_bn_examples=48 .* at most the training split's 40"),
  ],
)
def test_test_bn_examples_are_checked_before_anything_runs(
  data_dirs, tmp_path, examples, message
):
  config = tiny_config(data_dirs[1])  # eval batches of 8, 40 train images
  config.data.test_bn_examples = examples
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists() or not list(
    (tmp_path / 'run').iterdir()
  )


@pytest.mark.slow
def test_a_run_is_also_evaluated_at_its_test_image_sizes(data_dirs, tmp_path):
  """Trained at 32 px, evaluated at 32 (its metrics) and at 48 px: the
  same final state, another eval program; results.json `at_resolution`.
  With `test_bn_examples`, also at both sizes with BatchNorm statistics
  re-estimated there (`at_resolution_bn`)."""
  config = tiny_config(data_dirs[1], num_epochs=0.4)  # 2 steps
  config.data.test_image_sizes = (48,)
  config.data.test_bn_examples = 16  # 2 eval batches of the 40 images
  # Frozen BatchNorm (fine-tuning's): trained on its initial statistics,
  # which re-estimation must still replace.
  config.model.bn_frozen = True
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  at = result['at_resolution']['48']
  assert set(at) >= {'top1', 'ema_top1', 'loss'}
  assert 0 <= at['top1'] <= 1 and at['loss'] != result['loss']
  bn = result['at_resolution_bn']
  assert set(bn) == {'32', '48'}
  # The initial statistics (0, 1) are far from the images': re-estimated,
  # the same weights score otherwise.
  assert bn['32']['loss'] != result['loss'] and bn['48']['loss'] != at['loss']
  saved = json.load(open(tmp_path / 'results.json'))
  assert saved['at_resolution'] == result['at_resolution']
  assert saved['at_resolution_bn'] == bn
