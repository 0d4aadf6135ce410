"""One writer per workdir (and one preparer per dataset): a lock file.

  with workdir_lock.hold(workdir):
    ...  # train, save, write results

`hold` takes an exclusive `flock` on `<directory>/lock` and writes its
holder there (host, process id, start time, command line); it removes the
file when it lets go. The kernel releases a `flock` when its process ends,
however it ends: a lock file left by a process that was killed is taken
over, with a warning naming it. A second writer gets `DirectoryInUseError`
naming the holder before it writes anything. Holding is re-entrant within
a process (a sweep point holds its workdir and trains through
`train_and_evaluate`, which holds it again).

Filesystems without working locks: where `flock` fails (ENOLCK, EOPNOTSUPP:
some FUSE mounts), the holder written in the file is checked instead: a
holder on this host that is still running refuses, one on another host
cannot be checked and is taken over with a warning. Where `flock` is local
to each host (NFS mounted with `local_lock=flock`), two hosts can both hold
it; run one job per workdir there.

Standard library only: the command-line programs may import it before JAX.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

LOCK_FILE = 'lock'
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD = {}  # path: [fd, depth] of the locks this process holds


class DirectoryInUseError(ValueError):
  """Another process holds the lock of a workdir or dataset directory."""


def holder(directory: str, file: str = LOCK_FILE) -> dict:
  """What the lock file of `directory` names ({} if none)."""
  return _read(os.path.join(directory, file))


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or '{}')
  except (OSError, ValueError):
    return {}


def describe(info: dict) -> str:
  """'process 123 on host h (python train.py ...), since 2026-12-03 10:00'."""
  if not info.get('pid'):
    return 'another process (it did not write its name)'
  since = time.strftime(
    '%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', 0))
  )
  return (
    f'process {info["pid"]} on host {info.get("host", "?")} '
    f'({info.get("command", "?")}), since {since}'
  )


def in_use_by(directory: str, file: str = LOCK_FILE) -> str | None:
  """Who holds `directory`'s lock, described, or None: read from the lock
  file without touching the lock (a released lock's file is gone; one left
  by a killed process names a process that no longer runs here). A holder
  on another host cannot be checked and counts as holding."""
  info = holder(directory, file)
  if not info or info.get('pid') == os.getpid():
    return None
  if info.get('host') == socket.gethostname() and not _alive_here(info):
    return None
  return describe(info)


def _alive_here(info: dict) -> bool:
  """Whether `info` names a running process of this host other than us."""
  if info.get('host') != socket.gethostname() or info.get('pid') == os.getpid():
    return False
  try:
    os.kill(int(info['pid']), 0)
  except ProcessLookupError:
    return False
  except (OSError, ValueError, KeyError):
    return True  # it exists (another user's) or cannot be told: refuse
  return True


@contextlib.contextmanager
def hold(
  directory: str,
  what: str = 'workdir',
  *,
  wait: bool = False,
  file: str = LOCK_FILE,
):
  """Holds the lock `<directory>/<file>` for the block.

  Args:
    directory: what the lock guards (it must exist).
    what: its name in messages ('workdir', 'dataset directory').
    wait: wait for another holder to release it; else (the default) raise
      `DirectoryInUseError` naming it, without writing anything.
    file: the lock file's name in `directory`.
  """
  path = os.path.join(os.path.abspath(directory), file)
  if path in _HELD:
    _HELD[path][1] += 1
    try:
      yield
    finally:
      _HELD[path][1] -= 1
    return
  fd = _acquire(path, directory, what, wait)
  _HELD[path] = [fd, 1]
  try:
    yield
  finally:
    del _HELD[path]
    try:  # while still held: a waiter then finds the file gone, retries
      os.unlink(path)
    except OSError:
      pass
    os.close(fd)  # releases the flock


def _acquire(path: str, directory: str, what: str, wait: bool) -> int:
  while True:
    fd = _lock(path, directory, what, wait)
    try:  # the file a releasing holder removed is not the lock any more
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)


def _lock(path: str, directory: str, what: str, wait: bool) -> int:
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locks = True
    except BlockingIOError:
      if not wait:
        raise _in_use(directory, what, _read(path)) from None
      logging.info('Waiting for %s to release %s.', describe(_read(path)), path)
      fcntl.flock(fd, fcntl.LOCK_EX)
      locks = True
    except OSError as e:
      if e.errno not in _NO_LOCKS:
        raise
      locks = False
      logging.warning(
        'The filesystem of %s has no working locks (%s): checking the '
        'holder named in %s instead.',
        directory,
        e.strerror,
        path,
      )
    previous = _read(path)
    if previous and not locks and _alive_here(previous):
      raise _in_use(directory, what, previous)
    if previous and previous.get('pid') != os.getpid():
      # Its flock went with it (or, without locks, its process is gone).
      checked = locks or previous.get('host') == socket.gethostname()
      logging.warning(
        'Taking over the lock of %s left by %s, which %s.',
        directory,
        describe(previous),
        'no longer runs'
        if checked
        else 'ran on another host and cannot be checked',
      )
    info = dict(
      host=socket.gethostname(),
      pid=os.getpid(),
      started=time.time(),
      command=' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:200],
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd
  except BaseException:
    os.close(fd)
    raise


def _in_use(directory: str, what: str, info: dict) -> DirectoryInUseError:
  return DirectoryInUseError(
    f'{what} {directory} is in use by {describe(info)}; wait for it to end, '
    f'stop it, or choose another {what}.'
  )
