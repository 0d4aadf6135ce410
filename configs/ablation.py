"""The paper's ablations: width x resolution (Fig. 5) and the Fig. 6 variants.

  python -m mnv2_flax.sweep --config=configs/ablation.py:fashion_mnist \
      --root=sweeps/fashion_mnist
  python -m mnv2_flax.sweep \
      --config='configs/ablation.py:grid,width=0.35|0.5|1.0,res=32|48,seeds=3' \
      --root=sweeps/mine
  python train.py --config=configs/ablation.py:width=0.5,res=48 --workdir=...

A point (one run) is comma-separated `key=value` with keys from KEYS. A sweep
is a name (SWEEPS, or `grid` for none) followed by `key=value` items: a value
with `|`-separated alternatives is an axis, and the sweep is the product of
its axes (a named sweep's own axes give way to yours); `seeds=N` adds the
axis seed=0|...|N-1. Every (point, seed) is its own run; the summary groups
the seeds of a point and compares points seed by seed. Runs that differ only
in `seed`, `lr`, `wd`, `ls` and `ema` (`mnv2_flax.sweep.grid.MEMBER_KEYS`)
share one program and may train as one pack (`--pack`).

Named sweeps, on Fashion-MNIST unless `data=imagenet`: `fashion_mnist`
(`make sweep`; grid, epochs and seeds below, times in docs/sweeps.md),
`imagenet` (the paper's 21 points, one seed, not run here), and the Fig. 6
ablations `bottleneck` (6a) and `shortcut` (6b); `equal_cost` (POINTS:
widths against resolutions at matched MACs); `fashion_mnist_lr` (the
`fashion_mnist` grid at three peak learning rates, chosen per point on
minival).
"""

import itertools

from configs import default
from configs import quickstart

KEYS = (
  'data',  # 'fashion_mnist' (quickstart optimiser, output stride 32, batch
  # 256) or 'imagenet' (the TF-slim recipe of configs/default.py)
  'width',  # config.model.width_multiplier
  'res',  # config.data.image_size
  'bottleneck',  # 'linear' (the design) or 'relu6' (Fig. 6a)
  'shortcut',  # 'bottleneck' (the design), 'expansion' or 'none' (Fig. 6b)
  'expand',  # the expansion ratio t (6 in the paper)
  'epochs',  # config.train.num_epochs
  # config.data.crop_area_range = (crop, 1): random-resized crops of at
  # least this share of the image in training; 1 for none (Fashion-MNIST's)
  'crop',
  # The recipe's scalars that a pack's members may differ in (one program):
  'lr',  # config.optim.learning_rate (the peak, before batch scaling)
  'wd',  # config.optim.weight_decay
  'ls',  # config.optim.label_smoothing
  'ema',  # config.optim.ema_decay
  'seed',  # config.seed: initialisation, data order and augmentation
)
DATASETS = ('fashion_mnist', 'imagenet')
CHOICES = dict(
  data=DATASETS,
  bottleneck=('linear', 'relu6'),
  shortcut=('bottleneck', 'expansion', 'none'),
)

# `make sweep`: the 2x2 corners of the width x resolution grid, 1 epoch, 5
# seeds, chosen for cost (20 minutes from a fresh clone on 2 cores, two runs
# at a time) and interval width before any result of it was seen: one-epoch
# points vary by 1-2 points between seeds, and 5 seeds halve the 95% interval
# of 3 (t / sqrt(n): 1.24 against 2.48 standard deviations).
SEEDS = tuple(str(s) for s in range(5))
FASHION_MNIST_GRID = dict(width=('0.35', '0.75'), res=('32', '48'))
LEARNING_RATES = ('0.025', '0.05', '0.1')
IMAGENET_GRID = dict(
  data=('imagenet',),
  width=('0.35', '0.5', '0.75', '1.0'),
  res=('96', '128', '160', '192', '224'),
)
# name: its axes (key: values). `grid` has none: the user's items make it.
SWEEPS = {
  'fashion_mnist': dict(FASHION_MNIST_GRID, seed=SEEDS),
  'imagenet': IMAGENET_GRID,
  'bottleneck': dict(bottleneck=CHOICES['bottleneck'], seed=SEEDS),
  'shortcut': dict(shortcut=CHOICES['shortcut'], seed=SEEDS),
  'equal_cost': dict(seed=SEEDS),
  # `fashion_mnist` with the peak learning rate tuned per point: half, once
  # and twice the grid's own 0.05, so its runs are the untuned ones.
  'fashion_mnist_lr': dict(FASHION_MNIST_GRID, lr=LEARNING_RATES, seed=SEEDS),
  'grid': {},
}
# Named sweeps of chosen (width, res) points rather than a product: the
# summary compares points within 1.15x of each other's MACs
# (`verdicts.compare_equal_cost`). `equal_cost`: width against resolution at
# ~4.5M multiply-adds (0.35@64 4.75M, 0.5@40 4.70M, 0.75@32 4.25M) and at
# ~6.5M (0.5@56 7.00M, 1.0@32 6.12M), output stride 32.
POINTS = {
  'equal_cost': (
    dict(width='0.35', res='64'),
    dict(width='0.5', res='40'),
    dict(width='0.75', res='32'),
    dict(width='0.5', res='56'),
    dict(width='1.0', res='32'),
  ),
}
NUMBERS = dict(
  width=float,
  res=int,
  expand=float,
  epochs=float,
  crop=float,
  lr=float,
  wd=float,
  ls=float,
  ema=float,
  seed=int,
)
# Where 0 is valid (>= 0); every other number must be > 0. Fractions < 1;
# shares <= 1.
ZERO_VALID = ('seed', 'wd', 'ls')
FRACTIONS = ('ls', 'ema')
SHARES = ('crop',)

