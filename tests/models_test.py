"""Tests of the MobileNetV2 modules: shapes, structure, BN, dtypes, knobs."""

import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax import models

# 1-based indices of the blocks with a bottleneck residual in the paper's
# design: stride 1 and equal input/output channels (10 of 17).
RESIDUAL_BLOCKS = (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)


def _images(n=2, h=32, w=32, seed=0):
  return jax.random.uniform(
    jax.random.key(seed), (n, h, w, 3), minval=-1, maxval=1
  )


def _init(model, x, seed=1):
  """Variables of `model` with He-normal kernels, drawn with numpy.

  Skips compiling `model.init`'s RNG code for every test; the initialisers
  themselves are covered by `test_initialisers_follow_the_reference`.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      value = rng.normal(0, np.sqrt(2 / fan_in), leaf.shape)
    elif name in ('scale', 'var'):
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _randomise_bn(model, variables, seed=2):
  """Random BN scale/bias, running statistics of a real batch.

  Random scales and biases make every BN matter; the running statistics are
  then those of a calibration batch (a train-mode pass with momentum 0), so
  that activations keep a healthy scale through all 52 layers.
  """
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    if 'bn' in path[-2].key and path[-1].key == 'scale':
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    if 'bn' in path[-2].key and path[-1].key == 'bias':
      return jnp.asarray(rng.normal(0, 0.2, leaf.shape), leaf.dtype)
    return leaf

  params = jax.tree_util.tree_map_with_path(perturb, variables['params'])
  calibration = _images(n=8, h=48, w=48, seed=seed)
  _, stats = jax.jit(
    lambda v, x: model.clone(bn_momentum=0.0).apply(
      v,
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(0)},
    )
  )({**variables, 'params': params}, calibration)
  return {**variables, 'params': params, **stats}


def _set_leaves(variables, predicate, value):
  """Sets every parameter leaf whose (path, name) matches to `value`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  for path in flat:
    if predicate(path):
      flat[path] = jnp.full_like(flat[path], value)
  return flax.traverse_util.unflatten_dict(flat)


def _capture(model, variables, x, module_type):
  """Runs the model and returns {path: output} of every `module_type`."""
  _, state = jax.jit(
    lambda v, x: model.apply(
      v,
      x,
      train=False,
      mutable=['intermediates'],
      capture_intermediates=lambda m, name: (
        isinstance(m, module_type) and name == '__call__'
      ),
    )
  )(variables, x)
  flat = flax.traverse_util.flatten_dict(state['intermediates'])
  return {
    '/'.join(k[:-1]): v[0] for k, v in flat.items() if k[-1] == '__call__'
  }


@pytest.mark.parametrize(
  'value, expected',
  [
    (32 * 0.35, 16),
    (16 * 0.35, 8),
    (32 * 0.5, 16),
    (24 * 0.75, 24),
    (32 * 1.3, 40),
    (32 * 1.4, 48),
    (1280 * 1.3, 1664),
    (1280 * 1.4, 1792),
    (320, 320),
    (3, 8),
  ],
)
def test_make_divisible(value, expected):
  assert models.make_divisible(value) == expected


