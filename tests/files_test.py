"""mnv2_flax.runtime.files: whole files or none."""

import os

import pytest

from mnv2_flax.runtime import files


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
  path = str(tmp_path / 'results.json')
  files.write_json(path, {'top1': 0.5})
  files.write_json(path, {'top1': 0.75})
  assert files.read_json(path) == {'top1': 0.75}
  assert os.listdir(tmp_path) == ['results.json']


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = str(tmp_path / 'results.json')
  files.write_json(path, {'top1': 0.5})
  with pytest.raises(TypeError):
    files.write_atomically(path, 12345)  # fails while writing the temp file
  assert files.read_json(path) == {'top1': 0.5}
  assert os.listdir(tmp_path) == ['results.json']


def test_unreadable_or_missing_json_reads_as_empty(tmp_path):
  (tmp_path / 'half.json').write_text('{"top1": 0.')
  assert files.read_json(str(tmp_path / 'half.json')) == {}
  assert files.read_json(str(tmp_path / 'none.json')) == {}


def test_check_workdir_names_a_file_in_the_way(tmp_path):
  (tmp_path / 'w').write_text('')
  with pytest.raises(ValueError, match='is a file'):
    files.check_workdir(str(tmp_path / 'w'))
  files.check_workdir(str(tmp_path / 'new' / 'dir'))
  assert os.path.isdir(tmp_path / 'new' / 'dir')
