"""Fashion-MNIST on CPU: width 0.5, 32 pixels, output stride 16, 7.5 epochs.

  python train.py --config=configs/quickstart.py --workdir=workdirs/quickstart

Measured on this project's 2-core machine (no accelerator), `time python
train.py --config=configs/quickstart.py --workdir=...` from cold caches (a
fresh MNV2_FLAX_NATIVE_DIR and compilation cache: the C++ kernels built and
every XLA program compiled):
  * test top-1 91.53% single view (EMA 91.51%); 92.01% (EMA) for the mean
    over each test image and its mirror (`eval_flip_average`, metrics
    flip_top1 / ema_flip_top1). A seed reproduces its bits; this is seed 0.
    Seeds 1 / 2 / 3 (`--config.seed=N`): 91.46 / 91.71 / 91.45% (mean of
    the four 91.54%, lowest 91.45%; measured with this train_step and input
    pipeline in a throwaway loop, which gave seed 0's bits too).
  * 3 min 44 s wall, compile included, at 2,446 training images/s (the
    init and train-step programs compiled in a child process in 16.9 s
    while the shuffle buffer fills; see mnv2_flax/precompile.py). The
    reference train step (`python -m mnv2_flax.benchmark
    --width_multiplier=0.5 --resolution=32 --batch_size=128
    --num_classes=10 --output_stride=16`) took 42.7 ms before the run and
    47.0 ms after it. This machine's speed varies by up to 2.5x with the
    same code: the same step took 74 ms an hour earlier, which would make
    this run about 5 min 40 s; 48.9-55.0 ms around the 4 min 27 s run below.

How the recipe was chosen (same machine unless said; single view):
  * The weight decay mask was the last lever: the TF-slim mask (conv and
    dense kernels only, not the depthwise kernels) gave 90.52 / 90.69 /
    91.19 / 91.38% for seeds 0-3 (mean 90.95%; seed 0 in 4 min 27 s cold),
    the no-norm mask (also the depthwise kernels and the classifier bias)
    91.53 / 91.46 / 91.71 / 91.45% (mean 91.54%). Each depthwise kernel is
    followed by BatchNorm, so decaying it does not change what the layer
    computes; it keeps the kernel small and its effective step large.
    The bullets below used the TF-slim mask.
  * Not better (seed 0 unless said, 7.5 epochs of this recipe): zero
    padding 28 -> 32 instead of the bilinear resize 90.94 / 90.68% (seeds
    0 / 2); 9 epochs 90.73%; output stride 16 for 6 epochs then 8 for 1.25
    (same parameters, denser last maps to finish) 90.43%; 24 pixels at
    output stride 8 (3x3 last maps), 6 epochs, 89.28%. Evaluating an output
    stride 16 model at output stride 8 without training at it: 47%.
  * Learning rate 0.15 per 256 (the previous value) gave 91.06% (EMA
    91.12%, flip-averaged 91.48%) for seed 0 in 4 min 24 s and 4 min 37 s
    cold (reference 60.8 and 67.7 ms), 90.71% for seed 1, but 89.12% for
    seed 2: its training loss jumped at epoch 2 (0.46 -> 0.57, training
    accuracy 83 -> 79%) and it never caught up. At 0.1 seed 2 trained
    smoothly (91.19%) and seed 0 gave 90.52%: about the same mean without the
    excursion.
  * The previous quickstart, width 0.35 at output stride 8 (4x4 maps in the
    last stages), 6.5 epochs, lr 0.15: 90.78% (flip-averaged 91.31%); cold,
    6 min 17 s when its steps were compiled in the training process, 5 min
    50 s with the child compile (reference step 92-94 ms). Its train step
    takes 90-96 ms where width 0.5 at output stride 16 takes 61-68 ms
    (benchmark above, same hour), for the same accuracy: 90.85% at 6.5
    epochs. The time saved pays for 7.5 epochs.
  * More capacity does reach 91% for both seeds tried, but not in 5
    minutes: width 0.5 at output stride 8 (4x4 maps), lr 0.1, 7.5 epochs:
    91.45 / 91.31% (seeds 0 / 2; EMA 91.36 / 91.33%), but 3,510 steps at
    its ~130 ms in the loop take about 8 minutes alone (the two runs shared
    the cores); its benchmark step took 114.6 ms in an hour when this
    config's took ~50 ms. At 5.5 epochs (seed 0): 90.91% (flip-averaged
    91.20%) in 6 min 25 s cold, 1,000 images/s.
  * No variant tried around the recipe did better than about 91%. Width
    0.35 / output stride 8, 6.5 epochs, one run each on an H100 (lr 0.15;
    a throwaway script running this train_step with numpy input; the base
    recipe there gave 91.27 / 90.69% for seeds 0 / 1): label smoothing 0.1
    90.79%, lr 0.3 per 256 89.12%, L2 3e-3 90.38%, L2 1.5e-3 89.91% (seed
    1), 8 epochs 91.18 / 90.28% (seeds 0 / 1), random 2-pixel translations
    89.77%, EMA decay 0.999 90.53% (its EMA 89.41%), BN momentum 0.99 90.57%.
  * Weight decay was the lever for accuracy (width 0.35 / output stride 8,
    6.5 epochs, L2 5e-5 / 5e-4 / 1e-3 / 2e-3 / 4e-3: 90.4 / 90.7 / 90.9 /
    91.0 / 90.1%). With per-example flip draws (before batched flips) that
    recipe gave 91.03%; 7.5 epochs 90.66%. At L2 5e-5: 7 epochs 90.8%, no
    flips 90.4%, lr 0.3 (per 256) with label smoothing 0.1 90.2%; L2 5e-4
    with label smoothing 0.1: 90.1%. Earlier, 4.5 epochs with L2 5e-5: 90.0%
    (seeds 1 / 2: 89.6 / 90.0%). Read differences below half a point as
    noise.
  * Resolution 28 (no resize) is not faster: the odd map sizes (14, 7) made
    the width-0.35 step slower, 98.6 vs 94.0 ms.

What was tried before (same machine, the pure-JAX path; 1 epoch unless
said):
  * The plain network (output stride 32, batch 256, 3 epochs): 85.3% in
    3 min 30 s at 1,280 images/s. At 32 pixels its last stages run on 2x2
    and 1x1 maps, and training accuracy stays at test accuracy (it
    underfits). `output_stride=8` keeps them at 4x4 (TF-slim's atrous rule):
    83.9% vs 80.5% after 1 epoch; 88.0% after 2.5 epochs at batch 256, 89.2%
    at batch 128, 87.9% at batch 64 (5.5 min); output stride 16: 79.8%.
  * SGD learning rate 0.05 / 0.15 / 0.3 (per 256): 80.8 / 81.1 / 67.4% (the
    start is unstable above ~0.15; zero-initialised residual BatchNorm scales
    made it worse, 29%); 0.2 with output stride 8, batch 128, 2.5 epochs:
    88.3%. AdamW 3e-3, 3 epochs: 82.9%. Width 1.0 (batch 128): 85.7% at 480
    images/s. A stride-1 stem: 84.6% at 370 images/s. Resolution 48, 2
    epochs: 84.8-87.3% in 5.5-7 minutes.
  * For scale: a small plain CNN (two 3x3 conv + BN + max-pool layers, dense
    128; a throwaway script, SGD with Nesterov momentum, lr 0.1, warm-up then
    cosine, flips) reaches 83.6% after 1 epoch at batch 256: this schedule is
    short in steps, not only in capacity.

Fashion-MNIST is prepared offline on first use from the idx files of Debian's
`dataset-fashion-mnist` package (or `config.data.manual_dir`).
"""

