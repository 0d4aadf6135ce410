"""Test-wide JAX settings: fast CPU compiles, one compilation cache.

XLA's CPU optimisation passes dominate this suite's time (jitting `init` of a
width-0.35 model: 17 s with them, 3.5 s without, on 2 cores); the tiny
programs under test run fast enough unoptimised.
"""

import atexit
import logging
import os
import shutil
import tempfile

from absl import logging as absl_logging
from fake_data import make_idx_dir
import jax
import pytest

from mnv2_flax.data import fashion_mnist

jax.config.update('jax_disable_most_optimizations', True)


def _suite_cache() -> str:
  """One compilation cache for the whole run: the pytest process makes it
  (and removes it at exit); the xdist workers and every process a test
  starts find it in the environment, so a shape compiled once anywhere in
  the suite is loaded everywhere else. A config's own
  `train.compilation_cache_dir` still wins (the tests of the cache)."""
  directory = os.environ.get('MNV2_FLAX_TEST_CACHE')
  if not directory:
    directory = tempfile.mkdtemp(prefix='mnv2_flax_test_jax_cache_')
    for path in (directory, directory + '-precompiled'):  # and its records
      atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ['MNV2_FLAX_TEST_CACHE'] = directory
  os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  return directory


jax.config.update('jax_compilation_cache_dir', _suite_cache())
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(autouse=True)
def _absl_info():
  """absl at INFO, as the command lines log, before every test: tests read
  the library's INFO lines (caplog), and a test before them in their worker
  may have lowered it (`stats.main` sets WARNING)."""
  absl_logging.set_verbosity(absl_logging.INFO)


class _Lines(logging.Handler):
  """The absl logger's records, as lines (`absl_log.text`)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.lines = []

  def emit(self, record):
    self.lines.append(f'{record.levelname} {record.getMessage()}')

  @property
  def text(self):
    return '\n'.join(self.lines)


@pytest.fixture
def absl_log():
  """What the library logs during the test, read from the absl logger
  itself: caplog reads the root logger, which an earlier test in the same
  worker can leave without INFO records (under `--dist loadgroup` three
  tests lost theirs)."""
  logger, lines = logging.getLogger('absl'), _Lines()
  logger.addHandler(lines)
  try:
    yield lines
  finally:
    logger.removeHandler(lines)


@pytest.fixture(scope='session')
def data_dirs(tmp_path_factory):
  """(idx dir, tfds data_dir) with a 40 + 23 image Fashion-MNIST prepared."""
  idx_dir = make_idx_dir(str(tmp_path_factory.mktemp('idx')))
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  fashion_mnist.prepare(data_dir, idx_dir)
  return idx_dir, data_dir


# `.ci/run` names the groups of tests that must run in CI
# (MNV2_FLAX_REQUIRE=compiler,libtpu,dataset,root): a skip for one of these
# reasons fails the run there instead of leaving it green.
SKIP_REASONS = {
  'compiler': ('C++ kernels', 'C++ compiler'),
  'libtpu': ('libtpu',),
  'dataset': ('dataset-fashion-mnist',),
  'root': ('needs root',),
}


def pytest_sessionfinish(session, exitstatus):
  required = [
    g for g in os.environ.get('MNV2_FLAX_REQUIRE', '').split(',') if g
  ]
  reporter = session.config.pluginmanager.get_plugin('terminalreporter')
  if not required or reporter is None or hasattr(session.config, 'workerinput'):
    return
  unknown = set(required) - set(SKIP_REASONS)
  if unknown:
    raise ValueError(f'MNV2_FLAX_REQUIRE: unknown groups {sorted(unknown)}.')
  missed = []
  for report in reporter.stats.get('skipped', []):
    reason = str(
      report.longrepr[-1]
      if isinstance(report.longrepr, tuple)
      else report.longrepr
    )
    for group in required:
      if any(key in reason for key in SKIP_REASONS[group]):
        missed.append(f'{report.nodeid} ({group}: {reason})')
  if missed:
    reporter.write_line(
      f'error: {len(missed)} test(s) skipped that CI requires '
      f'(MNV2_FLAX_REQUIRE={",".join(required)}): ' + '; '.join(missed[:5]),
      red=True,
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
