"""configure_host: a freed large block is reused, not faulted again."""

import json
import os
import platform
import subprocess
import sys

import pytest

# 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so without
# the settings every allocation of it is a fresh mmap (16,384 page faults).
# (ctypes, not numpy: numpy asks for transparent huge pages on its own.)
_PROBE = """
import ctypes, json, resource
from mnv2_flax.cpu import fast_path
applied = fast_path.configure_host()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 2, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
last = ctypes.c_ubyte.from_address(block + size - 1).value
libc.free(block)
print(json.dumps(dict(applied=applied, faults=faults, last=last)))
"""
_PAGES = 64 * 2**20 // 4096

pytestmark = pytest.mark.skipif(
  platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
  reason='glibc only',
)


def _probe(enabled: str):
  result = subprocess.run(
    [sys.executable, '-c', _PROBE],
    env={**os.environ, 'MNV2_FLAX_CPU': enabled},
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(result.stdout.splitlines()[-1])


def test_freed_block_is_reused_without_page_faults():
  probe = _probe('1')
  assert probe['applied']
  assert probe['last'] == 2
  assert probe['faults'] < _PAGES // 20, probe


def test_turned_off_by_environment_variable():
  probe = _probe('0')
  assert not probe['applied']
  # The default allocator maps the block again: every page faults.
  assert probe['faults'] >= _PAGES * 0.9, probe
