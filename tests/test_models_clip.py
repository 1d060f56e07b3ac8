import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.clip import CLIP
from diffusets_jax.models.net1d import BatchNorm1d, Net1D, same_padding
from tests.helpers.random_variables import random_variables
from tests.helpers.reference_weights import DATA

SMALL = dict(base_filters=8, filters=(8, 16), blocks_per_stage=(1, 2), kernel_size=5, group_width=4)
SMALL_CLIP = CLIP(**SMALL, text_dim=12, text_hidden_dim=16, embed_dim=6)
ECG = jax.random.normal(jax.random.key(0), (4, 64, 12))
TEXT = jax.random.normal(jax.random.key(1), (4, 12))


def _param_count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_published_parameter_count():
    variables = jax.eval_shape(CLIP().init, jax.random.key(0), jnp.zeros((1, 1024, 12)), jnp.zeros((1, 1536)))
    # The published 22,005,505 counts the first block's bn1, which the reference builds but skips
    # (is_first_block); the Flax model does not carry it.
    keys = json.loads((DATA / "reference_state_dict_keys.json").read_text())["state_dict_keys"]["clip"]
    unused = sum(math.prod(shape) for key, (_, shape) in keys.items()
                 if key.startswith("resnet.stage_list.0.block_list.0.bn1.") and key.endswith(("weight", "bias")))
    assert unused == 128
    assert _param_count(variables["params"]) + unused == 22_005_505
    assert variables["params"]["logit_scale"].shape == ()


def test_published_shapes():
    clip = CLIP()
    ecg = jax.ShapeDtypeStruct((3, 1024, 12), jnp.float32)
    text = jax.ShapeDtypeStruct((3, 1536), jnp.float32)
    variables = jax.eval_shape(clip.init, jax.random.key(0), ecg, text)
    features = jax.eval_shape(lambda v, x: clip.apply(v, x, method=CLIP.ecg_features), variables, ecg)
    assert features.shape == (3, 1024)
    ecg_proj, text_proj, scale = jax.eval_shape(clip.apply, variables, ecg, text)
    assert ecg_proj.shape == text_proj.shape == (3, 64) and scale.shape == ()


def test_parameters_stay_float32_under_x64():
    # The batch norms' scale and bias and the logit scale followed jax_enable_x64 to float64.
    ecg, text = jax.ShapeDtypeStruct((2, 64, 12), jnp.float32), jax.ShapeDtypeStruct((2, 12), jnp.float32)
    with jax.enable_x64(True):
        variables = jax.eval_shape(SMALL_CLIP.init, jax.random.key(0), ecg, text)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_same_padding_matches_reference_rule():
    assert same_padding(1024, 16, 2) == (7, 7)  # stem: 1024 -> 512
    assert same_padding(512, 16, 1) == (7, 8)  # left = pad // 2
    assert same_padding(512, 1, 1) == (0, 0)
    assert same_padding(5, 16, 2) == (7, 8)