from configs import default


def get_config(arg=None):
  """Returns the quickstart config."""
  config = default.get_config(arg)
  config.model.width_multiplier = 0.5
  config.model.dropout_rate = 0.0
  config.model.bn_momentum = 0.9
  # Strides past 16 become atrous rates: the last stages keep 2x2 maps at 32
  # pixels instead of 1x1. Width 0.5 at output stride 16 takes ~30% less time
  # per step than width 0.35 at output stride 8 (4x4 maps), for the same
  # accuracy (docstring).
  config.model.output_stride = 16

  config.data.name = 'fashion_mnist'
  config.data.image_size = 32
  config.data.batch_size = 128
  config.data.eval_batch_size = 500
  config.data.eval_split = 'test'
  # Centred 28x28 objects: no random crop (measured: area (0.6, 1) cost ~6
  # points of top-1 in this short schedule), flips only.
  config.data.crop_area_range = (1.0, 1.0)
  config.data.crop_min_object_covered = 0.0
  config.data.eval_crop_fraction = 1.0
  # Single-view metrics (top1, ema_top1) plus those of the mean over each
  # test image and its mirror (flip_top1, ema_flip_top1).
  config.data.eval_flip_average = True
  config.data.shuffle_buffer = 60_000
  config.data.cache = True
  # One tf.data thread: decoding 28x28 images needs ~5% of a core, and more
  # threads preempt XLA's two. Training images/s after the first epoch (from
  # the cache), 1 thread vs the shared pool: 2,000 vs 1,600 in one pair of
  # runs; 1,230 vs 1,160 (medians) in two interleaved pairs in a slower hour.
  config.data.threadpool_size = 1

  config.optim.optimizer = 'sgd'
  config.optim.nesterov = True
  # 0.15 (per 256) trained as well for most seeds but not all: seed 2's loss
  # jumped at epoch 2 (0.46 -> 0.57) and it ended at 89.12%. 0.1 did not.
  config.optim.learning_rate = 0.1
  config.optim.lr_reference_batch = 256
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 0.2
  # L2 on conv and dense kernels (not depthwise, BN, biases). Measured at
  # width 0.35 / output stride 8, 6.5 epochs: 5e-5 / 5e-4 / 1e-3 / 2e-3 gave
  # 90.4 / 90.7 / 90.9 / 91.0%.
  config.optim.weight_decay = 2e-3
  # Decay the depthwise kernels too (and the classifier bias): everything but
  # BatchNorm. Each depthwise conv is followed by BatchNorm, so decay does not
  # shrink its function, only keeps its step size up in this short schedule.
  # Seeds 0-3, 7.5 epochs: 91.53 / 91.46 / ... vs 90.52 / 90.69 / 91.19 /
  # 91.38% with the TF-slim mask (conv and dense kernels only).
  config.optim.weight_decay_mask = 'no_norm'
  config.optim.label_smoothing = 0.0
  config.optim.ema_decay = 0.99

  config.train.num_epochs = 7.5
  config.train.dtype = 'float32'
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 100_000  # at the end only

  config.checkpoint.every_steps = 500
  config.checkpoint.keep = 2
  return config
