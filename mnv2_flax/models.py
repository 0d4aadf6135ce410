"""MobileNetV2 (Sandler et al. 2018) as pure Flax Linen modules.

The architecture follows the paper's Table 2 and the authors' TF-slim code to
the last channel: 17 inverted residual blocks between a 3x3 stem and a 1x1
head, channels rounded with `make_divisible(v, 8)`, the head kept at 1280
channels for width multipliers up to 1.0.

Two numerics conventions are selectable so that published weights load:
`padding='tf'` (TF 'SAME', TF-slim/Keras checkpoints) and `padding='torch'`
(symmetric padding 1, torchvision/timm checkpoints). They differ only in the
stride-2 3x3 convolutions applied to an even-sized input.

Layer implementations are module fields with Flax defaults (`conv=nn.Conv`,
`norm_act=batch_norm_act`), so faster variants for one backend plug in
without changing the variables.

Usage:
  model = MobileNetV2(num_classes=10, width_multiplier=0.5)
  variables = model.init(jax.random.key(0), images_nhwc, train=False)
  logits = model.apply(variables, images_nhwc, train=False)
  logits, updates = model.apply(variables, images_nhwc, train=True,
                                mutable=['batch_stats'],
                                rngs={'dropout': key})
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
Dtype = Any

# Paper Table 2: (expansion t, output channels c, repeats n, first stride s).
BLOCK_SPECS: tuple[tuple[int, int, int, int], ...] = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
MIN_RESOLUTION = 32

PADDINGS = ('tf', 'torch')
SHORTCUTS = ('bottleneck', 'expansion', 'none')
BOTTLENECK_ACTIVATIONS = ('linear', 'relu6')

INIT_SCHEMES = ('tf_slim', 'torchvision')
OUTPUT_STRIDES = (None, 1, 2, 4, 8, 16, 32)

# What each field may be; model_fields.py holds the same rules in plain
# Python for config checks before JAX loads (tests/configs_test.py: equal).
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
  'width_multiplier': (
    lambda v: isinstance(v, int | float) and v > 0,
    'a number > 0 (published: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)',
  ),
  'num_classes': (
    lambda v: isinstance(v, int) and v >= 0,
    'an integer >= 0 (0 = no classifier)',
  ),
  'dropout_rate': (lambda v: 0 <= v < 1, '0 <= dropout_rate < 1'),
  'bn_momentum': (lambda v: 0 <= v <= 1, 'a value in [0, 1]'),
  'bn_epsilon': (lambda v: v > 0, 'a value > 0'),
  'expand_ratio': (
    lambda v: v is None or v > 0,
    "None (the paper's 6) or a number > 0",
  ),
}
_FIELD_CHOICES = {
  'padding': PADDINGS,
  'init_scheme': INIT_SCHEMES,
  'shortcut': SHORTCUTS,
  'output_stride': OUTPUT_STRIDES,
  'bottleneck_activation': BOTTLENECK_ACTIVATIONS,
}

# The published variants, by name. Resolution is a property of the input, not
# of the model: `mobilenet_v2_100` serves every row 1.0/96 ... 1.0/224.
PRESETS: dict[str, dict[str, Any]] = {
  'mobilenet_v2_035': dict(width_multiplier=0.35),
  'mobilenet_v2_050': dict(width_multiplier=0.5),
  'mobilenet_v2_075': dict(width_multiplier=0.75),
  'mobilenet_v2_100': dict(width_multiplier=1.0),
  'mobilenet_v2_130': dict(width_multiplier=1.3),
  'mobilenet_v2_140': dict(width_multiplier=1.4),
}


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds `value` to the nearest multiple of `divisor`, never below 90%.

  The rule shared by TF-slim, Keras, torchvision and timm: at least `divisor`,
  and if rounding lost more than 10% of `value`, one more `divisor` is added.
  """
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def _kernel_inits(scheme: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """Returns (conv kernel init, dense kernel init) of a reference codebase."""
  if scheme == 'tf_slim':
    # mobilenet.training_scope: truncated normal, stddev of the untruncated
    # distribution 0.09, for conv, depthwise and the logits layer alike.
    trunc = nn.initializers.truncated_normal(stddev=0.09)
    return trunc, trunc
  # torchvision: kaiming_normal_(mode='fan_out') on convs (a depthwise kernel's
  # fan-out is 9 * C in both frameworks), normal(0, 0.01) on the classifier.
  return (
    nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
    nn.initializers.normal(stddev=0.01),
  )


def _check_choice(field: str, value: Any, valid: Sequence[Any]) -> None:
  if value not in valid:
    raise ValueError(
      f'{field}={value!r} is not valid; expected one of '
      f'{", ".join(repr(v) for v in valid)}.'
    )


def _check_images(x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(
      f'images must have rank 4 (batch, height, width, 3), '
      f'got shape {tuple(x.shape)}.'
    )
  if x.shape[-1] != 3:
    raise ValueError(
      f'images must have 3 channels (NHWC layout), got '
      f'{x.shape[-1]} in shape {tuple(x.shape)}.'
    )
  height, width = x.shape[1:3]
  if min(height, width) < MIN_RESOLUTION:
    raise ValueError(
      f'image resolution {height}x{width} is too small; '
      f'height and width must be >= {MIN_RESOLUTION}.'
    )


def batch_norm_act(
  *, activation: Callable[[jax.Array], jax.Array] | None = None, **kwargs: Any
) -> Callable[[jax.Array], jax.Array]:
  """`nn.BatchNorm(**kwargs)` followed by `activation`: the default `norm_act`.

  `use_fast_variance` (`MobileNetV2.bn_fast_variance`) picks one-pass
  batch variance; two-pass, as TF-slim and torch compute it, by default. A
  replacement (`MobileNetV2(norm_act=...)`) takes the same keyword arguments
  and creates the same variables under `name`.
  """
  kwargs.setdefault('use_fast_variance', False)
  norm = nn.BatchNorm(**kwargs)
  if activation is None:
    return norm
  return lambda x: activation(norm(x))


class InvertedResidual(nn.Module):
  """The inverted residual block with a linear bottleneck (paper Fig. 3b).

  1x1 expansion + BN + ReLU6 (absent when `expand_ratio` is 1), 3x3 depthwise
  conv with `strides` + BN + ReLU6, 1x1 projection + BN with no activation.
  With `shortcut='bottleneck'` the input is added to the output exactly when
  `strides == 1` and the input and output channel counts are equal.

  Attributes:
    features: output channels of the projection.
    strides: stride of the depthwise convolution.
    dilation: atrous rate of the depthwise convolution (1: none).
    expand_ratio: hidden width = round(expand_ratio * input channels).
    bottleneck_activation: 'linear' (the paper) or 'relu6' after the
      projection (Fig. 6a ablation).
    shortcut: 'bottleneck' (the paper), 'expansion' (Fig. 6b: the block adds
      the previous block's expanded activation, passed as `expansion_skip`, to
      its own) or 'none'.
    depthwise_padding: padding of the 3x3 depthwise conv, in `nn.Conv` terms.
    conv: a `nn.Conv` constructor with dtype and initialiser bound.
    norm_act: a `batch_norm_act` constructor with momentum, epsilon and
      axis_name bound.
  """

  features: int
  strides: int = 1
  dilation: int = 1
  expand_ratio: float = 6
  bottleneck_activation: str = 'linear'
  shortcut: str = 'bottleneck'
  depthwise_padding: Any = 'SAME'
  conv: ModuleDef = functools.partial(nn.Conv, use_bias=False)
  norm_act: ModuleDef = functools.partial(
    batch_norm_act, momentum=0.997, epsilon=1e-3
  )

  def has_residual(self, in_channels: int) -> bool:
    """Whether the bottleneck residual applies for this input width."""
    return (
      self.shortcut == 'bottleneck'
      and self.strides == 1
      and in_channels == self.features
    )

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool = False,
    expansion_skip: jax.Array | None = None,
    return_expanded: bool = False,
  ):
    """Applies the block.

    Args:
      x: input of shape (N, H, W, C_in).
      train: batch statistics and their update when True, running averages
        when False.
      expansion_skip: with `shortcut='expansion'`, the previous block's
        expanded activation, added to this block's when the shapes agree.
      return_expanded: also return the expanded activation (input of the
        depthwise conv), for chaining `shortcut='expansion'` blocks.

    Returns:
      The output of shape (N, H / strides, W / strides, features), and the
      expanded activation if `return_expanded`.
    """
    norm_act = functools.partial(self.norm_act, use_running_average=not train)
    in_channels = x.shape[-1]
    hidden = int(round(in_channels * self.expand_ratio))
    h = x
    if self.expand_ratio != 1:
      h = self.conv(hidden, (1, 1), name='expand_conv')(h)
      h = norm_act(name='expand_bn', activation=nn.relu6)(h)
    if (
      self.shortcut == 'expansion'
      and expansion_skip is not None
      and expansion_skip.shape == h.shape
    ):
      h = h + expansion_skip
    expanded = h  # the network's `features=['block_NN/expanded']`
    h = self.conv(
      hidden,
      (3, 3),
      strides=self.strides,
      padding=self.depthwise_padding,
      kernel_dilation=self.dilation,
      feature_group_count=hidden,
      name='depthwise_conv',
    )(h)
    h = norm_act(name='depthwise_bn', activation=nn.relu6)(h)
    h = self.conv(self.features, (1, 1), name='project_conv')(h)
    h = norm_act(name='project_bn')(h)
    if self.bottleneck_activation == 'relu6':
      h = nn.relu6(h)
    if self.has_residual(in_channels):
      h = h + x
    return (h, expanded) if return_expanded else h


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """A feature map `MobileNetV2(features=...)` can return (timm's
  `feature_info`): known from the module's fields, without running it."""

  name: str  # 'stem', 'block_13', 'block_14/expanded', 'head'
  channels: int
  reduction: int  # input size / map size (TF 'SAME': ceil division)


class MobileNetV2(nn.Module):
  """MobileNetV2 classifier on NHWC images.

  Attributes:
    num_classes: classifier outputs; 0 removes the classifier and the model
      returns the pooled features.
    width_multiplier: scales every layer's channels (rounded to multiples of
      8); the 1280-channel head is only scaled above 1.0.
    dropout_rate: dropout before the classifier (rng stream 'dropout').
    bn_momentum: Flax momentum of the running averages (TF-slim decay 0.997;
      torch momentum 0.1 is 0.9 here).
    bn_epsilon: BatchNorm epsilon (TF-slim 1e-3, torch 1e-5).
    bn_fast_variance: batch variance as E[x^2] - E[x]^2 in float32, one pass
      over the activations, instead of TF-slim's and torch's two passes
      (E[(x - E[x])^2]). Equal up to float rounding unless a channel's mean
      dwarfs its spread; XLA fuses the sums into the convs, so a TPU train
      step moves fewer bytes (docs/accelerators.md).
    bn_axis_name: pmap axis name over which batch statistics are averaged.
    bn_frozen: BatchNorm normalises with its running statistics and leaves
      them unchanged in training too (fine-tuning with frozen BN, as
      detection backbones and linear probes do); dropout still follows
      `train`.
    dtype: computation dtype (for example jnp.bfloat16); logits are float32.
    param_dtype: parameter dtype.
    padding: 'tf' (TF 'SAME') or 'torch' (symmetric 1) for the 3x3 convs.
    init_scheme: kernel initialisers of 'tf_slim' or 'torchvision'.
    expand_ratio: overrides t=6 of every bottleneck row (the first row keeps
      t=1 as in the paper).
    bottleneck_activation: 'linear' (paper) or 'relu6' (Fig. 6a ablation).
    shortcut: 'bottleneck' (paper), 'expansion' or 'none' (Fig. 6b). With
      'expansion', the bottleneck residuals are removed and each block's
      expanded activation (after expansion conv, BN and ReLU6) is added to the
      next block's expanded activation whenever their shapes are equal: this
      happens exactly after the 10 blocks that carry a bottleneck residual in
      the paper's design (stride 1, equal in/out channels), since the next
      block expands the same channels at the same resolution.
    output_stride: None (the classifier's 32) or the largest ratio of input
      to feature-map resolution, as in TF-slim's `mobilenet(output_stride=)`
      and the paper's DeepLabv3 experiments: once the stem and blocks reach
      it, the remaining strides become 1 and multiply the atrous rate of the
      later depthwise convs instead. Same parameters, denser feature maps
      (more compute in the later stages).
    conv: the convolution constructor (`nn.Conv`'s signature) of every conv
      layer: stem, 1x1 and 3x3 depthwise (`feature_group_count` = channels).
    norm_act: the BatchNorm + activation constructor of every BN layer,
      called with `nn.BatchNorm`'s keyword arguments plus `activation`
      (`nn.relu6` or None); see `batch_norm_act`.
    dense: the classifier's constructor (`nn.Dense`'s signature).
      Replacements of conv, norm_act and dense for one backend
      (`mnv2_flax.cpu.fast_path.layers()`) keep the variables and results.
  """

  num_classes: int = 1000
  width_multiplier: float = 1.0
  dropout_rate: float = 0.2
  bn_momentum: float = 0.997
  bn_epsilon: float = 1e-3
  bn_fast_variance: bool = False
  bn_axis_name: str | None = None
  bn_frozen: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  padding: str = 'tf'
  init_scheme: str = 'tf_slim'
  expand_ratio: float | None = None
  bottleneck_activation: str = 'linear'
  shortcut: str = 'bottleneck'
  output_stride: int | None = None
  conv: ModuleDef = nn.Conv
  norm_act: ModuleDef = batch_norm_act
  dense: ModuleDef = nn.Dense

  def __post_init__(self):
    for field, (valid, expected) in _FIELD_RULES.items():
      if not valid(getattr(self, field)):
        raise ValueError(
          f'{field}={getattr(self, field)!r} is not valid; expected {expected}.'
        )
    for field, choices in _FIELD_CHOICES.items():
      _check_choice(field, getattr(self, field), choices)
    super().__post_init__()

  @property
  def stem_channels(self) -> int:
    return make_divisible(STEM_CHANNELS * self.width_multiplier)

  @property
  def head_channels(self) -> int:
    return make_divisible(HEAD_CHANNELS * max(1.0, self.width_multiplier))

  def block_configs(self) -> list[tuple[float, int, int]]:
    """Per block (expand ratio, output channels, stride), in order."""
    configs = []
    for t, c, n, s in BLOCK_SPECS:
      if t != 1 and self.expand_ratio is not None:
        t = self.expand_ratio
      channels = make_divisible(c * self.width_multiplier)
      configs += [(t, channels, s if i == 0 else 1) for i in range(n)]
    return configs

  def strides_and_rates(self) -> list[tuple[int, int]]:
    """(stride, atrous rate) of the stem and then of each block, in order.

    TF-slim's rule for `output_stride`: a layer that would take the input to
    output ratio past it runs with stride 1 at the current rate, and the rate
    of every later layer is multiplied by the stride it dropped.
    """
    strides = [2] + [s for _, _, s in self.block_configs()]
    current, rate, result = 1, 1, []
    for stride in strides:
      if current == self.output_stride:
        result.append((1, rate))
        rate *= stride
      else:
        result.append((stride, 1))
        current *= stride
    return result

  def feature_info(self) -> list[FeatureInfo]:
    """Every feature map `__call__(features=...)` returns, in network order:
    the stem, each block's output, the expanded activation (after expansion
    conv, BN and ReLU6; the input of the depthwise conv) of each block with
    t != 1, and the head (before pooling). With `output_stride`, reductions
    stop growing at it (atrous rates take over)."""
    (stem_stride, _), *block_strides = self.strides_and_rates()
    reduction = stem_stride
    info = [FeatureInfo('stem', self.stem_channels, reduction)]
    in_channels = self.stem_channels
    blocks = zip(self.block_configs(), block_strides, strict=True)
    for i, ((t, channels, _), (stride, _)) in enumerate(blocks):
      name = f'block_{i + 1:02d}'
      if t != 1:
        hidden = int(round(in_channels * t))
        info.append(FeatureInfo(f'{name}/expanded', hidden, reduction))
      reduction *= stride
      info.append(FeatureInfo(name, channels, reduction))
      in_channels = channels
    info.append(FeatureInfo('head', self.head_channels, reduction))
    return info

  def feature_aliases(self) -> dict[str, str]:
    """'stride_N' -> the last block output at reduction N (N = 2, 4, 8, 16,
    32 up to `output_stride`): timm's `features_only` maps; for width 1.0
    block_01 / 03 / 06 / 13 / 17 with 16 / 24 / 32 / 96 / 320 channels."""
    aliases = {}
    for f in self.feature_info():
      if f.name.startswith('block_') and '/' not in f.name:
        aliases[f'stride_{f.reduction}'] = f.name
    return aliases

  def _resolve_features(
    self, features: Sequence[str] | None
  ) -> dict[str, str] | None:
    """{requested name: feature_info name}; one error naming a bad name."""
    if features is None:
      return None
    if isinstance(features, str):
      features = (features,)
    aliases = self.feature_aliases()
    names = [f.name for f in self.feature_info()]
    wanted = {}
    for name in features:
      resolved = aliases.get(name, name)
      if resolved not in names:
        raise ValueError(
          f'features: {name!r} is not a feature map of this model; valid '
          f'are {", ".join(aliases)}, stem, block_01 ... '
          f'block_{len(self.block_configs()):02d}, block_NN/expanded (blocks '
          'with t != 1) and head (see feature_info()).'
        )
      wanted[name] = resolved
    return wanted

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool = False,
    features_only: bool = False,
    features: Sequence[str] | None = None,
  ) -> jax.Array | dict[str, jax.Array]:
    """Runs the network.

    Args:
      x: images of shape (N, H, W, 3), H and W >= 32.
      train: BatchNorm uses (and updates, with `mutable=['batch_stats']`) batch
        statistics, and dropout is active, when True.
      features_only: return the globally pooled features (N, head_channels)
        instead of the logits, for fine-tuning and linear probes.
      features: names from `feature_info()` or `feature_aliases()` (e.g.
        ('stride_4', 'block_14/expanded', 'head')): return a dict of those
        maps (N, H', W', C) instead, for detection and segmentation heads.
        The whole network runs (its variables are the same); under jit, XLA
        drops what no returned map needs.

    Returns:
      float32 logits (N, num_classes), the pooled features, or the dict.
    """
    _check_images(x)
    wanted = self._resolve_features(features)
    use_batch_stats = train and not self.bn_frozen
    taps = {}
    conv_init, dense_init = _kernel_inits(self.init_scheme)
    conv = functools.partial(
      self.conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=conv_init,
    )
    norm_act = functools.partial(
      self.norm_act,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      use_fast_variance=self.bn_fast_variance,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      axis_name=self.bn_axis_name,
    )

    def pad_3x3(rate):
      return 'SAME' if self.padding == 'tf' else ((rate, rate), (rate, rate))

    (stem_stride, stem_rate), *block_strides = self.strides_and_rates()
    x = jnp.asarray(x, self.dtype)
    x = conv(
      self.stem_channels,
      (3, 3),
      strides=stem_stride,
      padding=pad_3x3(stem_rate),
      kernel_dilation=stem_rate,
      name='stem_conv',
    )(x)
    x = norm_act(
      name='stem_bn',
      use_running_average=not use_batch_stats,
      activation=nn.relu6,
    )(x)
    taps['stem'] = x

    skip = None
    blocks = zip(self.block_configs(), block_strides, strict=True)
    for i, ((t, channels, _), (stride, rate)) in enumerate(blocks):
      block = InvertedResidual(
        features=channels,
        strides=stride,
        dilation=rate,
        expand_ratio=t,
        bottleneck_activation=self.bottleneck_activation,
        shortcut=self.shortcut,
        depthwise_padding=pad_3x3(rate),
        conv=conv,
        norm_act=norm_act,
        name=f'block_{i + 1:02d}',
      )
      in_channels = x.shape[-1]
      x, expanded = block(
        x, use_batch_stats, expansion_skip=skip, return_expanded=True
      )
      taps[block.name] = x
      if t != 1:
        taps[f'{block.name}/expanded'] = expanded
      # The expanded activation feeds the next block's only where the paper's
      # design has a bottleneck residual (stride 1, equal channels).
      skip = (
        expanded
        if (
          self.shortcut == 'expansion'
          and stride == 1
          and in_channels == channels
        )
        else None
      )

    x = conv(self.head_channels, (1, 1), name='head_conv')(x)
    x = norm_act(
      name='head_bn',
      use_running_average=not use_batch_stats,
      activation=nn.relu6,
    )(x)
    taps['head'] = x
    if wanted is not None:
      return {alias: taps[name] for alias, name in wanted.items()}
    x = jnp.mean(x, axis=(1, 2))
    if features_only or self.num_classes == 0:
      return x.astype(jnp.float32)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = self.dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=dense_init,
      name='classifier',
    )(x)
    return x.astype(jnp.float32)


def preset(name: str, **kwargs: Any) -> MobileNetV2:
  """Builds a published variant by name (see PRESETS), with overrides."""
  _check_choice('name', name, tuple(PRESETS))
  return MobileNetV2(**{**PRESETS[name], **kwargs})
