import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.convert import clip_from_torch, clip_to_torch, load_state_dict
from diffusets_jax.ecg.leads import REFERENCE_TO_STANDARD
from diffusets_jax.models.clip import CLIP
from tests.helpers.random_variables import random_variables
from tests.helpers.reference_weights import reference_state_dict, reference_vectors

STANDARD = list(REFERENCE_TO_STANDARD)
UNUSED_BN = "resnet.stage_list.0.block_list.0.bn1."


def _assert_close(actual, expected):
    """Float32 parity: max |err| <= 1e-5 x the output's scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-5 * scale, (np.abs(actual - expected).max(), scale)


def test_parity_with_reference_vectors():
    vectors = reference_vectors()
    clip, variables = clip_from_torch(reference_state_dict("clip"))
    assert clip == CLIP()
    ecg = vectors["clip_ecg_input"][..., STANDARD]

    def run(variables, ecg, text):
        features = clip.apply(variables, ecg, method=CLIP.ecg_features)
        return features, clip.apply(variables, ecg, text)

    features, (ecg_proj, text_proj, logit_scale) = jax.jit(run)(variables, ecg, vectors["clip_text_input"])
    _assert_close(features, vectors["clip_ecg_features"])
    _assert_close(ecg_proj, vectors["clip_ecg_proj"])
    _assert_close(text_proj, vectors["clip_text_proj"])
    np.testing.assert_allclose(logit_scale, np.log(1 / 0.07), rtol=1e-6)


def test_reference_round_trip_is_exact():
    reference = reference_state_dict("clip")
    back = clip_to_torch(clip_from_torch(reference)[1])
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        if not key.startswith(UNUSED_BN):  # never applied: exported at PyTorch's default init
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    np.testing.assert_array_equal(back[UNUSED_BN + "running_var"], np.ones(64, np.float32))


def test_lead_order_is_standard_after_conversion():
    reference = reference_state_dict("clip")
    _, variables = clip_from_torch(reference)
    stem = variables["params"]["ecg_encoder"]["first_conv"]["kernel"]  # (k, in, out)
    torch_stem = reference["resnet.first_conv.conv.weight"]  # (out, in, k), reference lead order
    np.testing.assert_array_equal(stem[:, 4, :], torch_stem[:, 5, :].T)  # aVL
    np.testing.assert_array_equal(stem[:, 5, :], torch_stem[:, 4, :].T)  # aVF
    np.testing.assert_array_equal(stem[:, 11, :], torch_stem[:, 11, :].T)


@pytest.mark.parametrize("config", [
    dict(base_filters=8, filters=(8, 16), blocks_per_stage=(1, 2), kernel_size=5, group_width=4,
         text_dim=12, text_hidden_dim=16, embed_dim=6),
    dict(in_channels=3, base_filters=4, filters=(8,), blocks_per_stage=(3,), kernel_size=3, group_width=2,
         text_dim=5, text_hidden_dim=7, embed_dim=2),
])
def test_random_flax_round_trip(config):
    clip = CLIP(**config)
    variables = random_variables(clip, jnp.zeros((1, 16, clip.in_channels)), jnp.zeros((1, clip.text_dim)))
    converted_clip, converted = clip_from_torch(clip_to_torch(variables))
    assert converted_clip == clip
    assert jax.tree.structure(converted) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, converted, variables)


def test_text_dim_is_read_from_the_checkpoint():
    reference = reference_state_dict("clip")
    reference["text_projector.linear_1.weight"] = reference["text_projector.linear_1.weight"][:, :384]
    clip, _ = clip_from_torch(reference)
    assert clip.text_dim == 384


def test_missing_and_unexpected_keys_are_named():
    reference = reference_state_dict("clip")
    del reference["resnet.stage_list.3.block_list.2.se_fc1.bias"]
    reference["resnet.dense.weight"] = np.zeros((5, 1024), np.float32)
    with pytest.raises(ValueError, match=r"missing keys \(1\): resnet\.stage_list\.3\.block_list\.2\.se_fc1\.bias.*"
                                         r"unexpected keys \(1\): resnet\.dense\.weight"):
        clip_from_torch(reference)


def test_a_weight_of_the_wrong_shape_or_with_inf_is_named():
    """Both used to convert and fail (or give non-finite features) only when the CLIP was applied."""
    reference = reference_state_dict("clip")
    key = "resnet.stage_list.0.block_list.0.se_fc1.weight"
    weight = reference[key]
    reference[key] = weight[:, :-1]
    with pytest.raises(ValueError, match=rf"CLIP checkpoint: '{key}' has shape \({weight.shape[0]}, "
                                         rf"{weight.shape[1] - 1}\), which does not fit .* \(expects "
                                         rf"\({weight.shape[0]}, {weight.shape[1]}\)\)"):
        clip_from_torch(reference)
    reference[key] = weight.copy()
    reference["resnet.stage_list.1.block_list.0.bn1.running_var"] = np.full_like(
        reference["resnet.stage_list.1.block_list.0.bn1.running_var"], np.inf)
    with pytest.raises(ValueError, match=r"'resnet\.stage_list\.1\.block_list\.0\.bn1\.running_var' holds NaN or inf"):
        clip_from_torch(reference)


def test_unused_first_bn_is_optional():
    reference = {k: v for k, v in reference_state_dict("clip").items() if not k.startswith(UNUSED_BN)}
    clip, _ = clip_from_torch(reference)
    assert clip == CLIP()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_checkpoint_files_load(tmp_path, suffix):
    reference = reference_state_dict("clip")
    path = tmp_path / f"clip_model{suffix}"
    if suffix == ".npz":
        np.savez(path, **reference)
    else:
        from safetensors.numpy import save_file

        save_file(reference, str(path))
    clip, variables = clip_from_torch(load_state_dict(path))
    _, expected = clip_from_torch(reference)
    assert clip == CLIP()
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
