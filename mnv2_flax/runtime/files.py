"""The small files a run and a sweep write: always whole, never half.

Sweep workers and the summary read `results.json` and `sweep.json` while
runs write them, so every write goes to a temporary file in the same
directory and replaces the old one at once (`os.replace`).
"""

import json
import os
import tempfile
from typing import Any


def write_atomically(path: str, content: str | bytes) -> None:
  """Writes `content` to `path`: a reader sees the old file or the new."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
    dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp'
  )
  try:
    with os.fdopen(fd, 'wb' if isinstance(content, bytes) else 'w') as f:
      f.write(content)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json(path: str, data: dict[str, Any]) -> None:
  """`data` as indented JSON, atomically."""
  write_atomically(path, json.dumps(data, indent=2))


def read_json(path: str) -> dict[str, Any]:
  """The JSON object in `path`; {} if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def check_workdir(workdir: str) -> None:
  """Creates `workdir`; a clear error if it cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'workdir {workdir!r} is a file; expected a directory.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(
      f'workdir {workdir!r} is not writable ({e.strerror}); choose a '
      'directory this process can write.'
    ) from None
