"""`remat=True` on the VAE and U-Net: the same parameters and the same gradients, with the blocks rematerialised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE
from tests.helpers.jaxprs import equations
from tests.helpers.random_variables import random_variables

TEXT_DIM = 12
UNET_SMALL = dict(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=8,
                  up_attention_dims=(32, 16), bottleneck_heads=2, text_dim=TEXT_DIM)


def _unet_case():
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.normal(size=(3, 16, 4)), jnp.float32), jnp.asarray([3, 500, 999], jnp.int32),
              jnp.asarray(rng.normal(size=(3, TEXT_DIM)), jnp.float32) / np.sqrt(TEXT_DIM),
              jnp.asarray([0.0, 1.0, 1.0]), jnp.asarray([30.0, 60.0, 85.0]), jnp.asarray([55.0, 75.0, 140.0]))

    def loss(module, params, constants):
        return jnp.sum(jnp.square(module.apply({"params": params, **constants}, *inputs)))

    return UNet(**UNET_SMALL), inputs, loss


def _vae_case():
    ecg = jax.random.normal(jax.random.key(0), (2, 64, 12)) * 0.3
    key = jax.random.key(1)

    def loss(module, params, constants):
        recon, mean, logvar = module.apply({"params": params}, ecg, key)
        return jnp.sum(jnp.square(recon - ecg)) + jnp.sum(mean ** 2 + jnp.exp(logvar) - logvar)

    return VAE(widths=(8, 16), groups=4), (ecg, key), loss


CASES = {"vae": _vae_case, "unet": _unet_case}


@pytest.mark.slow  # two gradient programs per model: over a minute of compiling on 2 shared cores
@pytest.mark.parametrize("name", sorted(CASES))
def test_remat_keeps_parameters_and_gradients(name):
    module, inputs, loss = CASES[name]()
    remat = module.clone(remat=True)
    plain_shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), *inputs)
    assert jax.tree.structure(plain_shapes) == jax.tree.structure(remat_shapes)
    assert jax.tree.map(lambda a: a.shape, plain_shapes) == jax.tree.map(lambda a: a.shape, remat_shapes)

    variables = random_variables(module, *inputs)
    if name == "unet":  # the frozen time tables must hold the real sinusoids, not random numbers
        from diffusets_jax.models.unet import sinusoidal_time_table

        variables["constants"] = jax.tree.map(lambda t: jnp.asarray(sinusoidal_time_table(*t.shape)),
                                              variables["constants"])
    params = variables["params"]
    constants = {k: v for k, v in variables.items() if k != "params"}

    grads = {}
    for label, m in (("plain", module), ("remat", remat)):
        fn = jax.value_and_grad(lambda p, m=m: loss(m, p, constants))
        names = {eqn.primitive.name for eqn in equations(jax.make_jaxpr(fn)(params).jaxpr)}
        # jax.checkpoint's primitive ("remat2" today; "checkpoint" in some versions)
        rematerialised = any(n.startswith(("remat", "checkpoint")) for n in names)
        assert rematerialised == (label == "remat"), f"{label}: primitives {sorted(names)}"
        grads[label] = jax.jit(fn)(params)

    np.testing.assert_allclose(grads["remat"][0], grads["plain"][0], rtol=1e-6)
    # Each leaf is compared at its layer's gradient scale, not its own: a self-attention key's bias shifts every
    # score of a query alike, which the softmax ignores, so its gradient is zero but for float32 rounding (about
    # 1e-9 here), and that rounding differs between any two compilations.
    layer_scale = {}
    for path, g in jax.tree_util.tree_leaves_with_path(grads["plain"][1]):
        layer = jax.tree_util.keystr(path[:-1])
        layer_scale[layer] = max(layer_scale.get(layer, 0.0), float(np.abs(g).max()))
    remat_grads = dict(jax.tree_util.tree_leaves_with_path(grads["remat"][1]))
    for path, g_plain in jax.tree_util.tree_leaves_with_path(grads["plain"][1]):
        scale = layer_scale[jax.tree_util.keystr(path[:-1])] + 1e-30
        np.testing.assert_allclose(remat_grads[path], g_plain, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))
    assert any(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads["plain"][1]))
