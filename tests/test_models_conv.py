"""`channels_last_conv`: the gradient JAX derives, written so that XLA:CPU keeps every convolution of a loop body's
gradient channels-last (the other layouts run as naive loops there, jax-ml/jax#12868); and the models use it."""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.conv import CHANNELS_LAST, channels_last_conv, flax_conv_general_dilated
from tests.helpers.tiny_models import tiny_vae_unet

FAST_LAYOUT = "b0f_0io->b0f"  # XLA's name for ("NWC", "WIO", "NWC")


def _lax(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride,), (padding,), dimension_numbers=CHANNELS_LAST)


# The models' convolutions (k3 "same", the VAE's k3 s2 downsampling padded on the right, k1, the transposed
# convolution's 2-tap phases padded on one side) and odd cases: lengths that strides do not divide, a kernel
# as long as the input, padding that crops.
@pytest.mark.parametrize("length,taps,stride,padding", [
    (64, 3, 1, (1, 1)), (63, 3, 2, (0, 1)), (64, 3, 2, (0, 1)), (40, 1, 1, (0, 0)), (33, 2, 1, (1, 0)),
    (33, 2, 1, (0, 1)), (100, 7, 2, (3, 3)), (5, 5, 1, (0, 0)), (20, 3, 3, (2, 1)), (16, 3, 1, (-1, 2)),
])
def test_value_and_gradients_are_jaxs_own(length, taps, stride, padding):
    rng = np.random.default_rng(length * 100 + taps * 10 + stride)
    x = jnp.asarray(rng.normal(size=(3, length, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(taps, 5, 6)), jnp.float32)

    @jax.jit
    def both(x, kernel, dy):
        outs = []
        for conv in (_lax, channels_last_conv):
            y, vjp = jax.vjp(lambda x, k, conv=conv: conv(x, k, stride, padding), x, kernel)
            outs.append((y, *vjp(dy)))
        return outs

    out_length = (length + sum(padding) - taps) // stride + 1
    dy = jnp.asarray(rng.normal(size=(3, out_length, 6)), jnp.float32)
    expected, got = both(x, kernel, dy)
    for name, e, g in zip(("y", "dx", "dkernel"), expected, got, strict=True):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)


def _loop_body_layouts(loss, params, x) -> collections.Counter:
    """Layouts (XLA dim_labels) of the convolutions in the compiled CPU program that accumulates the gradient
    of `loss(params, x)` over two steps of a `lax.scan` (as gradient accumulation and posterior sampling do)."""
    grad = jax.grad(loss, argnums=(0, 1))

    def accumulate(params, x):
        def body(total, i):
            dparams, dx = grad(params, x + i)
            return total + jnp.sum(dx) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(dparams)), None
        return jax.lax.scan(body, jnp.zeros(()), jnp.arange(2.0))[0]

    hlo = jax.jit(accumulate).lower(params, x).compile().as_text()
    return collections.Counter(re.findall(r" convolution\(.*dim_labels=([^,]+)", hlo))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU layout question")
def test_a_loop_body_gradient_keeps_every_convolution_channels_last():
    x = jnp.ones((4, 64, 8))
    kernel = jnp.ones((3, 8, 8)) * 0.1

    def loss_of(conv):
        return lambda kernel, x: jnp.sum(jnp.tanh(conv(x, kernel, 2, (0, 1))) ** 2)

    ours = _loop_body_layouts(loss_of(channels_last_conv), kernel, x)
    assert ours == {FAST_LAYOUT: 3}, ours  # forward, input gradient, kernel gradient
    # The check can tell: JAX's own gradient, in the same loop, has the two other layouts. (Should XLA:CPU
    # come to rewrite them in loop bodies too, this fails, and `models/conv.py` has done its job.)
    plain = _loop_body_layouts(loss_of(_lax), kernel, x)
    assert set(plain) - {FAST_LAYOUT}, plain


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU layout question")
def test_the_models_gradients_in_a_loop_body_keep_every_convolution_channels_last():
    """Every convolution of the VAE (direct, upsampling, downsampling, 1x1 skips) and of the U-Net (its
    transposed convolutions included) goes through `channels_last_conv`; a layer that bypassed it would add a
    slow layout here."""
    vae, vae_vars, unet, unet_vars = tiny_vae_unet()

    def vae_loss(params, ecg):
        recon, mean, _ = vae.apply({"params": params}, ecg, jax.random.PRNGKey(0))
        return jnp.sum(jnp.square(recon - ecg)) + jnp.sum(jnp.square(mean))

    ones = jnp.ones((2,))

    def unet_loss(params, latent):
        out = unet.apply({**unet_vars, "params": params}, latent, jnp.array([3, 700]), jnp.ones((2, 16)),
                         ones, ones, ones)
        return jnp.sum(jnp.square(out))

    vae_layouts = _loop_body_layouts(vae_loss, vae_vars["params"], jnp.ones((2, 1024, 12)))
    unet_layouts = _loop_body_layouts(unet_loss, unet_vars["params"], jnp.ones((2, 128, 4)))
    assert set(vae_layouts) == {FAST_LAYOUT} and vae_layouts[FAST_LAYOUT] >= 3 * 20, vae_layouts
    assert set(unet_layouts) == {FAST_LAYOUT} and unet_layouts[FAST_LAYOUT] >= 3 * 15, unet_layouts


def test_flax_conv_takes_it_for_plain_convolutions_and_falls_back_for_grouped_ones():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 31, 8)), jnp.float32)
    for kwargs in ({"strides": (2,), "padding": ((0, 1),)}, {"padding": ((1, 1),), "feature_group_count": 4},
                   {"padding": "SAME"}):
        ours = nn.Conv(6 if "feature_group_count" not in kwargs else 8, (3,),
                       conv_general_dilated=flax_conv_general_dilated, **kwargs)
        plain = ours.clone(conv_general_dilated=None)
        variables = plain.init(jax.random.PRNGKey(1), x)

        def loss(module):
            return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

        for a, b in zip(jax.grad(loss(plain), argnums=(0, 1))(variables, x),
                        jax.grad(loss(ours), argnums=(0, 1))(variables, x), strict=True):
            for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5, err_msg=str(kwargs))
