"""U-Net checkpoint conversion: parity with the PyTorch reference vectors, round trips, key errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.convert import unet_from_torch, unet_to_torch
from diffusets_jax.models.unet import UNet
from tests.helpers.reference_weights import reference_state_dict, reference_vectors


@pytest.fixture(scope="module")
def reference_sd():
    return reference_state_dict("unet")


@pytest.fixture(scope="module")
def converted(reference_sd):
    return unet_from_torch(reference_sd)


def test_parity_with_reference_vectors(converted):
    module, variables = converted
    v = reference_vectors()
    x = np.transpose(v["unet_x"], (0, 2, 1))  # reference (B, 4, 128) -> channels-last (B, 128, 4)
    eps = jax.jit(module.apply)(variables, x, v["unet_t"], v["unet_text"], v["unet_sex"], v["unet_age"], v["unet_hr"])
    reference = np.transpose(v["unet_eps"], (0, 2, 1))
    assert list(v["unet_t"]) == [0, 500, 999]
    err = np.abs(np.asarray(eps) - reference).max()
    assert err <= 1e-5 * np.abs(reference).max(), err


def test_converted_config_and_full_round_trip(converted, reference_sd):
    module, variables = converted
    assert module == UNet()  # every architectural field read from the shapes equals the published defaults
    back = unet_to_torch(variables)
    assert set(back) == set(reference_sd) and len(back) == 713
    for key, value in reference_sd.items():
        if ".block.down." in key:  # built but never called by the reference: exported as zeros
            assert back[key].shape == value.shape and not back[key].any()
        else:
            assert back[key].dtype == np.float32
            np.testing.assert_array_equal(back[key], value, err_msg=key)  # tables included, bit for bit
    tables = sum(v.size for k, v in back.items() if k.endswith("time_emb.embeddings"))
    assert sum(v.size for v in back.values()) - tables == 13_345_792  # the reference's trainable count


def test_random_small_model_round_trips():
    small = UNet(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=8,
                 up_attention_dims=(32, 16), bottleneck_heads=2, text_dim=5, kernel_size=5)
    f32 = jnp.float32
    abstract = jax.eval_shape(
        small.init, jax.random.key(3), jnp.zeros((1, 8, 4), f32), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 5), f32),
        *(jnp.zeros((1,), f32),) * 3,
    )
    rng = np.random.default_rng(3)  # distinct random values everywhere: any swapped or mis-laid leaf shows
    variables = jax.tree_util.tree_map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32), abstract)
    module, restored = unet_from_torch(unet_to_torch(variables), bottleneck_heads=2)
    assert module == small
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    restored_leaves = dict(jax.tree_util.tree_leaves_with_path(restored))
    assert len(leaves) == len(restored_leaves)
    for path, leaf in leaves:
        np.testing.assert_array_equal(restored_leaves[path], leaf, err_msg=jax.tree_util.keystr(path))
    # Head counts are not in a checkpoint: counts that do not divide the widths are said in one line.
    with pytest.raises(ValueError, match=r"^U-Net checkpoint: its attention widths 8, 16, 32 do not split into 3 "
                                         r"heads.*unet_from_torch\(load_state_dict\(path\), num_heads=H"):
        unet_from_torch(unet_to_torch(variables), num_heads=3, bottleneck_heads=2)
    for heads in ({"num_heads": 0}, {"bottleneck_heads": 0}, {"num_heads": 2.0}):  # 0 was a ZeroDivisionError
        with pytest.raises(ValueError, match=r"^(num|bottleneck)_heads must be a whole number >= 1"):
            unet_from_torch(unet_to_torch(variables), **heads)


def test_unused_block_down_keys_are_optional(reference_sd):
    without = {k: v for k, v in reference_sd.items() if ".block.down." not in k}
    assert len(without) == 713 - 24  # 12 blocks (the bottleneck has none)
    module, _ = unet_from_torch(without)
    assert module == UNet()


def test_missing_and_unexpected_keys_are_named(reference_sd):
    broken = dict(reference_sd)
    del broken["upsampling_blocks.2.block.cross_attention.to_k.bias"]
    broken["upsampling_blocks.2.block.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        unet_from_torch(broken)
    message = str(err.value)
    assert "missing keys (1): upsampling_blocks.2.block.cross_attention.to_k.bias" in message
    assert "unexpected keys (1): upsampling_blocks.2.block.extra.weight" in message


def test_wrong_shape_is_named(reference_sd):
    broken = dict(reference_sd)
    broken["bottelneck.bottleneck_conv2.weight"] = np.zeros((256, 256, 5), np.float32)
    with pytest.raises(ValueError, match=r"'bottelneck.bottleneck_conv2.weight' has shape \(256, 256, 5\)"):
        unet_from_torch(broken)
    broken["bottelneck.bottleneck_conv2.weight"] = np.full((256, 256, 3), np.nan, np.float32)
    with pytest.raises(ValueError, match=r"'bottelneck.bottleneck_conv2.weight' holds NaN or inf values"):
        unet_from_torch(broken)


def test_not_a_unet_checkpoint():
    with pytest.raises(ValueError, match="downsampling_blocks.0.down.weight"):
        unet_from_torch({"encoder.conv.weight": np.zeros((1, 1, 1))})