# The TF-slim checkpoints' published ImageNet numbers, (width, resolution):
# (MACs in millions, top-1 %): the numeric form of the paper's Fig. 5, drawn
# beside ImageNet sweeps.
PUBLISHED = {
  (1.4, 224): (582, 75.0),
  (1.3, 224): (509, 74.4),
  (1.0, 224): (300, 71.8),
  (1.0, 192): (221, 70.7),
  (1.0, 160): (154, 68.8),
  (1.0, 128): (99, 65.3),
  (1.0, 96): (56, 60.3),
  (0.75, 224): (209, 69.8),
  (0.75, 192): (153, 68.7),
  (0.75, 160): (107, 66.4),
  (0.75, 128): (69, 63.2),
  (0.75, 96): (39, 58.8),
  (0.5, 224): (97, 65.4),
  (0.5, 192): (71, 63.9),
  (0.5, 160): (50, 61.0),
  (0.5, 128): (32, 57.7),
  (0.5, 96): (18, 51.2),
  (0.35, 224): (59, 60.3),
  (0.35, 192): (43, 58.2),
  (0.35, 160): (30, 55.7),
  (0.35, 128): (20, 50.8),
  (0.35, 96): (11, 45.5),
}


def _value(key: str, value: str):
  """`value` of point key `key` as the config takes it; one clear error."""
  if key in CHOICES:
    if value not in CHOICES[key]:
      raise ValueError(
        f'ablation argument {key}={value!r}: valid are '
        f'{" or ".join(CHOICES[key])}.'
      )
    return value
  kind = NUMBERS[key]
  try:
    number = kind(value)
  except ValueError:
    number = None
  if (
    number is None
    or number < 0
    or (number == 0 and key not in ZERO_VALID)
    or (key in FRACTIONS and number >= 1)
    or (key in SHARES and number > 1)
  ):
    what = 'an integer' if kind is int else 'a number'
    bound = '>= 0' if key in ZERO_VALID else '> 0'
    if key in FRACTIONS:
      bound += ' and < 1'
    if key in SHARES:
      bound += ' and <= 1'
    raise ValueError(
      f'ablation argument {key}={value!r} is not {what} {bound}.'
    )
  return number


def _items(arg: str | None, keys: tuple[str, ...]) -> dict[str, str]:
  """'width=0.5,res=24' -> {'width': '0.5', 'res': '24'}, keys checked."""
  args = {}
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition('=')
    if not sep or key not in keys:
      raise ValueError(
        f'ablation argument {item!r}: expected key=value with key one of '
        f'{", ".join(keys)}.'
      )
    if key in args:
      raise ValueError(f'ablation argument {key} is given twice.')
    args[key] = value.strip()
  return args


def parse(arg: str | None) -> dict[str, str]:
  """One point: 'width=0.5,res=24' -> {'width': '0.5', 'res': '24'}."""
  args = _items(arg, KEYS)
  for key, value in args.items():
    if '|' in value:
      raise ValueError(
        f'ablation argument {key}={value!r}: one value per run; `|` makes '
        'a grid for `python -m mnv2_flax.sweep`.'
      )
    _value(key, value)
  return args


def point_arg(args: dict[str, str]) -> str:
  """The canonical argument string of a point (keys in KEYS order)."""
  return ','.join(f'{k}={args[k]}' for k in KEYS if k in args)


