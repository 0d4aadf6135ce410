"""Tests of the tfds input pipeline on data the tests write themselves."""

import gzip
import os
import textwrap

from fake_data import NUM_TEST
from fake_data import NUM_TRAIN
from fake_data import make_idx_dir
from fake_data import run_on_fake_devices
from fake_data import tiny_config
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import defaults
from mnv2_flax import preprocessing
from mnv2_flax.data import fashion_mnist
from mnv2_flax.data import input_pipeline as ip
from mnv2_flax.data import prepare
from mnv2_flax.data import transforms
from mnv2_flax.runtime import placement

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(data_dir, **data):
  config = tiny_config(data_dir)
  config.data.update(data)
  return config


def first_batches(ds, n=2):
  it = iter(tfds.as_numpy(ds))
  return [next(it) for _ in range(n)]


def ids_of(images):
  """Recovers the test images' ids from their constant uint8 pixels."""
  return images[..., 0, 0, 0].astype(int)


def test_prepared_fashion_mnist_reads_as_the_tfds_dataset(data_dirs):
  _, data_dir = data_dirs
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  assert builder.info.splits['train'].num_examples == NUM_TRAIN
  assert builder.info.splits['test'].num_examples == NUM_TEST
  meta = prepare.dataset_meta(
    prepare.get_builder(small_config(data_dir)), small_config(data_dir)
  )
  assert meta == prepare.DatasetMeta(10, NUM_TRAIN, NUM_TEST)


def test_later_runs_reuse_the_prepared_dataset(data_dirs, monkeypatch):
  _, data_dir = data_dirs
  info = os.path.join(data_dir, 'fashion_mnist', '3.0.1', 'dataset_info.json')
  before = os.stat(info).st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError('prepared again')

  monkeypatch.setattr(fashion_mnist, 'prepare', fail)
  prepare.get_builder(small_config(data_dir))
  assert os.stat(info).st_mtime_ns == before


@pytest.mark.parametrize('size', [32, 45])
def test_train_batches_shapes_dtypes_ranges(data_dirs, size):
  _, data_dir = data_dirs
  config = small_config(data_dir, image_size=size)
  batch = first_batches(
    ip.create_train_dataset(prepare.get_builder(config), config), 1
  )[0]
  assert batch['image'].shape == (1, 8, size, size, 3)
  assert batch['image'].dtype == np.uint8  # normalised on the device
  assert batch['label'].shape == (1, 8) and batch['label'].dtype == np.int32
  assert batch['image'].min() < 64 and batch['image'].max() > 191
  # Grayscale inputs become three equal channels.
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


@pytest.mark.parametrize('normalization', defaults.NORMALIZATIONS)
def test_uint8_batches_normalised_on_device_equal_the_host_float_path(
  data_dirs, normalization
):
  # The images the model sees are those the pipeline used to send as
  # float32: TF's resize, rounded to uint8 (as PIL's resize gives them), then
  # normalised; now the last step runs in the jitted step, on the device.
  _, data_dir = data_dirs
  config = small_config(data_dir, normalization=normalization, image_size=45)
  builder = prepare.get_builder(config)
  (batch,) = first_batches(ip.create_train_dataset(builder, config), 1)
  images = batch['image'][0]
  device = jax.jit(preprocessing.normalize, static_argnums=1)(
    images, normalization
  )
  mean, std = (np.float32(v) for v in preprocessing.STATISTICS[normalization])
  host = (images.astype(np.float32) - mean) * (np.float32(1) / std)
  assert host.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(device), host)
  # The uint8 pixels are TF's float resize rounded to the nearest integer.
  stored = np.random.default_rng(0).integers(0, 256, (28, 28, 1), np.uint8)
  resized = tf.image.resize(stored, (45, 45), method='bilinear').numpy()
  expected = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  finished = transforms.finish(tf.constant(stored), config).numpy()
  assert finished.dtype == np.uint8 and finished.shape == (45, 45, 3)
  np.testing.assert_array_equal(finished, np.repeat(expected, 3, -1))
  assert np.abs(finished[..., 0] - resized[..., 0]).max() <= 0.5


