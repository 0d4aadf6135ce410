"""torchvision and timm weights in the Flax model: same logits as PyTorch."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnv2_flax import convert

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')


def _load_fixture(filename):
  """{model name: (meta, state dict, {input name: (images, logits)})}.

  Written by tools/make_torch_fixtures.py from torchvision's mobilenet_v2,
  and by tools/make_timm_fixture.py from timm's mobilenetv2_*.
  """
  data = np.load(os.path.join(TESTDATA, filename))
  out = {}
  for meta in json.loads(str(data['meta']))['models']:
    name = meta['name']
    state_dict = {}
    for key in data.files:
      kind, _, torch_key = key[len(name) + 1 :].partition('/')
      if not key.startswith(name + '/'):
        continue
      if kind == 'sd':
        state_dict[torch_key] = data[key]
      elif kind == 'q':  # 8-bit grid times a per-tensor scale, exactly
        scale = data[f'{name}/scale/{torch_key}']
        state_dict[torch_key] = data[key].astype(np.float32) * scale
    cases = {
      i: (data[f'{name}/input/{i}'], data[f'{name}/logits/{i}'])
      for i in meta['inputs']
    }
    out[name] = (meta, state_dict, cases)
  return out


FIXTURES = _load_fixture('torch_mobilenet_v2.npz')
TIMM_FIXTURES = _load_fixture('timm_mobilenet_v2.npz')
CASES = [
  (name, case) for name, (_, _, cases) in FIXTURES.items() for case in cases
]


def _kwargs(meta):
  return dict(
    num_classes=meta['num_classes'], width_multiplier=meta['width_multiplier']
  )


@pytest.mark.parametrize('name, case', CASES)
@pytest.mark.slow
def test_logits_match_pytorch(name, case):
  meta, state_dict, cases = FIXTURES[name]
  images, expected = cases[case]
  variables = convert.from_torchvision(state_dict, **_kwargs(meta))
  model = convert.torchvision_model(**_kwargs(meta))
  logits = jax.jit(model.apply)(variables, images)
  assert logits.shape == expected.shape
  assert np.abs(expected).std() > 0.1  # non-degenerate reference
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_converted_tree_matches_the_model():
  meta, state_dict, _ = FIXTURES['w035']
  variables = convert.from_torchvision(state_dict, **_kwargs(meta))
  model = convert.torchvision_model(**_kwargs(meta))
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  )
  chex.assert_trees_all_equal_shapes_and_dtypes(
    variables, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  )
  # Depthwise (C, 1, 3, 3) -> (3, 3, 1, C), Linear (out, in) -> (in, out).
  np.testing.assert_array_equal(
    variables['params']['block_02']['depthwise_conv']['kernel'][:, :, 0, 5],
    state_dict['features.2.conv.1.0.weight'][5, 0],
  )
  np.testing.assert_array_equal(
    variables['params']['classifier']['kernel'],
    state_dict['classifier.1.weight'].T,
  )
  np.testing.assert_array_equal(
    variables['batch_stats']['head_bn']['var'],
    state_dict['features.18.1.running_var'],
  )


@pytest.mark.parametrize(
  'edit, words',
  [
    (
      lambda sd: sd.pop('features.3.conv.1.0.weight'),
      ["missing 'features.3.conv.1.0.weight'", 'block_03/depthwise_conv'],
    ),
    (
      lambda sd: sd.__setitem__('features.19.0.weight', np.zeros((8, 8, 1, 1))),
      ["unexpected 'features.19.0.weight'"],
    ),
    (
      lambda sd: sd.__setitem__(
        'features.5.conv.2.weight', np.zeros((16, 48, 1, 1))
      ),
      [
        "'features.5.conv.2.weight' has shape (16, 48, 1, 1)",
        'expected (16, 96, 1, 1)',
      ],
    ),
  ],
)
def test_bad_state_dicts_name_the_entry(edit, words):
  meta, state_dict, _ = FIXTURES['w035']
  state_dict = dict(state_dict)
  edit(state_dict)
  with pytest.raises(ValueError) as error:
    convert.from_torchvision(state_dict, **_kwargs(meta))
  for word in words:
    assert word in str(error.value)


def test_wrong_width_is_reported_not_loaded():
  meta, state_dict, _ = FIXTURES['w035']
  with pytest.raises(ValueError, match='width_multiplier=1.0'):
    convert.from_torchvision(state_dict, num_classes=meta['num_classes'])


@pytest.mark.parametrize(
  'name, case',
  [(n, c) for n, (_, _, cases) in TIMM_FIXTURES.items() for c in cases],
)
@pytest.mark.slow
def test_timm_safetensors_logits_match_timm(name, case, tmp_path):
  from safetensors import numpy as safetensors_np

  meta, state_dict, cases = TIMM_FIXTURES[name]
  path = str(tmp_path / f'{name}.safetensors')
  safetensors_np.save_file(state_dict, path)
  images, expected = cases[case]
  # Width and classes as a user passes them; classes from the classifier.
  variables = convert.from_timm(path, width_multiplier=meta['width_multiplier'])
  model = convert.torchvision_model(**_kwargs(meta))
  logits = jax.jit(model.apply)(variables, images)
  assert np.abs(expected).std() > 0.1  # non-degenerate reference
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_timm_mismatches_are_named():
  meta, state_dict, _ = TIMM_FIXTURES['mobilenetv2_035']
  with pytest.raises(ValueError, match='width_multiplier=1.0') as error:
    convert.from_timm(state_dict)
  assert 'timm MobileNetV2' in str(error.value)
  deeper = dict(state_dict)  # a block of timm's deeper _110d variant
  deeper['blocks.1.2.conv_pw.weight'] = np.zeros((96, 24, 1, 1), np.float32)
  with pytest.raises(ValueError, match="unexpected 'blocks.1.2.conv_pw"):
    convert.from_timm(deeper, width_multiplier=0.35)
  # torchvision names are not timm's: every layer is named missing.
  _, torchvision_sd, _ = FIXTURES['w035']
  with pytest.raises(ValueError, match="missing 'conv_stem.weight'"):
    convert.from_timm(torchvision_sd, width_multiplier=0.35)


def test_pickled_state_dicts_are_refused(tmp_path):
  path = tmp_path / 'weights.pth'
  path.write_bytes(b'not read')
  with pytest.raises(ValueError, match='pickle file.*safetensors'):
    convert.from_timm(str(path))