@pytest.mark.parametrize(
  'width, height, w_px',
  [
    (0.35, 32, 32),
    (0.5, 96, 128),
    (0.75, 160, 160),
    (1.0, 224, 224),
    (1.3, 97, 75),
    (1.4, 224, 224),
    (0.35, 33, 200),
  ],
)
@pytest.mark.slow
def test_output_shapes(width, height, w_px):
  model = models.MobileNetV2(num_classes=7, width_multiplier=width)
  x = jnp.zeros((2, height, w_px, 3))
  variables = jax.eval_shape(lambda: _init(model, x))
  logits = jax.eval_shape(lambda v: model.apply(v, x), variables)
  features = jax.eval_shape(
    lambda v: model.apply(v, x, features_only=True), variables
  )
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert features.shape == (2, model.head_channels)
  # Output stride 32 with 'SAME' rounding up.
  last = jax.eval_shape(lambda v: _capture(model, v, x, nn.Conv), variables)
  assert last['head_conv'].shape[1:3] == (-(-height // 32), -(-w_px // 32))


@pytest.mark.parametrize(
  'name, stem, head',
  [
    ('mobilenet_v2_035', 16, 1280),
    ('mobilenet_v2_050', 16, 1280),
    ('mobilenet_v2_075', 24, 1280),
    ('mobilenet_v2_100', 32, 1280),
    ('mobilenet_v2_130', 40, 1664),
    ('mobilenet_v2_140', 48, 1792),
  ],
)
@pytest.mark.slow
def test_presets(name, stem, head):
  model = models.preset(name, num_classes=10)
  variables = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 64, 64, 3))))
  assert variables['params']['stem_conv']['kernel'].shape == (3, 3, 3, stem)
  assert variables['params']['head_conv']['kernel'].shape[-1] == head


def test_block_structure_follows_table_2():
  model = models.MobileNetV2()
  variables = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 224, 224, 3))))
  params = variables['params']
  blocks = sorted(k for k in params if k.startswith('block_'))
  assert len(blocks) == 17
  assert 'expand_conv' not in params['block_01']
  assert all('expand_conv' in params[b] for b in blocks[1:])
  outs = [params[b]['project_conv']['kernel'].shape[-1] for b in blocks]
  assert outs == [
    16,
    24,
    24,
    32,
    32,
    32,
    64,
    64,
    64,
    64,
    96,
    96,
    96,
    160,
    160,
    160,
    320,
  ]
  # Hidden width is t x input channels; depthwise kernels are (3, 3, 1, C).
  assert params['block_02']['expand_conv']['kernel'].shape == (1, 1, 16, 96)
  assert params['block_17']['depthwise_conv']['kernel'].shape == (3, 3, 1, 960)
  # Convs before BN have no bias; the classifier has one.
  assert 'bias' not in params['block_05']['project_conv']
  assert params['classifier']['bias'].shape == (1000,)


def _residual_blocks(shortcut):
  """Indices of the blocks that add their input to the projection branch.

  The projection BN's scale is zeroed, so the branch outputs its bias: a
  block then outputs `bias` without a residual and `input + bias` with one.
  """
  model = models.MobileNetV2(
    num_classes=10, width_multiplier=0.35, shortcut=shortcut
  )
  x = _images()
  variables = _randomise_bn(model, _init(model, x))
  variables = _set_leaves(
    variables,
    lambda p: p[0] == 'params' and p[-2:] == ('project_bn', 'scale'),
    0.0,
  )
  outs = _capture(model, variables, x, models.InvertedResidual)
  residual = []
  for i in range(1, 18):
    out = outs[f'block_{i:02d}'][0]
    bias = np.broadcast_to(
      variables['params'][f'block_{i:02d}']['project_bn']['bias'], out.shape
    )
    if i > 1 and not np.allclose(out, bias, atol=1e-6):
      np.testing.assert_allclose(
        out - outs[f'block_{i - 1:02d}'][0], bias, atol=1e-5
      )
      residual.append(i)
  return tuple(residual)


@pytest.mark.slow
def test_residual_exactly_when_stride_1_and_channels_match():
  assert _residual_blocks('bottleneck') == RESIDUAL_BLOCKS


@pytest.mark.parametrize('shortcut', ['none', 'expansion'])
@pytest.mark.slow
def test_shortcut_ablations_remove_the_bottleneck_residual(shortcut):
  assert _residual_blocks(shortcut) == ()


