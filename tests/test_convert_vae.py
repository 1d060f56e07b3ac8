import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.convert import load_state_dict, vae_from_torch, vae_to_torch
from diffusets_jax.ecg.leads import REFERENCE_TO_STANDARD
from diffusets_jax.models.vae import VAE
from tests.helpers.random_variables import random_variables
from tests.helpers.reference_weights import reference_vae_state_dict, reference_vectors

STANDARD = list(REFERENCE_TO_STANDARD)  # reference-order ECG[..., STANDARD] -> standard order


def _flat_reference() -> dict[str, np.ndarray]:
    return {f"{half}.{key}": value for half, sd in reference_vae_state_dict().items() for key, value in sd.items()}


def _assert_close(actual, expected):
    """Float32 parity: max |err| <= 1e-5 x the output's scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= 1e-5 * scale, (np.abs(actual - expected).max(), scale)


@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
def test_parity_with_reference_vectors(algorithm):
    """The published weights on the published inputs, with either way of computing the convolutions (the CPU
    default, "auto", is Winograd for the wide ones)."""
    vectors = reference_vectors()
    vae, variables = vae_from_torch(reference_vae_state_dict())
    assert vae == VAE()
    vae = vae.clone(conv_algorithm=algorithm)
    mean, logvar = jax.jit(lambda v, x: vae.apply(v, x, method=VAE.encode))(
        variables, vectors["vae_enc_input"][..., STANDARD])
    # The reference's latents are (batch, channel, length); ours are channels-last.
    _assert_close(mean, vectors["vae_enc_mean"].transpose(0, 2, 1))
    _assert_close(logvar, vectors["vae_enc_logvar"].transpose(0, 2, 1))
    decoded = jax.jit(lambda v, z: vae.apply(v, z, method=VAE.decode))(
        variables, vectors["vae_dec_input"].transpose(0, 2, 1))
    _assert_close(decoded, vectors["vae_dec_output"][..., STANDARD])


def test_reference_round_trip_is_exact():
    reference = _flat_reference()
    back = vae_to_torch(vae_from_torch(reference)[1])
    assert set(back) == set(reference)
    for key, value in reference.items():
        if ".groupnorm." in key:  # never applied by the reference: exported at PyTorch's default init
            expected = np.ones_like(value) if key.endswith("weight") else np.zeros_like(value)
            np.testing.assert_array_equal(back[key], expected)
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_nested_and_flat_state_dicts_convert_alike():
    nested_vae, nested = vae_from_torch(reference_vae_state_dict())
    flat_vae, flat = vae_from_torch(_flat_reference())
    assert nested_vae == flat_vae
    jax.tree.map(np.testing.assert_array_equal, nested, flat)


def test_lead_order_is_standard_after_conversion():
    reference = reference_vae_state_dict()
    _, variables = vae_from_torch(reference)
    encoder_in = reference["encoder"]["0.weight"]  # (out, in, k), inputs in reference order
    decoder_out = reference["decoder"]["25.weight"]  # (out, in, k), outputs in reference order
    # Standard lead 4 is aVL, which is reference lead 5 (and vice versa); the limb leads are not moved.
    kernel_in = variables["params"]["encoder"]["conv_in"]["kernel"]
    np.testing.assert_array_equal(kernel_in[:, 4, :], encoder_in[:, 5, :].T)
    np.testing.assert_array_equal(kernel_in[:, 5, :], encoder_in[:, 4, :].T)
    np.testing.assert_array_equal(kernel_in[:, 0, :], encoder_in[:, 0, :].T)
    kernel_out = variables["params"]["decoder"]["conv_out"]["kernel"]
    np.testing.assert_array_equal(kernel_out[:, :, 4], decoder_out[5].T)
    np.testing.assert_array_equal(variables["params"]["decoder"]["conv_out"]["bias"][5],
                                  reference["decoder"]["25.bias"][4])


@pytest.mark.parametrize("config", [dict(widths=(8, 16), groups=4), dict(widths=(8, 16, 32), groups=4, num_res_blocks=1)])
def test_random_flax_round_trip(config):
    vae = VAE(**config)
    variables = random_variables(vae, jnp.zeros((1, 2 ** len(vae.widths) * 4, 12)), jax.random.key(0))
    converted_vae, converted = vae_from_torch(vae_to_torch(variables), groups=vae.groups)
    assert converted_vae == vae
    assert jax.tree.structure(converted) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, converted, variables)
    # The group count is not in a checkpoint: the published 32 do not divide these widths, said in one line.
    with pytest.raises(ValueError, match=r"^VAE checkpoint: its widths 8, 16 do not split into 32 GroupNorm groups.*"
                                         r"vae_from_torch\(load_state_dict\(path\), groups=G\)"):
        vae_from_torch(vae_to_torch(variables))


def test_missing_and_unexpected_keys_are_named():
    reference = _flat_reference()
    del reference["encoder.7.conv_2.bias"], reference["encoder.8.groupnorm_1.weight"]
    reference["decoder.4.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing keys \(2\): 7\.conv_2\.bias, 8\.groupnorm_1\.weight") as err:
        vae_from_torch(reference)
    assert "encoder" in str(err.value)
    reference["encoder.7.conv_2.bias"] = np.zeros(512, np.float32)
    reference["encoder.8.groupnorm_1.weight"] = np.ones(512, np.float32)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): 4\.extra\.weight"):
        vae_from_torch(reference)


def test_a_weight_of_the_wrong_shape_or_with_nan_is_named():
    """Both used to convert: the damaged decoder failed only at sampling, the NaN gave non-finite ECGs."""
    reference = _flat_reference()
    weight = reference["decoder.2.conv_2.weight"]
    reference["decoder.2.conv_2.weight"] = weight[:, :, :-1]
    with pytest.raises(ValueError, match=r"VAE decoder checkpoint: '2\.conv_2\.weight' has shape \(512, 512, 2\), which "
                                         r"does not fit the architecture read from the other keys \(expects "
                                         r"\(512, 512, 3\)\)"):
        vae_from_torch(reference)
    reference["decoder.2.conv_2.weight"] = weight.copy()
    reference["decoder.2.conv_2.weight"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"'2\.conv_2\.weight' holds NaN or inf values"):
        vae_from_torch(reference)
    reference["decoder.2.conv_2.weight"] = weight[0]  # a conv weight of two axes, not three
    with pytest.raises(ValueError, match=r"'2\.conv_2\.weight' has shape \(512, 3\)"):
        vae_from_torch(reference)


def test_keys_outside_encoder_and_decoder_are_rejected():
    reference = _flat_reference()
    reference["quant_conv.weight"] = np.zeros((8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="quant_conv.weight"):
        vae_from_torch(reference)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_checkpoint_files_load(tmp_path, suffix):
    reference = _flat_reference()
    path = tmp_path / f"vae_model{suffix}"
    if suffix == ".npz":
        np.savez(path, **reference)
    else:
        from safetensors.numpy import save_file

        save_file(reference, str(path))
    loaded = load_state_dict(path)
    vae, variables = vae_from_torch(loaded)
    _, expected = vae_from_torch(reference)
    assert vae == VAE()
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
