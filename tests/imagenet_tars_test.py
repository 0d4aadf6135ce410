"""ImageNet from its tars, as the README says: small ILSVRC2012 tars built
as ImageNet distributes them (`fake_imagenet`) are prepared by tfds with
its labels, trained on by `train.py --config=configs/default.py` and
evaluated by `mnv2_flax.evaluate`, in real processes; a damaged tar gets a
DataError naming the file and what is wrong with it, and leaves the
data_dir as it was.
"""

import collections
import gzip
import io
import json
import os
import re
import tarfile

from fake_data import run_python
from fake_data import snapshot
import fake_imagenet
import jax
import pytest
import tensorflow_datasets as tfds

from configs import default
from mnv2_flax.data import imagenet_tars
from mnv2_flax.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, 'configs', 'default.py')
# 99 images train (train[:99%]) at batch 8: 12 steps an epoch; 0.25 epochs
# is 3 steps, saved at 2 and 3. minival (train[99%:]) holds 1 image.
STEPS = 3
TINY = (
  '--config.model.width_multiplier=0.35',
  '--config.data.image_size=32',
  '--config.data.batch_size=8',
  '--config.data.eval_batch_size=8',
  '--config.data.shuffle_buffer=128',
  '--config.data.threadpool_size=1',
  '--config.train.num_epochs=0.25',
  '--config.train.dtype=float32',
  '--config.train.log_every_steps=1',
  '--config.checkpoint.every_steps=2',
  '--config.checkpoint.async_save=False',
)


def _config(data_dir, manual_dir=None):
  config = default.get_config()
  config.data.data_dir = str(data_dir)
  if manual_dir:
    config.data.manual_dir = str(manual_dir)
  return config


def _check_prepared(builder, tars):
  """Both splits hold every image once, labelled as tfds labels ImageNet:
  train by its synset tar, validation by validation_labels.txt."""
  names = fake_imagenet.label_names()
  splits = builder.info.splits
  assert splits['train'].num_examples == len(tars.synsets) * tars.per_synset
  assert splits['validation'].num_examples == tars.num_val
  assert builder.info.features['label'].num_classes == 1000
  per_label = collections.Counter()
  for example in tfds.as_numpy(builder.as_dataset(split='train')):
    synset = example['file_name'].decode().split('_')[0]
    assert example['label'] == names.index(synset)
    assert example['image'].shape[2] == 3
    assert all(60 <= side <= 120 for side in example['image'].shape[:2])
    per_label[int(example['label'])] += 1
  assert per_label == {i: tars.per_synset for i in fake_imagenet.SYNSET_INDICES}
  truth = fake_imagenet.validation_labels()
  seen = set()
  for example in tfds.as_numpy(builder.as_dataset(split='validation')):
    file_name = example['file_name'].decode()
    index = int(re.fullmatch(r'ILSVRC2012_val_(\d{8})\.JPEG', file_name)[1])
    assert example['label'] == names.index(truth[index - 1]), file_name
    seen.add(index)
  assert seen == set(range(1, tars.num_val + 1))


def _run(args):
  return run_python(args, JAX_DISABLE_MOST_OPTIMIZATIONS='1')