@pytest.mark.parametrize(
  'shortcut, receivers',
  [('bottleneck', ()), ('expansion', tuple(i + 1 for i in RESIDUAL_BLOCKS))],
)
@pytest.mark.slow
def test_expansion_shortcut_connects_expanded_layers(shortcut, receivers):
  model = models.MobileNetV2(
    num_classes=10, width_multiplier=0.35, shortcut=shortcut
  )
  x = _images()
  variables = _randomise_bn(model, _init(model, x))
  expanded = [f'block_{i:02d}/expanded' for i in range(2, 18)]
  maps, state = jax.jit(
    lambda v, x: model.apply(
      v,
      x,
      features=expanded,
      mutable=['intermediates'],
      capture_intermediates=lambda m, n: isinstance(m, nn.BatchNorm),
    )
  )(variables, x)
  inter = state['intermediates']
  connected = []
  for i in range(2, 18):
    own = nn.relu6(inter[f'block_{i:02d}']['expand_bn']['__call__'][0])
    extra = maps[f'block_{i:02d}/expanded'] - own
    if np.abs(extra).max() > 0:
      previous = maps[f'block_{i - 1:02d}/expanded']
      np.testing.assert_allclose(extra, previous, atol=1e-5)
      connected.append(i)
  assert tuple(connected) == receivers


@pytest.mark.parametrize('activation', ['linear', 'relu6'])
@pytest.mark.slow
def test_bottleneck_activation(activation):
  model = models.MobileNetV2(
    num_classes=10, width_multiplier=0.35, bottleneck_activation=activation
  )
  x = _images()
  variables = _randomise_bn(model, _init(model, x))
  outs = _capture(model, variables, x, models.InvertedResidual)
  # Blocks without a residual output the projection after its activation.
  projected = np.concatenate(
    [
      np.ravel(outs[f'block_{i:02d}'][0])
      for i in range(1, 18)
      if i not in RESIDUAL_BLOCKS
    ]
  )
  if activation == 'relu6':
    assert projected.min() >= 0.0 and projected.max() <= 6.0
  else:
    assert projected.min() < -0.1  # the linear bottleneck keeps negatives


def test_expand_ratio_overrides_t6_rows_only():
  model = models.MobileNetV2(expand_ratio=4)
  variables = jax.eval_shape(lambda: _init(model, jnp.zeros((1, 64, 64, 3))))
  params = variables['params']
  assert 'expand_conv' not in params['block_01']  # t=1 row unchanged
  assert params['block_02']['expand_conv']['kernel'].shape == (1, 1, 16, 64)
  assert params['block_17']['depthwise_conv']['kernel'].shape == (3, 3, 1, 640)


@pytest.mark.slow
def test_eval_uses_running_statistics_train_uses_the_batch():
  model = models.MobileNetV2(
    num_classes=10, width_multiplier=0.35, bn_momentum=0.9, dropout_rate=0.0
  )
  x = _images(n=4)
  variables = _randomise_bn(model, _init(model, x))
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  train = jax.jit(
    lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])
  )
  # Eval: each example's output is independent of the rest of the batch.
  full = evaluate(variables, x)
  alone = evaluate(variables, x[:1])
  np.testing.assert_allclose(full[:1], alone, atol=1e-5)
  # Train: batch statistics couple the examples, and running stats update.
  full_t, updates = train(variables, x)
  alone_t, _ = train(variables, x[:1])
  assert np.abs(full_t[:1] - alone_t).max() > 1e-3
  assert np.abs(full_t - full).max() > 1e-3
  stem = _capture(model, variables, x, nn.Conv)['stem_conv']
  old = variables['batch_stats']['stem_bn']
  new = updates['batch_stats']['stem_bn']
  np.testing.assert_allclose(
    new['mean'],
    0.9 * old['mean'] + 0.1 * stem.mean(axis=(0, 1, 2)),
    rtol=1e-4,
    atol=1e-5,
  )
  np.testing.assert_allclose(
    new['var'],
    0.9 * old['var'] + 0.1 * stem.var(axis=(0, 1, 2)),
    rtol=1e-4,
    atol=1e-5,
  )


