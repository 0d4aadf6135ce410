"""Fine-tuning the quickstart checkpoint on handwritten digits, or the same
run from scratch.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python train.py --config=configs/finetune_digits.py \
    --workdir=workdirs/digits_finetuned
  python train.py --config=configs/finetune_digits.py:scratch \
    --workdir=workdirs/digits_scratch

The task: scikit-learn's 1,797 8x8 digit scans (`mnv2_flax/data/digits.py`;
1,297 train, 500 test), upscaled to the quickstart's 32 pixels. Modes (the
argument): 'finetune' (default) starts from the Fashion-MNIST quickstart's
EMA weights, its classifier reset (digits are other classes); 'scratch' is
the same run from a random init; 'probe' trains the classifier alone on
frozen features and BatchNorm. Every mode has the same steps and recipe;
`--config.init_from=` points at another checkpoint. Results: README,
"Fine-tuning".
"""

from configs import quickstart

MODES = ('finetune', 'scratch', 'probe')


def get_config(arg=None):
  """Returns the config of mode `arg` (default 'finetune')."""
  mode = arg or 'finetune'
  if mode not in MODES:
    raise ValueError(
      f'configs/finetune_digits.py:{mode} is not a mode; expected one of '
      f'{", ".join(MODES)}.'
    )
  config = quickstart.get_config()
  if mode != 'scratch':
    config.init_from = 'workdirs/quickstart'
    # Same class count, other classes: the digits get a fresh classifier.
    config.init_reset = '^classifier/'
  if mode == 'probe':
    config.optim.freeze_backbone = True
    config.model.bn_frozen = True

  config.data.name = 'sklearn_digits'
  config.data.train_split = 'train'  # all of it: nothing is chosen here
  config.data.minival_split = ''
  config.data.batch_size = 64
  config.data.eval_batch_size = 500
  config.data.random_flip = False  # a mirrored digit is not the digit
  config.data.eval_flip_average = False
  config.data.shuffle_buffer = 2_000

  config.optim.warmup_epochs = 1.0
  config.optim.weight_decay = 5e-4
  config.train.num_epochs = 10.0  # 200 steps of 64 images
  config.train.log_every_steps = 20
  config.train.eval_every_steps = 20  # the accuracy after every epoch
  config.checkpoint.every_steps = 100
  return config
