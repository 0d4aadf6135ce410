"""What the command-line programs share: user mistakes end in one line,
and one start-up sequence.

`run(main)` is `absl.app.run(main)` where a bad flag or config file, a value
the library rejects, a file that is not there, a full disk or a diverged run
ends as `error: <what, the value, what is valid>` on stderr with exit status
1 and no traceback, as the last line printed. A run stopped by a signal
ends with its `stopped by ...` line and status 128 + the signal's number
(`preemption`). Bugs keep their traceback.

This module imports absl only, and the programs import JAX, TensorFlow and
the library inside `main`: a bad flag or config is refused before any of
them loads (in well under a second). `start_jax` then sets JAX up.
"""

from collections.abc import Callable
import difflib
import gc
import logging
import os
import sys
import threading

from absl import app
from absl import flags
from absl import logging as absl_logging

from mnv2_flax.runtime import preemption

# The library's own errors subclass these: ValueError (config, data,
# checkpoints), OSError (files, disks) and FloatingPointError (divergence).
EXPECTED = (ValueError, OSError, FloatingPointError)


def fail(message: str) -> None:
  """Prints `error: message` and exits with status 1."""
  _last_line(f'error: {message}', 1)


def _last_line(message: str, code: int) -> None:
  """Prints `message` (on one line) as the program's last line; exits."""
  # What the failed run held goes now, and with it what its finalizers
  # print (TensorFlow: "the calling iterator did not fully read the dataset
  # being cached").
  gc.collect()
  sys.stdout.flush()
  print(' '.join(str(message).split()), file=sys.stderr, flush=True)
  # Nothing after it: no interpreter shutdown (TensorFlow's and Orbax's
  # threads print there, and it takes seconds). Saves were waited for,
  # results and events flushed, before the exception reached here.
  logging.shutdown()
  os._exit(code)  # pylint: disable=protected-access


def _config_error(argv: list[str], error: Exception) -> str | None:
  """One line for a config file that cannot be loaded or overridden."""
  if isinstance(error, SyntaxError):
    return (
      f'--config: {error.filename} line {error.lineno}: {error.msg} (the '
      'file must be valid Python defining get_config()).'
    )
  if isinstance(error, OSError) and 'Failed loading config file' in str(error):
    given = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    path = given[-1] if given else '?'  # absl keeps the last
    return f'--config={path}: no such config file.'
  if isinstance(error, AttributeError) and 'get_config' in str(error):
    return '--config: the file defines no get_config().'
  if isinstance(error, (AttributeError, KeyError)):
    for arg in argv:
      key = arg.split('=', 1)[0].lstrip('-')
      if key.startswith('config.') and (problem := _no_field(key)):
        return f'--{key}: {problem}'
  if isinstance(error, EXPECTED):  # e.g. get_config(arg) rejecting its arg
    return f'--config: {error}'
  return None  # a bug in the config file: its traceback helps


def _no_field(key: str) -> str | None:
  """'the config has no field train.x; ...' if `key` is not in the schema."""
  from mnv2_flax import defaults  # pylint: disable=g-import-not-at-top

  node, path = defaults.get_config(), key.split('.')[1:]
  for i, part in enumerate(path):
    if not hasattr(node, 'keys'):
      return None  # a field's own attribute: not ours to judge
    if part not in node:
      known = sorted(node.keys())
      close = difflib.get_close_matches(part, known, n=1)
      hint = f'; did you mean {close[0]}?' if close else ''
      where = '.'.join(['config', *path[:i]])
      return (
        f'the config has no field {".".join(path[: i + 1])}{hint} (fields '
        f'of {where}: {", ".join(known)}).'
      )
    node = node[part]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    args = flags.FLAGS(argv)
    for name in flags.FLAGS:
      if 'Config' in type(flags.FLAGS[name]).__name__:
        # A config that failed to load raises on first use: raise it now.
        getattr(flags.FLAGS[name].value, 'items', None)
    return args
  except flags.Error as e:
    text = str(e)
    if 'Traceback (most recent call last)' in text:  # get_config raised
      flag = text.split(': Error whilst parsing config file')[0]
      text = f'{flag}: {text.strip().splitlines()[-1]}'
    fail(text)
  except Exception as e:  # pylint: disable=broad-except
    message = _config_error(argv, e)
    if message is None:
      raise
    fail(message)