@pytest.mark.slow
def test_dropout_uses_the_dropout_rng_only_in_training():
  model = models.MobileNetV2(
    num_classes=10, width_multiplier=0.35, dropout_rate=0.5
  )
  x = _images()
  variables = _init(model, x)

  @jax.jit
  def train_logits(seed):
    logits, _ = model.apply(
      variables,
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': jax.random.key(seed)},
    )
    return logits

  np.testing.assert_array_equal(train_logits(0), train_logits(0))
  assert np.abs(train_logits(0) - train_logits(1)).max() > 1e-4
  # At eval, dropout is off: a dropout rng changes nothing.
  evaluate = jax.jit(model.apply)
  np.testing.assert_array_equal(
    evaluate(variables, x),
    evaluate(variables, x, rngs={'dropout': jax.random.key(3)}),
  )


@pytest.mark.slow
def test_jit_and_eager_agree():
  model = models.MobileNetV2(num_classes=10, width_multiplier=0.35)
  x = _images()
  variables = _randomise_bn(model, _init(model, x))
  eager = model.apply(variables, x)
  jitted = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_with_float32_params_stays_close():
  x = _images()
  f32 = models.MobileNetV2(num_classes=10, width_multiplier=0.35)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  variables = _randomise_bn(f32, _init(f32, x))
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, _init(bf16, x))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  convs = _capture(bf16, variables, x, nn.Conv)
  assert convs['block_10/depthwise_conv'].dtype == jnp.bfloat16
  ref = jax.jit(f32.apply)(variables, x)
  low = jax.jit(bf16.apply)(variables, x)
  assert low.dtype == jnp.float32
  # bfloat16 keeps 8 mantissa bits; through 52 layers the logits move by a
  # few percent (4.6% measured), far less than their spread.
  assert np.linalg.norm(low - ref) < 0.1 * np.linalg.norm(ref)
  assert np.corrcoef(np.ravel(low), np.ravel(ref))[0, 1] > 0.99


@pytest.mark.slow
def test_features_feed_the_classifier():
  model = models.MobileNetV2(num_classes=10, width_multiplier=0.35)
  x = _images()
  variables = _randomise_bn(model, _init(model, x))
  features = model.apply(variables, x, features_only=True)
  assert features.shape == (2, 1280)
  dense = variables['params']['classifier']
  np.testing.assert_allclose(
    model.apply(variables, x),
    features @ dense['kernel'] + dense['bias'],
    rtol=1e-5,
    atol=1e-5,
  )
  headless = model.clone(num_classes=0)
  no_head = jax.eval_shape(lambda: _init(headless, x))['params']
  assert 'classifier' not in no_head
  np.testing.assert_allclose(headless.apply(variables, x), features, atol=1e-6)


@pytest.mark.parametrize(
  'size, first_difference',
  [
    (33, None),  # every stride-2 conv sees an odd size: identical paddings
    (64, 'stem_conv'),
    (35, 'block_02/depthwise_conv'),  # 35 -> 18: first even stride-2 input
    (49, 'block_14/depthwise_conv'),  # 49 -> 25 -> 13 -> 7 -> 4
  ],
)
@pytest.mark.slow
def test_tf_and_torch_padding_differ_only_at_even_stride_2_inputs(
  size, first_difference
):
  tf_model = models.MobileNetV2(num_classes=10, width_multiplier=0.35)
  torch_model = tf_model.clone(padding='torch')
  x = _images(h=size, w=size)
  variables = _randomise_bn(tf_model, _init(tf_model, x))
  tf_out = _capture(tf_model, variables, x, nn.Conv)
  torch_out = _capture(torch_model, variables, x, nn.Conv)
  order = ['stem_conv']
  for i, (t, _, _) in enumerate(tf_model.block_configs(), start=1):
    layers = (['expand'] if t != 1 else []) + ['depthwise', 'project']
    order += [f'block_{i:02d}/{layer}_conv' for layer in layers]
  order += ['head_conv']
  differing = [
    k for k in order if np.abs(tf_out[k] - torch_out[k]).max() > 1e-6
  ]
  assert (differing[0] if differing else None) == first_difference
  logits_differ = (
    np.abs(tf_model.apply(variables, x) - torch_model.apply(variables, x)).max()
    > 1e-5
  )
  assert logits_differ == (first_difference is not None)