@pytest.mark.slow
def test_readme_path_prepares_trains_and_evaluates(tmp_path):
  """The tars in <data_dir>/downloads/manual, `train.py` with the ImageNet
  config (tiny), then `mnv2_flax.evaluate` on its checkpoint."""
  data_dir, workdir = tmp_path / 'tfds', tmp_path / 'workdir'
  tars = fake_imagenet.write_tars(str(data_dir / 'downloads' / 'manual'))
  trained = _run(
    [
      'train.py',
      f'--config={DEFAULT}',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      '--config.train.compilation_cache_dir='
      + jax.config.jax_compilation_cache_dir,
      *TINY,
    ]
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  _check_prepared(tfds.builder('imagenet2012', data_dir=str(data_dir)), tars)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', str(STEPS)]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['completed_steps'] == STEPS and results['finished']
  assert results['num_classes'] == 1000
  assert results['num_examples'] == tars.num_val
  assert results['minival_num_examples'] == 1
  assert results['data_source'] == str(data_dir / 'imagenet2012' / '5.1.0')

  evaluated = _run(['-m', 'mnv2_flax.evaluate', f'--workdir={workdir}'])
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  metrics = json.loads(evaluated.stdout)
  assert metrics['num_examples'] == tars.num_val
  for key in ('top1', 'top5', 'ema_top1', 'loss'):
    assert metrics[key] == results[key], key


def test_manual_dir_elsewhere_is_prepared_into_data_dir(tmp_path):
  manual_dir, data_dir = tmp_path / 'tars', tmp_path / 'tfds'
  tars = fake_imagenet.write_tars(str(manual_dir))
  before = snapshot(manual_dir)
  builder = prepare.get_builder(_config(data_dir, manual_dir))
  _check_prepared(builder, tars)
  assert builder.data_dir == str(data_dir / 'imagenet2012' / '5.1.0')
  assert snapshot(manual_dir) == before
  assert not (data_dir / 'downloads' / 'manual').exists()  # no copies
  # Prepared: the tars are not needed any more.
  assert prepare.get_builder(_config(data_dir)).data_dir == builder.data_dir


# -------------------------------------------------------------------- damage


def _cut(path, fraction=1 / 3):
  with open(path, 'r+b') as f:
    f.truncate(int(os.path.getsize(path) * fraction))


def _cut_after_first_member(path):
  """Ends the tar right after its first member: no end-of-archive block."""
  files = fake_imagenet.read_tar(path)
  first = next(iter(files))
  fake_imagenet.write_tar(path, {first: files[first]})
  size = 512 + -(-len(files[first]) // 512) * 512
  _cut(path, size / os.path.getsize(path))


def _replace(path, content):
  with open(path, 'wb') as f:
    f.write(content)


def _gzip(path):
  with open(path, 'rb') as f:
    _replace(path, gzip.compress(f.read()))


def _damage_synset_tar(path):
  files = fake_imagenet.read_tar(path)
  files['n01443537.tar'] = files['n01443537.tar'][:5000]
  fake_imagenet.write_tar(path, files)


def _add_member(path, name):
  with tarfile.open(path, 'a') as tar:
    info = tarfile.TarInfo(name)
    info.size = 5
    tar.addfile(info, io.BytesIO(b'notes'))


def _drop_val_image(path):
  files = fake_imagenet.read_tar(path)
  del files[fake_imagenet.val_name(3)]
  fake_imagenet.write_tar(path, files)


TRAIN, VAL = fake_imagenet.TRAIN_TAR, fake_imagenet.VAL_TAR
DAMAGE = {
  'truncated': (
    TRAIN,
    _cut,
    r'ILSVRC2012_img_train.tar is truncated: it ends at byte [\d,]+ inside '
    r"member 'n\d{8}.tar' \(whose data ends at byte [\d,]+\); ImageNet's "
    'ILSVRC2012_img_train.tar is 147,897,477,120 bytes; copy it again',
  ),
  'cut at a member end': (
    TRAIN,
    _cut_after_first_member,
    r'ILSVRC2012_img_train.tar is truncated: it ends at byte [\d,]+, after '
    "member 'n01440764.tar', where the next member or the end of the "
    'archive should be',
  ),
  'not a tar': (
    TRAIN,
    lambda p: _replace(p, b'<html>Forbidden</html>\n' * 40),
    r'ILSVRC2012_img_train.tar is not a tar archive \(its first header is '
    'not a tar header',
  ),
  'gzipped': (
    TRAIN,
    _gzip,
    r'ILSVRC2012_img_train.tar is not a tar archive \(it is gzip-compressed',
  ),
  'empty': (
    TRAIN,
    lambda p: _replace(p, b''),
    r'ILSVRC2012_img_train.tar is not a tar archive \(it is empty\)',
  ),
  'damaged synset tar': (
    TRAIN,
    _damage_synset_tar,
    r"ILSVRC2012_img_train.tar: its synset tar 'n01443537.tar' is "
    r"truncated: it ends at byte 5,000 inside member 'n01443537_0.JPEG'",
  ),
  'a stray member': (
    TRAIN,
    lambda p: _add_member(p, 'README.txt'),
    r"ILSVRC2012_img_train.tar: member 'README.txt' is not a per-synset tar "
    'nXXXXXXXX.tar',
  ),
  'an unknown synset': (
    TRAIN,
    lambda p: _add_member(p, 'n00000000.tar'),
    r"member 'n00000000.tar' is not the tar of one of ImageNet's 1,000 "
    'synsets',
  ),
  'val truncated': (
    VAL,
    _cut,
    r'ILSVRC2012_img_val.tar is truncated: it ends at byte [\d,]+ inside '
    r"member 'ILSVRC2012_val_\d{8}.JPEG'",
  ),
  'val image missing': (
    VAL,
    _drop_val_image,
    r'ILSVRC2012_img_val.tar holds 9 validation images but not '
    r'ILSVRC2012_val_00000003.JPEG: .*would get wrong labels',
  ),
  'val image twice': (
    VAL,
    lambda p: _add_member(p, fake_imagenet.val_name(2)),
    'ILSVRC2012_img_val.tar holds ILSVRC2012_val_00000002.JPEG twice',
  ),
  'val tar missing': (
    VAL,
    os.remove,
    r'imagenet2012 is not prepared in .* and .* has no '
    'ILSVRC2012_img_val.tar',
  ),
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_damaged_tar_is_named_and_nothing_is_left(tmp_path, damage):
  name, do, words = DAMAGE[damage]
  data_dir = tmp_path / 'tfds'
  manual_dir = data_dir / 'downloads' / 'manual'
  fake_imagenet.write_tars(str(manual_dir))
  do(str(manual_dir / name))
  before = snapshot(data_dir)
  with pytest.raises(prepare.DataError) as error:
    prepare.get_builder(_config(data_dir))
  message = str(error.value)
  assert re.search(words, message), message
  assert str(manual_dir) in message  # the file, by its path
  assert 'could not be downloaded' not in message
  assert '\n' not in message
  # The tars untouched, no imagenet2012 or downloads/extracted directory,
  # no lock file: the data_dir as it was.
  assert snapshot(data_dir) == before


def test_a_failure_keeps_what_was_there(tmp_path):
  """A failed preparation removes what it made, and only that: a prepared
  other version stays, and a data_dir it made goes (the tars elsewhere)."""
  manual_dir, data_dir = tmp_path / 'tars', tmp_path / 'tfds'
  fake_imagenet.write_tars(str(manual_dir), per_synset=2, num_val=2)
  _damage_synset_tar(str(manual_dir / TRAIN))
  tars = snapshot(manual_dir)
  with pytest.raises(prepare.DataError, match="synset tar 'n01443537.tar'"):
    prepare.get_builder(_config(data_dir, manual_dir))
  assert not data_dir.exists()
  old = data_dir / 'imagenet2012' / '5.0.0'
  old.mkdir(parents=True)
  (old / 'dataset_info.json').write_text('{}')
  before = snapshot(data_dir)
  with pytest.raises(prepare.DataError, match="synset tar 'n01443537.tar'"):
    prepare.get_builder(_config(data_dir, manual_dir))
  assert snapshot(data_dir) == before
  assert snapshot(manual_dir) == tars


def test_a_partial_imagenet_is_checked_with_a_warning(tmp_path, caplog):
  """Fewer synsets or validation images than ImageNet's prepare (labels
  stay right), with a warning that the numbers are not ImageNet's."""
  fake_imagenet.write_tars(str(tmp_path), per_synset=1, num_val=3)
  with caplog.at_level('WARNING'):
    imagenet_tars.check_train(str(tmp_path / TRAIN))
    imagenet_tars.check_val(str(tmp_path / VAL))
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 2, warnings
  assert 'holds 5 of the 1000 synset tars' in warnings[0]
  assert 'holds 3 of the 50,000 validation images' in warnings[1]