class _QuietOrbax(logging.Filter):
  """Orbax's log, as much as a user needs: its warnings and errors, without
  tracebacks (background save threads log a failure with its traceback,
  many times; the main thread reports it once), and without its INFO lines
  (about 100 per checkpoint save) unless `--verbosity=1` or more. Not the
  warning that a restored item has no `_CHECKPOINT_METADATA` file: orbax's
  own optional file, which reads like corruption and is not."""

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return absl_logging.get_verbosity() >= 1
    if 'Metadata file does not exist' in str(record.msg):
      return False
    if record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True


def _quiet_background_failures() -> None:
  """One debug line, not a traceback, for what background threads report.

  A failed checkpoint write (a full disk) fails in each of orbax's and
  TensorStore's writer threads and coroutines: ~140 tracebacks for one
  fault, which the main thread then reports once, as one line.
  """
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(_QuietOrbax())

  def unraisable(args):
    absl_logger.debug('Ignored in a background task: %r', args.exc_value)

  def thread_failed(args):
    absl_logger.debug('Thread %s failed: %r', args.thread, args.exc_value)

  sys.unraisablehook = unraisable
  threading.excepthook = thread_failed
  # asyncio reports each failed write task ("exception was never retrieved").
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)


def start_jax(
  cache_dir: str | None = None,
  *,
  gpu_deterministic_ops: bool = False,
  multiprocess: bool | None = False,
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """The command-line programs' start-up, in this order: the host's malloc
  settings (before JAX starts its CPU client), `jax.distributed` where the
  job has several processes (`hardware.initialize_distributed`; by default
  not), the hardware line in the log, the persistent compilation cache in
  `cache_dir` (None or '': left as it is). The accelerator check is the
  library's (`train_and_evaluate` runs it once per run).
  `gpu_deterministic_ops` adds XLA's flag to XLA_FLAGS first."""
  # pylint: disable=g-import-not-at-top
  from mnv2_flax.cpu import fast_path
  from mnv2_flax.runtime import compilation_cache
  from mnv2_flax.runtime import hardware
  # pylint: enable=g-import-not-at-top

  if gpu_deterministic_ops:
    hardware.add_xla_flag(hardware.GPU_DETERMINISTIC_FLAG)
  fast_path.configure_host()
  hardware.initialize_distributed(
    multiprocess, coordinator, num_processes, process_id
  )
  absl_logging.info('%s', hardware.describe())
  if cache_dir:
    compilation_cache.enable_dir(cache_dir)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, with `EXPECTED` errors as one line."""
  # No INFO lines of TensorFlow's or XLA's C++ (tf.data's, PjRt's); their
  # warnings and errors stay. What TensorFlow's import logs before absl is
  # initialised (oneDNN's notice, the CPU-feature one, on CPUs with
  # AVX512/VNNI) is out of its reach.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

  def guarded(argv):
    _quiet_background_failures()
    try:
      main(argv)
    except EXPECTED as e:
      message, code = f'error: {e}', 1
    except preemption.Stopped as e:  # saved: a stop, not an error
      message, code = str(e), e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (nothing to save)
      message, code = 'error: interrupted (SIGINT).', 130
    except ModuleNotFoundError as e:
      if (e.name or '').startswith('mnv2_flax'):
        raise  # a bug, not a missing install
      message, code = (
        f'error: {e.name} is not installed here ({e}); training and data '
        'preparation need requirements.txt (pip install -r '
        'requirements.txt, or the package with its `data` extra).',
        1,
      )
    else:
      return
    _last_line(message, code)  # the exception and its frames are gone

  app.run(guarded, flags_parser=_parse_flags)