@pytest.mark.parametrize('output_stride, rate', [(16, 2), (8, 4)])
@pytest.mark.slow
def test_output_stride_is_the_atrous_form_of_the_same_network(
  output_stride, rate
):
  """Same parameters; every `rate`-th position of the denser maps (from
  offset rate - 1, where TF 'SAME' centres a stride-2 window) is the plain
  network's map, in eval mode; only the pooled head differs."""
  x = _images(n=2, h=64, w=64)
  plain = models.MobileNetV2(num_classes=10, width_multiplier=0.35)
  atrous = plain.clone(output_stride=output_stride)
  variables = _randomise_bn(plain, _init(plain, x))
  chex.assert_trees_all_equal_shapes(
    variables, jax.eval_shape(atrous.init, jax.random.key(0), x)
  )
  strides = [s for s, _ in atrous.strides_and_rates()]
  assert math.prod(strides) == output_stride
  dense = _capture(atrous, variables, x, models.InvertedResidual)
  steps = set()
  for name, (coarse, _) in _capture(
    plain, variables, x, models.InvertedResidual
  ).items():
    fine = dense[name][0]
    step = fine.shape[1] // coarse.shape[1]
    steps.add(step)
    np.testing.assert_allclose(
      fine[:, step - 1 :: step, step - 1 :: step],
      coarse,
      rtol=1e-4,
      atol=1e-4 * float(jnp.abs(coarse).max()),
      err_msg=name,
    )
  assert steps == {1, rate // 2, rate} - {0}
  assert dense['block_17'][0].shape[1:3] == (64 // output_stride,) * 2


def test_inverted_residual_standalone():
  x = _images(h=8, w=8)[..., :3]
  x = jnp.concatenate([x] * 8, axis=-1)  # 24 channels
  for features, strides, residual in (
    (24, 1, True),
    (32, 1, False),
    (24, 2, False),
  ):
    block = models.InvertedResidual(features=features, strides=strides)
    variables = block.init(jax.random.key(0), x)
    zeroed = _set_leaves(
      variables, lambda p: p[0] == 'params' and p[1] == 'project_bn', 0.0
    )
    out = block.apply(zeroed, x)
    assert out.shape == (2, 8 // strides, 8 // strides, features)
    assert block.has_residual(24) == residual
    np.testing.assert_array_equal(out, x if residual else 0.0)


@pytest.mark.parametrize(
  'field, value',
  [
    ('width_multiplier', 0),
    ('width_multiplier', -0.5),
    ('padding', 'valid'),
    ('shortcut', 'dense'),
    ('bottleneck_activation', 'relu'),
    ('init_scheme', 'keras'),
    ('num_classes', -1),
    ('dropout_rate', 1.5),
    ('expand_ratio', 0),
    ('bn_epsilon', 0.0),
    ('output_stride', 6),
  ],
)
def test_invalid_fields_name_field_and_value(field, value):
  with pytest.raises(ValueError) as error:
    models.MobileNetV2(**{field: value})
  assert field in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize(
  'shape, words',
  [
    ((32, 32, 3), 'rank 4'),
    ((1, 32, 32, 1), '3 channels'),
    ((1, 31, 64, 3), '>= 32'),
    ((1, 64, 16, 3), '64x16'),
  ],
)
def test_invalid_inputs(shape, words):
  model = models.MobileNetV2(num_classes=10, width_multiplier=0.35)
  with pytest.raises(ValueError, match=words):
    model.init(jax.random.key(0), jnp.zeros(shape))


def test_unknown_preset():
  with pytest.raises(ValueError, match="name='mobilenet_v2_200'"):
    models.preset('mobilenet_v2_200')


@pytest.mark.parametrize('scheme', ['tf_slim', 'torchvision'])
@pytest.mark.slow
def test_initialisers_follow_the_reference(scheme):
  model = models.MobileNetV2(width_multiplier=0.35, init_scheme=scheme)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))[
    'params'
  ]
  kernel = np.asarray(params['block_17']['expand_conv']['kernel'])
  depthwise = np.asarray(params['block_17']['depthwise_conv']['kernel'])
  dense = np.asarray(params['classifier']['kernel'])
  if scheme == 'tf_slim':
    # Truncated at 2 stddev of the untruncated normal(0, 0.09).
    assert np.abs(kernel).max() <= 0.18 and kernel.std() > 0.07
    assert np.abs(dense).max() <= 0.18
  else:
    # kaiming_normal(mode='fan_out'): std sqrt(2 / (kh * kw * out)).
    hidden = kernel.shape[-1]  # 336 at width 0.35
    np.testing.assert_allclose(kernel.std(), np.sqrt(2 / hidden), rtol=0.05)
    np.testing.assert_allclose(
      depthwise.std(), np.sqrt(2 / (9 * hidden)), rtol=0.05
    )
    np.testing.assert_allclose(dense.std(), 0.01, rtol=0.05)


def test_output_stride_32_is_the_plain_network():
  plain = models.MobileNetV2()
  assert plain.clone(output_stride=32).strides_and_rates() == (
    plain.strides_and_rates()
  )
  assert [s for s, _ in plain.strides_and_rates()].count(2) == 5


@pytest.mark.parametrize(
  'width, resolution, output_stride',
  [(0.35, 32, None), (1.0, 64, None), (0.5, 48, 16), (0.75, 40, 8)],
)
@pytest.mark.slow
def test_feature_maps_match_feature_info(width, resolution, output_stride):
  model = models.MobileNetV2(
    num_classes=10, width_multiplier=width, output_stride=output_stride
  )
  info = model.feature_info()
  aliases = model.feature_aliases()
  names = [f.name for f in info] + list(aliases)
  x = jax.ShapeDtypeStruct((2, resolution, resolution, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  # Shapes only (jax.eval_shape): nothing is compiled or computed.
  maps = jax.eval_shape(
    lambda v, x: model.apply(v, x, features=names), variables, x
  )
  assert sorted(maps) == sorted(names)  # a pytree: keys come back sorted
  for f in info:
    size = -(-resolution // f.reduction)  # TF 'SAME': ceil
    assert maps[f.name].shape == (2, size, size, f.channels), f
  reductions = [2, 4, 8, 16, 32]
  expected = [r for r in reductions if r <= (output_stride or 32)]
  assert list(aliases) == [f'stride_{r}' for r in expected]
  for alias, name in aliases.items():
    assert maps[alias].shape == maps[name].shape
  assert maps['head'].shape[-1] == model.head_channels


def test_feature_maps_of_the_published_network():
  model = models.MobileNetV2()
  by_name = {f.name: f for f in model.feature_info()}
  # timm's features_only channels, and the maps SSDLite heads read.
  assert [by_name[n].channels for n in model.feature_aliases().values()] == [
    16,
    24,
    32,
    96,
    320,
  ]
  assert (by_name['block_14/expanded'].channels, by_name['head'].channels) == (
    576,
    1280,
  )
  assert by_name['block_14/expanded'].reduction == 16
  assert 'block_01/expanded' not in by_name  # t = 1: no expansion
  with pytest.raises(ValueError, match="'stride_64' is not a feature map"):
    model.apply({}, jnp.zeros((1, 32, 32, 3)), features=['stride_64'])


@pytest.mark.slow
def test_feature_maps_are_the_networks_own_activations():
  model = models.MobileNetV2(num_classes=10, width_multiplier=0.35)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  maps = model.apply(variables, x, features=['head', 'stride_8'])
  pooled = model.apply(variables, x, features_only=True)
  np.testing.assert_allclose(
    maps['head'].mean(axis=(1, 2)), pooled, rtol=1e-5, atol=1e-6
  )
  _, state = model.apply(
    variables, x, capture_intermediates=True, mutable=['intermediates']
  )
  block_06 = state['intermediates']['block_06']['__call__'][0][0]
  np.testing.assert_array_equal(maps['stride_8'], block_06)