def get_config(arg=None):
  """The config of one point; `arg` as in the module docstring."""
  args = {k: _value(k, v) for k, v in parse(arg).items()}
  if args.get('data', 'fashion_mnist') == 'imagenet':
    config = default.get_config()
  else:
    config = quickstart.get_config()
    # The quickstart's optimiser on the plain network (output stride 32),
    # batch 256, 1 epoch, width 0.5 and 32 px unless the point says: the
    # sweep compares widths and resolutions of the paper's architecture.
    config.model.output_stride = None
    config.data.batch_size = 256
    config.train.num_epochs = 1.0
    # Peak learning rate 0.05, half the quickstart's: chosen on the minival
    # split at the noisiest point (width 0.35, 32 px, seeds 0-4; peak / batch
    # -> minival top-1 mean, seed std): 0.1 / 256 -> 79.3, 3.2; 0.1 / 128 ->
    # 75.2, 8.7; 0.05 / 128 -> 83.2, 1.0; 0.025 / 128 -> 83.1, 0.8;
    # 0.05 / 256 -> 82.4, 0.6; 0.025 / 256 -> 81.5, 0.7. At 0.1 some seeds
    # stall for a while (seed 3: 74%), and that, not rounding, was the
    # spread between seeds. The lowest spread within a point of the best
    # mean (docs/sweeps.md).
    config.optim.learning_rate = 0.05
    # Single-view metrics only (what the summary reports): half the eval.
    config.data.eval_flip_average = False
  fields = dict(
    width=('model', 'width_multiplier'),
    res=('data', 'image_size'),
    bottleneck=('model', 'bottleneck_activation'),
    shortcut=('model', 'shortcut'),
    expand=('model', 'expand_ratio'),
    epochs=('train', 'num_epochs'),
    lr=('optim', 'learning_rate'),
    wd=('optim', 'weight_decay'),
    ls=('optim', 'label_smoothing'),
    ema=('optim', 'ema_decay'),
  )
  for key, (section, field) in fields.items():
    if key in args:
      config[section][field] = args[key]
  if 'crop' in args:
    config.data.crop_area_range = (args['crop'], 1.0)
  if 'seed' in args:
    config.seed = args['seed']
  return config


def get_sweep(arg=None) -> list[str]:
  """The point arguments of the sweep `arg` describes (see the docstring).

  Seeds vary slowest: a sweep stopped part-way has whole seeds done.
  """
  items = [i.strip() for i in (arg or 'fashion_mnist').split(',')]
  name = 'grid' if '=' in items[0] else items.pop(0)
  if name not in SWEEPS:
    raise ValueError(
      f'sweep {name!r} is not known; valid are {", ".join(SWEEPS)} '
      '(grid: only your key=value items).'
    )
  user = {}
  for key, text in _items(','.join(items), (*KEYS, 'seeds')).items():
    values = tuple(v.strip() for v in text.split('|'))
    if len(set(values)) != len(values):
      raise ValueError(f'ablation argument {key}={text!r} repeats a value.')
    for value in values:
      _value('seed' if key == 'seeds' else key, value)
    user[key] = values
  axes = dict(SWEEPS[name])
  if 'seeds' in user:
    if 'seed' in user:
      raise ValueError(
        'ablation arguments seeds and seed: give one (seeds=N for 0..N-1, '
        'or seed=0|3|7).'
      )
    if len(user['seeds']) != 1 or user['seeds'] == ('0',):
      raise ValueError(
        f'ablation argument seeds={"|".join(user["seeds"])!r}: expected one '
        'count N >= 1 (seeds 0..N-1); to choose seeds, use seed=0|3|7.'
      )
    user['seed'] = tuple(str(s) for s in range(int(user.pop('seeds')[0])))
  axes.update(user)
  keys = [k for k in KEYS if k in axes]
  points = [
    dict(zip(keys, values, strict=True))
    for values in itertools.product(*(axes[k] for k in keys))
  ]
  if name in POINTS:
    if {'width', 'res'} & set(user):
      raise ValueError(
        f'sweep {name!r} chooses its own width and res; drop them from '
        'the items, or use grid.'
      )
    points = [dict(p, **q) for p in points for q in POINTS[name]]
  if name == 'imagenet' and not {'width', 'res'} & set(user):
    # The paper's largest model beside the grid, with every other axis.
    others = [k for k in keys if k not in ('width', 'res')]
    points += [
      dict(zip(others, values, strict=True), width='1.4', res='224')
      for values in itertools.product(*(axes[k] for k in others))
    ]
  points.sort(key=lambda p: int(p.get('seed', 0)))
  return [point_arg(p) for p in points]
