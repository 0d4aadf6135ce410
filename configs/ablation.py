"""The paper's ablations: width x resolution (Fig. 5) and the Fig. 6 variants.

  python -m mnv2_flax.sweep --config=configs/ablation.py:fashion_mnist \
      --root=sweeps/fashion_mnist
  python train.py --config=configs/ablation.py:width=0.5,res=48 --workdir=...

A point is comma-separated `key=value` (KEYS below); a sweep is a name from
SWEEPS, then point arguments every point shares (`fashion_mnist,epochs=2`).
Hardware and time: `fashion_mnist` (widths 0.35 / 0.5 / 0.75 x 32 / 48 px,
1 epoch each) takes 7.5 minutes on a 2-core CPU; its table and figure are in
docs/sweep_fashion_mnist.md. `imagenet` is the paper's 21-point grid (not run
here); `bottleneck` and `shortcut` are Fig. 6a and 6b, on Fashion-MNIST
unless `data=imagenet`.
"""

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
  'seed',  # config.seed
)
DATASETS = ('fashion_mnist', 'imagenet')
FASHION_MNIST_GRID = dict(widths=(0.35, 0.5, 0.75), resolutions=(32, 48))
IMAGENET_GRID = dict(
  widths=(0.35, 0.5, 0.75, 1.0), resolutions=(96, 128, 160, 192, 224)
)
FIG6 = dict(
  bottleneck=('linear', 'relu6'),
  shortcut=('bottleneck', 'expansion', 'none'),
)
SWEEPS = ('fashion_mnist', 'imagenet', *FIG6)

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


def parse(arg: str | None) -> dict[str, str]:
  """'width=0.5,res=24' -> {'width': '0.5', 'res': '24'}, keys checked."""
  args = {}
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition('=')
    if not sep or key not in KEYS:
      raise ValueError(
        f'ablation argument {item!r}: expected key=value with key one of '
        f'{", ".join(KEYS)}.'
      )
    args[key] = value
  if args.get('data', 'fashion_mnist') not in DATASETS:
    raise ValueError(
      f'ablation argument data={args["data"]!r}: valid are '
      f'{" or ".join(DATASETS)}.'
    )
  return args


def point_arg(args: dict[str, str]) -> str:
  """The canonical argument string of a point (keys in KEYS order)."""
  return ','.join(f'{k}={args[k]}' for k in KEYS if k in args)


def _number(key, value, kind):
  try:
    return kind(value)
  except ValueError:
    raise ValueError(
      f'ablation argument {key}={value!r} is not a {kind.__name__}.'
    ) from None


def get_config(arg=None):
  """The config of one point; `arg` as in the module docstring."""
  args = parse(arg)
  if args.get('data', 'fashion_mnist') == 'imagenet':
    config = default.get_config()
  else:
    config = quickstart.get_config()
    # The quickstart's optimiser on the plain network (output stride 32),
    # batch 256, 1 epoch: the sweep compares widths and resolutions of the
    # paper's architecture.
    config.model.output_stride = None
    config.data.batch_size = 256
    config.train.num_epochs = 1.0
  if 'width' in args:
    config.model.width_multiplier = _number('width', args['width'], float)
  if 'res' in args:
    config.data.image_size = _number('res', args['res'], int)
  if 'bottleneck' in args:
    config.model.bottleneck_activation = args['bottleneck']
  if 'shortcut' in args:
    config.model.shortcut = args['shortcut']
  if 'expand' in args:
    config.model.expand_ratio = _number('expand', args['expand'], float)
  if 'epochs' in args:
    config.train.num_epochs = _number('epochs', args['epochs'], float)
  if 'seed' in args:
    config.seed = _number('seed', args['seed'], int)
  return config


def get_sweep(arg=None) -> list[str]:
  """The point arguments of the sweep `arg` names (see the docstring)."""
  name, _, shared = (arg or 'fashion_mnist').partition(',')
  if name not in SWEEPS:
    raise ValueError(
      f'sweep {name!r} is not known; valid are {", ".join(SWEEPS)}.'
    )
  shared = parse(shared)
  if name == 'imagenet':
    shared['data'] = 'imagenet'
  if name in ('fashion_mnist', 'imagenet'):
    grid = FASHION_MNIST_GRID if name == 'fashion_mnist' else IMAGENET_GRID
    points = [
      dict(width=str(w), res=str(r))
      for w in grid['widths']
      for r in grid['resolutions']
    ]
    if name == 'imagenet':
      points.append(dict(width='1.4', res='224'))
  else:
    points = [{name: value} for value in FIG6[name]]
  return [point_arg({**shared, **point}) for point in points]