def test_train_stream_is_reproducible_under_a_seed(data_dirs):
  _, data_dir = data_dirs
  config = small_config(data_dir)
  builder = prepare.get_builder(config)
  a = first_batches(ip.create_train_dataset(builder, config), 7)
  b = first_batches(ip.create_train_dataset(builder, config), 7)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  config.seed = 1
  c = first_batches(ip.create_train_dataset(builder, config), 7)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  # Epochs differ: 40 examples are 5 batches; batch 6 starts a new order
  # with new crops.
  assert not np.array_equal(a[0]['image'], a[5]['image'])


@pytest.mark.slow
def test_splits_kept_in_memory_give_the_streams_read_from_the_files(
  data_dirs, monkeypatch
):
  # config.data.cache: a split of one file is decoded once per process and
  # later runs read it from memory; the streams must be the files' own.
  _, data_dir = data_dirs
  config = small_config(data_dir, minival_split='train[80%:]')
  config.data.train_split = 'train[:80%]'
  builder = prepare.get_builder(config)
  streams = {}
  for cache in (False, True, True):
    config.data.cache = cache
    for seed in (0, 1):
      config.seed = seed
      streams.setdefault((cache, seed), []).append(
        [
          first_batches(ip.create_train_dataset(builder, config), 7),
          first_batches(ip.create_eval_dataset(builder, config), 1),
          first_batches(
            ip.create_eval_dataset(builder, config, field='minival_split'), 1
          ),
        ]
      )
    if cache:  # the second cached pass reads no file
      monkeypatch.setattr(
        builder, 'as_dataset', lambda **kw: pytest.fail(f'read {kw}')
      )
  for seed in (0, 1):
    files, memory, again = (
      streams[(False, seed)][0],
      *streams[(True, seed)],
    )
    for x, y, z in zip(
      jax.tree.leaves(files),
      jax.tree.leaves(memory),
      jax.tree.leaves(again),
      strict=True,
    ):
      np.testing.assert_array_equal(x, y)
      np.testing.assert_array_equal(x, z)
  assert not np.array_equal(
    streams[(True, 0)][0][0][0]['label'], streams[(True, 1)][0][0][0]['label']
  )


def test_streams_run_without_the_autotuning_model(data_dirs):
  # With it, dropping an iterator waits out the model thread's sleep (up to
  # a minute at the end of a run, TF 2.21).
  _, data_dir = data_dirs
  config = small_config(data_dir)
  builder = prepare.get_builder(config)
  for ds in (
    ip.create_train_dataset(builder, config),
    ip.create_eval_dataset(builder, config),
  ):
    assert ds.options().autotune.enabled is False
    assert ds.options().deterministic is True
    assert ds.options().threading.private_threadpool_size == 1


def test_eval_counts_every_example_once_one_device(data_dirs):
  _, data_dir = data_dirs
  config = small_config(data_dir)
  builder = prepare.get_builder(config)
  seen = []
  for processes in (1, 2):
    seen = []
    steps = []
    for p in range(processes):
      batches = list(
        tfds.as_numpy(
          ip.create_eval_dataset(
            builder, config, process_index=p, process_count=processes
          )
        )
      )
      steps.append(len(batches))
      for b in batches:
        seen += list(ids_of(b['image'])[b['mask'] == 1])
        assert set(b['mask'].ravel()) <= {0.0, 1.0}
    assert len(set(steps)) == 1  # every process runs the same steps
    assert sorted(seen) == list(range(NUM_TEST))


_FAKE_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow_datasets as tfds
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from fake_data import tiny_config
    from mnv2_flax.data import input_pipeline as ip
    from mnv2_flax.data import prepare
    import jax
    config = tiny_config()
    config.data.data_dir = {data_dir!r}
    config.data.eval_batch_size = 2 * jax.device_count()
    config.data.batch_size = 2 * jax.device_count()
    builder = prepare.get_builder(config)
    out = {{'devices': jax.local_device_count()}}
    for processes in (1, 2):
      config.data.eval_batch_size = 2 * jax.device_count() * processes
      seen, steps, masks = [], [], 0.0
      for p in range(processes):
        batches = list(tfds.as_numpy(ip.create_eval_dataset(
            builder, config, process_index=p, process_count=processes)))
        steps.append(len(batches))
        for b in batches:
          assert b['image'].shape[:2] == (jax.local_device_count(), 2), (
              b['image'].shape)
          ids = b['image'][..., 0, 0, 0].astype(int)
          seen += ids[b['mask'] == 1].tolist()
          masks += float(b['mask'].sum())
      out[processes] = dict(seen=sorted(seen), steps=steps, masks=masks)
    train = next(iter(tfds.as_numpy(ip.create_train_dataset(builder, config))))
    out['train_shape'] = list(train['image'].shape)
    config.data.batch_size = jax.device_count() + 1
    try:
      ip.create_train_dataset(builder, config)
    except ValueError as e:
      out['error'] = str(e)
    print('RESULT' + json.dumps(out))
