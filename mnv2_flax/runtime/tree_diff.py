"""What differs between two trees of arrays: missing, unexpected, mis-shaped.

Checkpoints, pretrained weights and converted state dicts are all checked
the same way, each in its own words:

  problems = tree_diff.diff(tree_diff.shapes(model), tree_diff.shapes(saved))
  if problems:
    raise ValueError('does not fit: ' + tree_diff.summarize(problems, 12))
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

Shape = tuple[int, ...]


class Problem(NamedTuple):
  """One entry that differs: missing (no `actual`), unexpected (no
  `expected`) or mis-shaped (both, unequal)."""

  path: str
  expected: Shape | None
  actual: Shape | None

  @property
  def kind(self) -> str:
    """'missing', 'unexpected' or 'shape'."""
    if self.actual is None:
      return 'missing'
    return 'unexpected' if self.expected is None else 'shape'


def shapes(tree: Any) -> dict[str, Shape]:
  """The shapes of a tree's leaves by path.

  Args:
    tree: a pytree (nested dicts, a TrainState, orbax metadata) whose leaves
      have a `.shape`: arrays, `jax.ShapeDtypeStruct`s, array metadata.

  Returns:
    {'params/stem_conv/kernel': shape}, in the tree's flattening order.
  """
  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): tuple(
      np.shape(leaf)
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def diff(
  expected: Mapping[str, Sequence[int]],
  actual: Mapping[str, Sequence[int]],
  key: Callable[[str], Any] | None = None,
) -> list[Problem]:
  """Every path whose presence or shape differs between two {path: shape}.

  Args:
    expected: the shapes wanted (a model's).
    actual: the shapes found (a checkpoint's, a file's).
    key: sorts the problems by `key(path)`; by default they come in
      `expected`'s order, then the unexpected ones sorted by path.

  Returns:
    A `Problem` for each path missing from `actual`, only in `actual`, or
    of another shape there.
  """
  problems = []
  for path, shape in expected.items():
    found = actual.get(path)
    if found is None or tuple(found) != tuple(shape):
      found = None if found is None else tuple(found)
      problems.append(Problem(path, tuple(shape), found))
  problems += [
    Problem(path, None, tuple(actual[path]))
    for path in sorted(actual)
    if path not in expected
  ]
  return (
    problems if key is None else sorted(problems, key=lambda p: key(p.path))
  )


def summarize(
  problems: Sequence[Problem],
  limit: int | None = None,
  *,
  missing: str = '{path} is missing',
  unexpected: str = '{path} is unexpected',
  shape: str = '{path} has shape {actual}, expected {expected}',
  names: Mapping[str, str] | None = None,
) -> str:
  """The problems in one line: the first `limit`, then '... and K more'.

  Args:
    problems: from `diff`.
    limit: how many to describe; None: all.
    missing: the wording of a missing entry, formatted with `path`, `name`
      (`names[path]`, else the path), `expected` and `actual` (shapes, None
      where absent).
    unexpected: the same for an entry only in `actual`.
    shape: the same for an entry of another shape.
    names: what else to call some paths (the Flax path of a torch key).

  Returns:
    The descriptions joined by '; '.
  """
  words = dict(missing=missing, unexpected=unexpected, shape=shape)
  names = names or {}
  shown = [
    words[p.kind].format(**p._asdict(), name=names.get(p.path, p.path))
    for p in problems[:limit]
  ]
  if limit is not None and len(problems) > limit:
    shown.append(f'... and {len(problems) - limit} more')
  return '; '.join(shown)
