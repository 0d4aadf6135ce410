"""tree_diff: what differs between two trees, in a stable order, in words."""

import jax
import jax.numpy as jnp
import numpy as np

from mnv2_flax.runtime import tree_diff
from mnv2_flax.runtime.tree_diff import Problem

MODEL = {'a/kernel': (3, 3), 'b/kernel': (4,), 'c/bias': (2,)}


def test_same_shapes_differ_in_nothing():
  assert tree_diff.diff(MODEL, dict(MODEL)) == []
  assert tree_diff.diff({}, {}) == []
  assert tree_diff.diff({'s': ()}, {'s': []}) == []  # any sequence of ints


def test_missing_unexpected_and_mis_shaped_entries():
  saved = {'a/kernel': [3, 4], 'c/bias': (2,), 'z': (1,), 'd/bias': ()}
  problems = tree_diff.diff(MODEL, saved)
  assert problems == [
    Problem('a/kernel', (3, 3), (3, 4)),
    Problem('b/kernel', (4,), None),
    Problem('d/bias', None, ()),
    Problem('z', None, (1,)),
  ]
  assert [p.kind for p in problems] == [
    'shape',
    'missing',
    'unexpected',
    'unexpected',
  ]


def test_order_is_expected_then_unexpected_sorted_or_by_key():
  expected = {'z': (1,), 'a': (1,), 'm': (1,)}
  actual = {'y': (1,), 'b': (1,), 'm': (2,)}
  paths = [p.path for p in tree_diff.diff(expected, actual)]
  assert paths == ['z', 'a', 'm', 'b', 'y']
  # The same whatever order `actual` was built in.
  reordered = dict(reversed(list(actual.items())))
  assert tree_diff.diff(expected, reordered) == tree_diff.diff(expected, actual)
  by_path = tree_diff.diff(expected, actual, key=lambda path: path)
  assert [p.path for p in by_path] == ['a', 'b', 'm', 'y', 'z']


def test_summarize_words_each_kind_and_truncates():
  problems = tree_diff.diff(MODEL, {'a/kernel': (3, 4), 'z': (1,)})
  assert tree_diff.summarize(problems) == (
    'a/kernel has shape (3, 4), expected (3, 3); b/kernel is missing; '
    'c/bias is missing; z is unexpected'
  )
  assert tree_diff.summarize(problems, 2) == (
    'a/kernel has shape (3, 4), expected (3, 3); b/kernel is missing; '
    '... and 2 more'
  )
  assert tree_diff.summarize(problems, 4) == tree_diff.summarize(problems)
  assert tree_diff.summarize([], 3) == ''
  custom = tree_diff.summarize(
    problems,
    3,
    missing='missing {path!r} (for {name}, shape {expected})',
    unexpected='only {path}',
    shape='{name}: {actual} here, {expected} there',
    names={'a/kernel': 'A', 'b/kernel': 'B'},
  )
  assert custom == (
    "A: (3, 4) here, (3, 3) there; missing 'b/kernel' (for B, shape (4,)); "
    "missing 'c/bias' (for c/bias, shape (2,)); ... and 1 more"
  )


def test_shapes_of_a_tree_by_path():
  tree = {
    'params': {'conv': {'kernel': np.zeros((3, 3, 1, 8))}},
    'opt': (jnp.zeros(2), [jax.ShapeDtypeStruct((5,), jnp.float32)]),
    'step': np.int32(0),
  }
  assert tree_diff.shapes(tree) == {
    'opt/0': (2,),
    'opt/1/0': (5,),
    'params/conv/kernel': (3, 3, 1, 8),
    'step': (),
  }
  problems = tree_diff.diff(
    tree_diff.shapes(tree), {'params/conv/kernel': (3, 3, 1, 4)}
  )
  assert [p.kind for p in problems] == [
    'missing',
    'missing',
    'shape',
    'missing',
  ]