""")


@pytest.mark.parametrize('devices', [3, 8])
@pytest.mark.slow
def test_eval_counts_every_example_once_fake_devices(data_dirs, devices):
  _, data_dir = data_dirs
  out = run_on_fake_devices(
    _FAKE_DEVICES_SCRIPT.format(
      root=ROOT, tests=os.path.dirname(__file__), data_dir=data_dir
    ),
    devices,
  )
  assert out['devices'] == devices
  for processes in ('1', '2'):
    assert out[processes]['seen'] == list(range(NUM_TEST))
    assert out[processes]['masks'] == NUM_TEST
    assert len(set(out[processes]['steps'])) == 1
  assert out['train_shape'] == [devices, 2, 32, 32, 3]
  assert f'config.data.batch_size={devices + 1}' in out['error']
  assert f'global device count {devices}' in out['error']


def test_num_eval_steps():
  assert ip.num_eval_steps(10_000, 1, 500) == 20
  assert ip.num_eval_steps(10_001, 1, 500) == 21
  assert ip.num_eval_steps(2001, 2, 1000) == 2  # shards of 1001 and 1000
  assert ip.num_eval_steps(50_000, 3, 1024) == 17


def test_prefetch_to_device(data_dirs):
  _, data_dir = data_dirs
  config = small_config(data_dir)
  batch = next(
    ip.prefetch_to_device(
      ip.create_train_dataset(prepare.get_builder(config), config),
      placement.split(),
    )
  )
  assert isinstance(batch['image'], jax.Array)
  assert batch['image'].shape == (1, 8, 32, 32, 3)
  assert batch['image'].sharding == placement.split()


def test_imagenet_under_mock_data():
  config = defaults.get_config()
  config.data.data_dir = os.path.join(TESTDATA, 'tfds')
  config.data.batch_size = config.data.eval_batch_size = 4
  config.data.image_size = 64
  with tfds.testing.mock_data(num_examples=20, data_dir=config.data.data_dir):
    builder = prepare.get_builder(config)
    meta = prepare.dataset_meta(builder, config)
    assert meta.num_classes == 1000 and meta.num_eval_examples == 20
    batch = first_batches(ip.create_train_dataset(builder, config), 1)[0]
    assert batch['image'].shape == (1, 4, 64, 64, 3)
    assert 0 <= batch['label'].min() and batch['label'].max() < 1000
    masks = sum(
      b['mask'].sum()
      for b in tfds.as_numpy(ip.create_eval_dataset(builder, config))
    )
    assert masks == 20


# -------------------------------------------------------------------- errors


def test_error_unknown_dataset(tmp_path):
  config = small_config(str(tmp_path), name='no_such_dataset')
  with pytest.raises(
    prepare.DataError, match="config.data.name='no_such_dataset'"
  ):
    prepare.get_builder(config)


def test_error_missing_split(data_dirs):
  _, data_dir = data_dirs
  config = small_config(data_dir, eval_split='validation')
  with pytest.raises(prepare.DataError, match=r"no split 'validation'.*'test'"):
    prepare.dataset_meta(prepare.get_builder(config), config)


@pytest.mark.parametrize(
  'train, minival, words',
  [
    ('train', 'train[32:]', 'shares 8 examples'),
    ('train[:32]', 'train[30:]', 'shares 2 examples'),
    ('train[:32]', 'train[40:]', 'holds no examples'),
    ('train[:32]', 'held[32:]', "no split 'held'"),
  ],
)
def test_error_minival_split_not_held_out(data_dirs, train, minival, words):
  """The split for choices must hold examples never trained on."""
  _, data_dir = data_dirs
  config = small_config(data_dir, train_split=train, minival_split=minival)
  with pytest.raises(prepare.DataError, match=words) as e:
    prepare.dataset_meta(prepare.get_builder(config), config)
  assert 'config.data.minival_split' in str(e.value)
  config.data.update(train_split='train[:32]', minival_split='train[32:]')
  assert (
    prepare.dataset_meta(prepare.get_builder(config), config).num_train_examples
    == 32
  )


def test_error_fashion_mnist_not_there(tmp_path):
  config = small_config(
    str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'nothing')
  )
  with pytest.raises(prepare.DataError, match='dataset-fashion-mnist'):
    prepare.get_builder(config)


@pytest.mark.parametrize(
  'damage, words',
  [
    (lambda b: b[:1000], 'not a complete gzip'),
    (lambda b: gzip.compress(gzip.decompress(b)[:-100]), 'truncated'),
    (
      lambda b: gzip.compress(
        np.array([2049], '>u4').tobytes() + gzip.decompress(b)[4:]
      ),
      'magic number 2049',
    ),
  ],
)
def test_error_bad_idx_file_writes_nothing(tmp_path, damage, words):
  idx_dir = make_idx_dir(str(tmp_path / 'idx'))
  path = os.path.join(idx_dir, fashion_mnist.FILES['train_images'])
  with open(path, 'rb') as f:
    content = f.read()
  with open(path, 'wb') as f:
    f.write(damage(content))
  data_dir = tmp_path / 'tfds'
  config = small_config(str(data_dir), manual_dir=idx_dir)
  with pytest.raises(prepare.DataError, match=words):
    prepare.get_builder(config)
  assert not (data_dir / 'fashion_mnist').exists()


@pytest.mark.parametrize(
  'name', ['imagenet2012', 'imagenet2012_subset/1pct', 'imagenet2012:5.1.0']
)
def test_error_imagenet_not_there_says_where_the_tars_go(tmp_path, name):
  config = defaults.get_config()
  config.data.data_dir = str(tmp_path)
  config.data.name = name  # a config or version: still one lock file
  with pytest.raises(prepare.DataError) as error:
    prepare.get_builder(config)
  message = str(error.value)
  assert 'ILSVRC2012_img_train.tar' in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message


def test_error_other_dataset_not_prepared_without_download(tmp_path):
  config = small_config(str(tmp_path), name='cifar10')
  with pytest.raises(prepare.DataError, match='config.data.download=True'):
    prepare.get_builder(config)


@pytest.mark.parametrize(
  'field, value',
  [
    ('image_size', 16),
    ('normalization', 'zscore'),
    ('crop_area_range', (0.0, 1.0)),
    ('eval_crop_fraction', 1.5),
    ('threadpool_size', -1),
    ('eval_flip_average', None),
  ],
)
def test_error_bad_data_fields(data_dirs, field, value):
  _, data_dir = data_dirs
  config = small_config(data_dir, **{field: value})
  with pytest.raises(ValueError, match=f'config.data.{field}='):
    prepare.get_builder(config)


def test_error_batch_not_positive(data_dirs):
  _, data_dir = data_dirs
  config = small_config(data_dir, batch_size=0)
  with pytest.raises(ValueError, match='config.data.batch_size=0'):
    ip.create_train_dataset(prepare.get_builder(config), config)


@pytest.mark.skipif(
  not os.path.isdir(fashion_mnist.DEBIAN_DIR),
  reason='Debian package dataset-fashion-mnist not installed',
)
@pytest.mark.slow
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
  config = tiny_config(str(tmp_path))
  config.data.eval_batch_size = 500
  builder = prepare.get_builder(config)
  assert prepare.dataset_meta(builder, config) == prepare.DatasetMeta(
    10, 60_000, 10_000
  )
  batch = first_batches(ip.create_eval_dataset(builder, config), 1)[0]
  assert batch['image'].shape == (1, 500, 32, 32, 3)
  # Real clothes: black background and bright garments.
  assert batch['image'].min() == 0 and batch['image'].max() > 191
  assert len(np.unique(batch['label'])) == 10


def test_batch_sharding_gives_every_process_its_rows_of_the_global_batch(
  data_dirs,
):
  _, data_dir = data_dirs
  config = small_config(data_dir, process_sharding='batch')
  builder = prepare.get_builder(config)
  whole = first_batches(ip.create_train_dataset(builder, config, 0, 1), 6)
  parts = [
    first_batches(ip.create_train_dataset(builder, config, p, 2), 6)
    for p in (0, 1)
  ]
  for step in range(6):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
        whole[step][key].reshape((8,) + whole[step][key].shape[2:]),
        np.concatenate([parts[p][step][key][0] for p in (0, 1)]),
      )
  # Resuming skips whole global batches.
  resumed = first_batches(
    ip.create_train_dataset(builder, config, 1, 2, start_step=4), 1
  )[0]
  np.testing.assert_array_equal(resumed['label'], parts[1][4]['label'])


def test_start_step_continues_the_stream_exactly(data_dirs):
  _, data_dir = data_dirs
  config = small_config(data_dir)
  builder = prepare.get_builder(config)
  fresh = first_batches(ip.create_train_dataset(builder, config), 9)
  resumed = first_batches(
    ip.create_train_dataset(builder, config, start_step=7), 2
  )
  for a, b in zip(fresh[7:], resumed, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


@pytest.mark.parametrize('flip', [False, True])
def test_per_batch_augmentation_matches_per_example(
  data_dirs, monkeypatch, flip
):
  # Same-size images without a random crop are augmented per batch; without
  # flips that gives the per-example pipeline's images exactly, with flips
  # each image is either that image or its mirror (train: random textures).
  _, data_dir = data_dirs
  config = small_config(data_dir, random_flip=flip)
  builder = prepare.get_builder(config)
  assert transforms.augments_per_batch(builder, config, jpeg=False)
  batched = first_batches(ip.create_train_dataset(builder, config), 10)
  monkeypatch.setattr(transforms, 'augments_per_batch', lambda *args: False)
  config.data.random_flip = False
  plain = first_batches(ip.create_train_dataset(builder, config), 10)
  flipped = []
  for a, b in zip(batched, plain, strict=True):
    np.testing.assert_array_equal(a['label'], b['label'])
    assert a['image'].shape == b['image'].shape == (1, 8, 32, 32, 3)
    for x, y in zip(a['image'][0], b['image'][0], strict=True):
      same = np.array_equal(x, y)
      mirror = np.array_equal(x, y[:, ::-1])
      assert same or mirror
      flipped.append(mirror and not same)
  if flip:
    assert 0.3 < np.mean(flipped) < 0.7, np.mean(flipped)
  else:
    assert not any(flipped)


def test_random_crops_are_augmented_per_example(data_dirs):
  _, data_dir = data_dirs
  config = small_config(data_dir, crop_area_range=(0.5, 1.0))
  assert not transforms.augments_per_batch(
    prepare.get_builder(config), config, False
  )


def test_sklearn_digits_is_prepared_offline_with_a_fixed_split(tmp_path):
  config = tiny_config(str(tmp_path))
  config.data.update(name='sklearn_digits', eval_split='test')
  builder = prepare.get_builder(config)
  splits = builder.info.splits
  assert (splits['train'].num_examples, splits['test'].num_examples) == (
    1297,
    500,
  )
  test = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  assert np.bincount(test['label']).tolist() == [50] * 10
  assert test['image'].shape == (500, 8, 8, 1) and test['image'].max() == 255


@pytest.mark.parametrize(
  'shape,size,fraction',
  [
    ((28, 28, 1), 32, 1.0),
    ((37, 45, 3), 32, 0.875),
    ((300, 200, 3), 64, 0.875),
  ],
)
def test_jax_eval_resize_gives_the_pipelines_pixels(shape, size, fraction):
  # preprocessing.resize_for_eval: what a user calls on a dataset's own
  # images (the README's restore snippet) against the eval transform.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
  config = tiny_config('unused')
  config.data.update(image_size=size, eval_crop_fraction=fraction)
  want = np.stack(
    [
      transforms.preprocess(
        {'image': tf.constant(x), 'label': 0},
        None,
        train=False,
        jpeg=False,
        config=config,
      )[0].numpy()
      for x in images
    ]
  )
  got = np.asarray(preprocessing.resize_for_eval(images, size, fraction))
  assert got.shape == want.shape == (4, size, size, 3) and got.dtype == np.uint8
  diff = np.abs(got.astype(int) - want.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01
  one = preprocessing.resize_for_eval(images[0], size, fraction)
  np.testing.assert_array_equal(one, got[0])
  if shape[-1] == 1:  # (H, W) grey as stored without a channel axis
    np.testing.assert_array_equal(
      preprocessing.resize_for_eval(images[..., 0], size, fraction), got
    )
  with pytest.raises(ValueError, match='expected'):
    preprocessing.resize_for_eval(np.zeros((2, 8, 8, 4)), size)
