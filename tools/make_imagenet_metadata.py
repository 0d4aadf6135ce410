"""Writes the tfds metadata of imagenet2012 that the ImageNet tests need.

tfds' wheel does not ship prepared-dataset metadata, and preparing ImageNet
needs the 150 GB of tar files. `tests/input_pipeline_test.py` runs the
ImageNet path under `tfds.testing.mock_data`, which reads a dataset's
features and splits from `<data_dir>/imagenet2012/<version>/`; this script
writes them there (features from tfds' own builder: JPEG images, 1000
classes), with small split sizes that the mock then generates.

  .venv/bin/python tools/make_imagenet_metadata.py
"""

import os

import tensorflow_datasets as tfds

OUT = os.path.join(os.path.dirname(__file__), '..', 'tests', 'testdata', 'tfds')
SPLITS = {'train': 48, 'validation': 20}


def main():
  builder = tfds.builder('imagenet2012', data_dir=OUT)
  info = builder.info
  info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name=name,
          shard_lengths=[n],
          num_bytes=0,
          filename_template=tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir,
            dataset_name='imagenet2012',
            split=name,
            filetype_suffix='tfrecord',
          ),
        )
        for name, n in SPLITS.items()
      ]
    )
  )
  os.makedirs(builder.data_dir, exist_ok=True)
  info.write_to_directory(builder.data_dir)
  print('wrote', os.path.abspath(builder.data_dir))


if __name__ == '__main__':
  main()