def test_logit_scale_init():
    # Initialising through the text tower alone keeps this cheap; logit_scale is created in setup either way.
    variables = SMALL_CLIP.init(jax.random.key(0), TEXT, method=CLIP.encode_text)
    np.testing.assert_allclose(variables["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-7)


def test_batch_norm_train_and_inference_modes_match_pytorch():
    bn = BatchNorm1d()
    x = jax.random.normal(jax.random.key(0), (3, 5, 4)) * 2 + 1
    variables = {"params": {"scale": np.array([1.0, 2.0, 0.5, 1.0], np.float32), "bias": np.full(4, 0.1, np.float32)},
                 "batch_stats": {"mean": np.full(4, 0.3, np.float32), "var": np.full(4, 2.0, np.float32)}}
    flat = np.asarray(x).reshape(-1, 4)
    mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)

    y, updates = bn.apply(variables, x, True, mutable=["batch_stats"])
    expected = (np.asarray(x) - mean) / np.sqrt(biased + 1e-5) * variables["params"]["scale"] + 0.1
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # PyTorch: momentum 0.1, running variance from the unbiased batch variance.
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * 0.3 + 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * 2.0 + 0.1 * unbiased, rtol=1e-6)

    y_eval = bn.apply(variables, x, False)
    expected_eval = (np.asarray(x) - 0.3) / np.sqrt(2.0 + 1e-5) * variables["params"]["scale"] + 0.1
    np.testing.assert_allclose(y_eval, expected_eval, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def small_variables():
    return random_variables(SMALL_CLIP, ECG, TEXT)


def test_train_mode_uses_dropout_and_updates_batch_stats(small_variables):
    train = jax.jit(lambda v, key: SMALL_CLIP.apply(v, ECG, TEXT, True, rngs={"dropout": key}, mutable=["batch_stats"]))
    (proj_a, text_a, _), updates = train(small_variables, jax.random.key(1))
    (proj_b, text_b, _), _ = train(small_variables, jax.random.key(2))
    assert not np.allclose(proj_a, proj_b)  # dropout 0.5 draws from the 'dropout' rng
    np.testing.assert_array_equal(text_a, text_b)  # the text tower has no dropout
    changed = jax.tree.map(lambda new, old: not np.allclose(new, old), updates["batch_stats"],
                           small_variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    with pytest.raises(Exception, match="dropout"):
        SMALL_CLIP.apply(small_variables, ECG, TEXT, True, mutable=["batch_stats"])


def test_inference_mode_is_deterministic_and_per_example(small_variables):
    encode = jax.jit(lambda v, x: SMALL_CLIP.apply(v, x, method=CLIP.encode_ecg))
    full = encode(small_variables, ECG)
    assert full.shape == (4, 6)
    np.testing.assert_array_equal(full, encode(small_variables, ECG))
    # Running statistics in inference: an example's projection does not depend on the rest of the batch.
    np.testing.assert_allclose(encode(small_variables, ECG[::-1])[::-1], full, rtol=1e-5, atol=1e-6)
    text = SMALL_CLIP.apply(small_variables, TEXT, method=CLIP.encode_text)
    assert text.shape == (4, 6)


def test_net1d_downsamples_each_stage():
    net = Net1D(**SMALL)
    variables = random_variables(net, ECG)
    features = net.apply(variables, ECG, False)
    assert features.shape == (4, 16)
    # stem stride 2 and two stages of stride 2: 64 -> 32 -> 16 -> 8; blocks widen with zero-padded shortcuts
    _, state = net.apply(variables, ECG, False, capture_intermediates=True, mutable=["intermediates"])
    assert state["intermediates"]["stage_1_block_1"]["__call__"][0].shape == (4, 8, 16)


def test_bad_shapes_are_explained(small_variables):
    with pytest.raises(ValueError, match=r"\(batch, length, 12\)"):
        SMALL_CLIP.apply(small_variables, ECG[..., :8], method=CLIP.encode_ecg)
    with pytest.raises(ValueError, match=r"\(batch, 12\)"):
        SMALL_CLIP.apply(small_variables, TEXT[:, :5], method=CLIP.encode_text)


@pytest.mark.parametrize("change,expected", [
    ({"base_filters": 9}, "base_filters 9 then filters (8, 16) must not decrease"),
    ({"filters": (16, 8)}, "base_filters 8 then filters (16, 8) must not decrease"),
    ({"group_width": 3}, "filters 16 with group_width 3 make 5 convolution groups, which must be at least 1 and "
                         "divide the block's 16 channels"),
    ({"group_width": 9}, "filters 8 with group_width 9 make 0 convolution groups"),
])
def test_widths_no_block_can_be_built_with_are_named(change, expected):
    """They ended in a traceback from `train clip` (Flax's bare AssertionError, a ZeroDivisionError, or
    "index can't contain negative values")."""
    with pytest.raises(ValueError, match=f"Net1D config: {re.escape(expected)}"):
        jax.eval_shape(Net1D(**{**SMALL, **change}).init, jax.random.key(0), ECG)
