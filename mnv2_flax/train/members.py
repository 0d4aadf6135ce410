"""The members of a pack: what they may differ in, and the checks that
they can train as one program (`train_lib.train_seeds`).

A member is one run: a seed today, with the train step's hyperparameter
arguments (`training_state.HYPERPARAMETERS`) its own too. Members keep
their own workdirs; the rest of their config is one.
"""

import json
import os
from typing import Any

import ml_collections

from mnv2_flax import checkpointing
from mnv2_flax.train import training_state


def seed_pack(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[list[ml_collections.ConfigDict], list[str]]:
  """The pack `config.train.seeds` asks for: seeds config.seed, ...,
  config.seed + seeds - 1, each in `<workdir>/seed-<seed>`, one run each."""
  configs, workdirs = [], []
  for i in range(config.train.seeds):
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed, c.train.seeds = config.seed + i, 1
    configs.append(c)
    workdirs.append(os.path.join(workdir, f'seed-{c.seed}'))
  return configs, workdirs


# What the members of a pack may differ in: the seed, and the train step's
# hyperparameter arguments (`training_state.HYPERPARAMETERS`).
MEMBER_FIELDS = ('seed',) + tuple(
  f'optim.{name}' for name in training_state.HYPERPARAMETERS
)


def _field(config: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split('.'):
    config = config[part]
  return config


def differences(
  configs: list[ml_collections.ConfigDict],
) -> list[str]:
  """The `MEMBER_FIELDS` in which `configs` differ, in that order."""
  return [
    f for f in MEMBER_FIELDS if len({repr(_field(c, f)) for c in configs}) > 1
  ]


def name(config: ml_collections.ConfigDict, differ: list[str]) -> str:
  """'seed 3', or 'seed 3 learning_rate 0.05 ...' for what differs."""
  name = f'seed {config.seed}'
  for field in differ:
    if field != 'seed':
      name += f' {field.split(".")[-1]} {_field(config, field):g}'
  return name


def check_pack(
  configs: list[ml_collections.ConfigDict], workdirs: list[str]
) -> None:
  """Configs that differ in `MEMBER_FIELDS` only, no two alike, and their
  own workdirs."""
  if not configs or len(configs) != len(workdirs):
    raise ValueError(
      f'a pack needs one workdir per config: {len(configs)} configs, '
      f'{len(workdirs)} workdirs.'
    )
  members = [tuple(repr(_field(c, f)) for f in MEMBER_FIELDS) for c in configs]
  if len(set(members)) < len(members) or len(set(workdirs)) < len(workdirs):
    raise ValueError(
      'the members of a pack must differ (in the seed or in '
      f'{", ".join(MEMBER_FIELDS[1:])}), and their workdirs: members '
      f'{[name(c, MEMBER_FIELDS) for c in configs]}, workdirs '
      f'{workdirs}.'
    )
  # As a checkpoint's saved config is compared (JSON: tuples as lists).
  first = json.loads(json.dumps(configs[0].to_dict()))
  for config in configs[1:]:
    differ = [
      d
      for d in checkpointing.config_differences(first, config)
      if not d.startswith(tuple(f'config.{f}:' for f in MEMBER_FIELDS))
    ]
    if differ:
      raise ValueError(
        'the members of a pack share one config but for '
        f'{", ".join("config." + f for f in MEMBER_FIELDS)}; '
        f'{name(config, MEMBER_FIELDS)} differs from the first member '
        f'in {differ[0]}.'
      )
  if len({c.optim.weight_decay == 0 for c in configs}) > 1:
    raise ValueError(
      'the members of a pack decay weights, or none does: config.optim.'
      f'weight_decay is {[c.optim.weight_decay for c in configs]} (0 '
      'leaves the optimizer without its decay step, another structure); '
      'train the members without decay as a pack of their own.'
    )
