"""A final state evaluated at other test sizes than it trained at.

`config.data.test_image_sizes`: the eval (and minival) split centre-cropped
and resized to each size, BatchNorm statistics as trained (`at_resolution`
in results.json); `config.data.test_bn_examples`: also at those sizes and
the training size with the statistics re-estimated there, as FixRes does
(`at_resolution_bn`). The loop (`train_lib`) calls `evaluate` once its last
step is done.
"""

from collections.abc import Callable, Iterator
import itertools
from typing import Any

from absl import logging
import jax
import ml_collections

from mnv2_flax.data import input_pipeline
from mnv2_flax.runtime import placement
from mnv2_flax.train import steps
from mnv2_flax.train import training_state


def evaluate(
  config: ml_collections.ConfigDict,
  builder,
  num_classes: int,
  state,
  pack: int,
  evaluate_splits: Callable,
) -> Iterator[tuple[str, int, list[dict[str, float]]]]:
  """(results.json key, size, per member its metrics) for each evaluation
  the config asks for. `evaluate_splits(state, eval_ds, minival_ds)` gives
  per member the metrics of the splits (`train_lib._evaluate_splits`)."""
  sizes = tuple(config.data.test_image_sizes)
  for size in sizes:
    yield (
      'at_resolution',
      size,
      _at(config, builder, size, state, evaluate_splits),
    )
  if config.data.test_bn_examples:
    for size in sorted({config.data.image_size, *sizes}):
      stats = reestimated_stats(config, builder, num_classes, state, pack, size)
      yield (
        'at_resolution_bn',
        size,
        _at(
          config,
          builder,
          size,
          state.replace(batch_stats=stats),
          evaluate_splits,
        ),
      )


def _at_size(config: ml_collections.ConfigDict, size: int):
  at = ml_collections.ConfigDict(config.to_dict())
  at.data.image_size = size
  return at


def _at(config, builder, size, state, evaluate_splits) -> list[dict]:
  at = _at_size(config, size)
  minival = None
  if at.data.minival_split:
    minival = input_pipeline.create_eval_dataset(
      builder, at, field='minival_split'
    )
  per_member = evaluate_splits(
    state, input_pipeline.create_eval_dataset(builder, at), minival
  )
  return [
    {k: v for k, v in m.items() if 'top1' in k or 'loss' in k}
    for m in per_member
  ]


def reestimated_stats(
  config: ml_collections.ConfigDict,
  builder,
  num_classes: int,
  state,
  pack: int,
  size: int,
) -> Any:
  """BatchNorm statistics at `size`: those of `config.data.test_bn_examples`
  training images (rounded down to whole eval batches; each process the
  first of its share), preprocessed as for evaluation, pooled over the
  batches, under each member's raw parameters."""
  at = _at_size(config, size)
  batches = at.data.test_bn_examples // at.data.eval_batch_size
  at.model.bn_momentum = 0.0  # the batch's own statistics
  at.model.bn_frozen = False  # else training mode leaves them as trained
  still = training_state.create_model(at, num_classes)
  moments = steps.make_p_batch_moments(still.apply, at.data.normalization, pack)
  data = input_pipeline.create_eval_dataset(builder, at, field='train_split')
  per_batch = [
    jax.device_get(moments(state, batch))
    for batch in itertools.islice(
      input_pipeline.prefetch_to_device(data, placement.split()), batches
    )
  ]
  logging.info(
    'BatchNorm statistics at %d px from %d training images.',
    size,
    batches * at.data.eval_batch_size,
  )
  return steps.pooled_statistics(per_batch)
