import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.vae import LATENT_SCALE, LOGVAR_MAX, LOGVAR_MIN, VAE, NearestUpsampleConv
from tests.helpers.random_variables import random_variables
from tests.helpers.reference_weights import DATA


def _param_count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _reference_count(model: str, skip: str | None = None) -> int:
    keys = json.loads((DATA / "reference_state_dict_keys.json").read_text())["state_dict_keys"][model]
    return sum(math.prod(shape) for key, (dtype, shape) in keys.items() if skip is None or skip in key)


# The same code at demo size: two levels, latent length 64 / 4 = 16.
SMALL = VAE(widths=(8, 16), groups=4)
SMALL_X = jax.random.normal(jax.random.key(0), (2, 64, 12))
encode = jax.jit(lambda v, x: SMALL.apply(v, x, method=VAE.encode))
decode = jax.jit(lambda v, z: SMALL.apply(v, z, method=VAE.decode))


@pytest.fixture(scope="module")
def small_variables():
    return random_variables(SMALL, SMALL_X, jax.random.key(2))


def test_published_parameter_counts():
    shapes = jax.eval_shape(VAE().init, jax.random.key(0), jnp.zeros((1, 1024, 12)), jax.random.key(1))["params"]
    # The published totals (reference section 5) include each attention block's GroupNorm, which the
    # reference builds but never applies; the Flax model does not carry those dead weights.
    unused_encoder = _reference_count("vae_encoder", ".groupnorm.")
    unused_decoder = _reference_count("vae_decoder", ".groupnorm.")
    assert unused_encoder == unused_decoder == 2 * 512
    assert _param_count(shapes["encoder"]) + unused_encoder == 12_218_448
    assert _param_count(shapes["decoder"]) + unused_decoder == 17_333_664


def test_published_shapes():
    vae = VAE()
    x = jax.ShapeDtypeStruct((3, 1024, 12), jnp.float32)
    variables = jax.eval_shape(vae.init, jax.random.key(0), x, jax.random.key(1))
    mean, logvar = jax.eval_shape(lambda v, x: vae.apply(v, x, method=VAE.encode), variables, x)
    assert mean.shape == logvar.shape == (3, 128, 4)
    out = jax.eval_shape(lambda v, z: vae.apply(v, z, method=VAE.decode), variables, mean)
    assert out.shape == (3, 1024, 12)


