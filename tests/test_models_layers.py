"""PyTorch-compatible layers checked against direct NumPy transcriptions of PyTorch's definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.layers import ConvTranspose1d, TorchMultiheadAttention, group_norm, mish


def torch_conv_transpose1d(x, weight, bias, stride, padding):
    """PyTorch ConvTranspose1d by its definition: out[o, i*s - p + k] += x[c, i] * w[c, o, k]. x (B, C, L)."""
    batch, _, length = x.shape
    _, out_channels, kernel = weight.shape
    full = np.zeros((batch, out_channels, (length - 1) * stride + kernel))
    for i in range(length):
        for k in range(kernel):
            full[:, :, i * stride + k] += np.einsum("bc,co->bo", x[:, :, i], weight[:, :, k])
    out_length = (length - 1) * stride - 2 * padding + kernel
    return full[:, :, padding:padding + out_length] + bias[None, :, None]


@pytest.mark.parametrize("stride,padding,kernel", [(2, 1, 4), (2, 0, 3), (1, 1, 3)])
def test_conv_transpose_matches_pytorch_definition(stride, padding, kernel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 8)).astype(np.float32)  # PyTorch layout (B, C_in, L)
    weight = rng.normal(size=(5, 3, kernel)).astype(np.float32)  # (C_in, C_out, k)
    bias = rng.normal(size=(3,)).astype(np.float32)
    expected = torch_conv_transpose1d(x, weight, bias, stride, padding)
    layer = ConvTranspose1d(3, kernel, stride=stride, padding=padding)
    params = {"params": {"kernel": np.transpose(weight, (2, 0, 1)), "bias": bias}}
    got = layer.apply(params, np.transpose(x, (0, 2, 1)))
    np.testing.assert_allclose(np.transpose(got, (0, 2, 1)), expected, rtol=1e-5, atol=1e-5)
    assert got.shape[1] == (8 - 1) * stride - 2 * padding + kernel


def torch_mha(query, key, value, in_w, in_b, out_w, out_b, heads):
    """PyTorch nn.MultiheadAttention(batch_first=True) forward, weights in PyTorch layout."""
    e = query.shape[-1]
    q, k, v = (x @ in_w[i * e:(i + 1) * e].T + in_b[i * e:(i + 1) * e] for i, x in enumerate((query, key, value)))
    d = e // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ split(v)).transpose(0, 2, 1, 3).reshape(query.shape)
    return out @ out_w.T + out_b


def test_multihead_attention_matches_pytorch_semantics():
    rng = np.random.default_rng(1)
    e, heads = 16, 4
    query, key, value = (rng.normal(size=(2, n, e)) for n in (6, 5, 5))
    in_w, in_b = rng.normal(size=(3 * e, e)) / 4, rng.normal(size=(3 * e,))
    out_w, out_b = rng.normal(size=(e, e)) / 4, rng.normal(size=(e,))
    params = {"params": {"in_proj_kernel": in_w.T, "in_proj_bias": in_b,
                         "out_proj": {"kernel": out_w.T, "bias": out_b}}}
    layer = TorchMultiheadAttention(e, heads)
    got = layer.apply(params, *(jnp.asarray(a, jnp.float32) for a in (query, key, value)))
    np.testing.assert_allclose(got, torch_mha(query, key, value, in_w, in_b, out_w, out_b, heads), atol=1e-5)

    # Identical keys/values: the shortcut equals the full attention for every query.
    same = np.broadcast_to(value[:, :1], value.shape)
    full = layer.apply(params, jnp.asarray(query, jnp.float32), jnp.asarray(same, jnp.float32),
                       jnp.asarray(same, jnp.float32))
    short = layer.apply(params, jnp.asarray(value[:, 0], jnp.float32), method=TorchMultiheadAttention.identical_keys)
    np.testing.assert_allclose(full, np.broadcast_to(short[:, None], full.shape), atol=1e-5)


def test_mha_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        TorchMultiheadAttention(10, 4).init(jax.random.key(0), *(jnp.zeros((1, 2, 10)),) * 3)


def test_group_norm_is_joint_over_length_and_channels():
    x = np.random.default_rng(2).normal(size=(2, 7, 3)).astype(np.float32) * 3 + 1
    norm = group_norm(name="gn")
    variables = norm.init(jax.random.key(0), x)
    got = norm.apply(variables, x)
    mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)


def test_mish():
    x = np.linspace(-6, 6, 25)
    np.testing.assert_allclose(mish(jnp.asarray(x)), x * np.tanh(np.log1p(np.exp(x))), rtol=1e-6, atol=1e-7)