def test_parameters_stay_float32_under_x64():
    """Flax initialisers default to float64 under jax_enable_x64: the convolutions and norms were made float64
    there (the U-Net's were not), with other initial values for the same key, and the VAE computed in float64."""
    x = jax.ShapeDtypeStruct((2, 64, 12), jnp.float32)
    with jax.enable_x64(True):
        variables = jax.eval_shape(SMALL.init, jax.random.key(0), x, jax.random.key(1))
        mean, _ = jax.eval_shape(lambda v, x: SMALL.apply(v, x, method=VAE.encode), variables, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert mean.dtype == jnp.float32


def test_small_variant_round_shapes(small_variables):
    mean, logvar = encode(small_variables, SMALL_X)
    assert mean.shape == logvar.shape == (2, 16, 4)
    recon = decode(small_variables, mean)
    assert recon.shape == SMALL_X.shape
    assert np.all(np.isfinite(recon))


def test_logvar_is_clamped(small_variables):
    variables = jax.tree.map(np.array, small_variables)
    bias = variables["params"]["encoder"]["conv_moments"]["bias"]
    bias[4:] = 1e4
    _, logvar = encode(variables, SMALL_X)
    assert np.all(np.asarray(logvar) == LOGVAR_MAX)
    bias[4:] = -1e4
    mean, logvar = encode(variables, SMALL_X)
    assert np.all(np.asarray(logvar) == LOGVAR_MIN)
    assert np.abs(np.asarray(mean)).max() < 1e3  # the mean channels are untouched


def test_sample_latent_is_scaled_reparameterisation():
    mean = jax.random.normal(jax.random.key(0), (2, 128, 4))
    logvar = jax.random.normal(jax.random.key(1), (2, 128, 4))
    key = jax.random.key(2)
    z = VAE.sample_latent(mean, logvar, key)
    eps = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(z, (mean + np.exp(0.5 * logvar) * eps) * 0.18215, rtol=1e-6, atol=1e-7)
    assert LATENT_SCALE == 0.18215
    assert not np.allclose(z, VAE.sample_latent(mean, logvar, jax.random.key(3)))


def test_decode_divides_by_latent_scale(small_variables):
    z = jax.random.normal(jax.random.key(4), (2, 16, 4))
    direct = jax.jit(lambda v, z: SMALL.apply(v, z / LATENT_SCALE, method=lambda m, z: m.decoder(z)))
    np.testing.assert_allclose(decode(small_variables, z), direct(small_variables, z), rtol=1e-6, atol=1e-6)
    # a measured scale (train.scale_by_std): the same latent at 3x the scale decodes to the same ECG
    rescaled = jax.jit(lambda v, z: SMALL.apply(v, z, 3 * LATENT_SCALE, method=VAE.decode))
    np.testing.assert_allclose(rescaled(small_variables, 3 * z), decode(small_variables, z), rtol=1e-5, atol=1e-5)
    mean, logvar = jnp.ones((1, 16, 4)), jnp.full((1, 16, 4), -30.0)
    np.testing.assert_allclose(VAE.sample_latent(mean, logvar, jax.random.key(0), 0.7), 0.7, rtol=1e-5)


def test_training_pass_matches_its_parts(small_variables):
    key = jax.random.key(5)
    recon, mean, logvar = jax.jit(SMALL.apply)(small_variables, SMALL_X, key)
    mean2, logvar2 = encode(small_variables, SMALL_X)
    np.testing.assert_allclose(mean, mean2, rtol=1e-5, atol=1e-6)
    z = VAE.sample_latent(mean2, logvar2, key)
    np.testing.assert_allclose(recon, decode(small_variables, z), rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_explained(small_variables):
    with pytest.raises(ValueError, match=r"\(batch, length, 12\)"):
        SMALL.apply(small_variables, jnp.zeros((2, 64, 8)), method=VAE.encode)
    with pytest.raises(ValueError, match="multiple of 4"):
        SMALL.apply(small_variables, jnp.zeros((2, 66, 12)), method=VAE.encode)
    with pytest.raises(ValueError, match=r"\(batch, length, 4\)"):
        SMALL.apply(small_variables, jnp.zeros((2, 16, 3)), method=VAE.decode)
    with pytest.raises(ValueError, match="VAE.encode expects an array of ECGs .*, got a Python list"):
        SMALL.apply(small_variables, np.zeros((2, 64, 12)).tolist(), method=VAE.encode)


def test_upsample_conv_equals_nearest_upsampling_then_conv():
    """The half-length two-tap form must be the published nn.Upsample(x2) + Conv1d(k3, p1), values and gradients."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 9, 6)), jnp.float32)
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    layer = NearestUpsampleConv(5)
    assert jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x)["params"]) == jax.tree.map(jnp.shape, params)

    def published(params, x):
        upsampled = jnp.repeat(x, 2, axis=1)  # nearest neighbour: u[2m] = u[2m + 1] = x[m]
        return jax.lax.conv_general_dilated(upsampled, params["kernel"], (1,), ((1, 1),),
                                             dimension_numbers=("NWC", "WIO", "NWC")) + params["bias"]

    got = layer.apply({"params": params}, x)
    assert got.shape == (2, 18, 5)
    np.testing.assert_allclose(got, published(params, x), rtol=1e-5, atol=1e-5)
    target = jnp.asarray(rng.normal(size=(2, 18, 5)), jnp.float32)
    ours = jax.grad(lambda p, x: jnp.sum((layer.apply({"params": p}, x) - target) ** 2), argnums=(0, 1))(params, x)
    theirs = jax.grad(lambda p, x: jnp.sum((published(p, x) - target) ** 2), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
