"""PyTorch-compatible layers checked against direct NumPy transcriptions of PyTorch's definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffusets_jax.models import layers
from diffusets_jax.models.layers import Conv1d, ConvTranspose1d, TorchMultiheadAttention, group_norm, mish


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


# Lengths 1-4 take the short-input matmul path (length <= kernel), 8 and 9 the per-phase correlations: phases
# with padding that crops (p = 2, k = 3), with fewer outputs than others (s = 3), without taps (s = 3, k = 2).
# (A length that leaves no output is left out: PyTorch refuses it.)
TRANSPOSE_CASES = [(stride, padding, kernel, length)
                   for stride, padding, kernel in [(2, 1, 4), (2, 0, 3), (1, 1, 3), (2, 2, 3), (3, 1, 5), (3, 0, 2)]
                   for length in [1, 2, 4, 8, 9] if (length - 1) * stride - 2 * padding + kernel > 0]


@pytest.mark.parametrize("stride,padding,kernel,length", TRANSPOSE_CASES)
def test_conv_transpose_matches_pytorch_definition(stride, padding, kernel, length):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, length)).astype(np.float32)  # PyTorch layout (B, C_in, L)
    weight = rng.normal(size=(5, 3, kernel)).astype(np.float32)  # (C_in, C_out, k)
    bias = rng.normal(size=(3,)).astype(np.float32)
    expected = torch_conv_transpose1d(x, weight, bias, stride, padding)
    layer = ConvTranspose1d(3, kernel, stride=stride, padding=padding)
    params = {"params": {"kernel": np.transpose(weight, (2, 0, 1)), "bias": bias}}
    got = layer.apply(params, np.transpose(x, (0, 2, 1)))
    np.testing.assert_allclose(np.transpose(got, (0, 2, 1)), expected, rtol=1e-5, atol=1e-5)
    assert got.shape[1] == (length - 1) * stride - 2 * padding + kernel


def torch_conv1d(x, weight, bias, stride, padding):
    """PyTorch Conv1d by its definition: out[o, l] = b[o] + sum_{c,k} w[o, c, k] x_pad[c, l*s + k]. x (B, C, L)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding)))
    kernel = weight.shape[-1]
    out_length = (x.shape[-1] - kernel) // stride + 1
    out = np.stack([np.einsum("bck,ock->bo", x[:, :, o * stride:o * stride + kernel], weight)
                    for o in range(out_length)], axis=-1)
    return out + bias[None, :, None]


# Lengths up to the kernel size take the matmul path (with taps that only read padding left out), and so do
# strided convolutions with fewer outputs than taps (k3, stride 2 at length 4); the rest lax.conv: all must be
# PyTorch's Conv1d.
@pytest.mark.parametrize("length", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("kernel,stride,padding", [(7, 1, 3), (3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 1, 4)])
def test_conv1d_matches_pytorch_definition(kernel, stride, padding, length):
    if length + 2 * padding < kernel:
        pytest.skip("no output position")
    rng = np.random.default_rng(length)
    x = rng.normal(size=(2, 5, length)).astype(np.float32)
    weight = rng.normal(size=(3, 5, kernel)).astype(np.float32)  # PyTorch (C_out, C_in, k)
    bias = rng.normal(size=(3,)).astype(np.float32)
    layer = Conv1d(3, kernel, stride=stride, padding=padding, in_features=5)
    got = layer.apply({"params": {"kernel": np.transpose(weight, (2, 1, 0)), "bias": bias}}, np.transpose(x, (0, 2, 1)))
    np.testing.assert_allclose(np.transpose(got, (0, 2, 1)), torch_conv1d(x, weight, bias, stride, padding),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length, kernel, stride, matmul", [
    (4, 3, 2, True),  # 2 outputs under 3 taps: XLA:CPU's kernel gradient was 7x slower than the matmul's
    (8, 3, 2, False), (3, 3, 1, True), (8, 7, 1, False), (8, 3, 1, False)])
def test_conv1d_takes_the_matmul_path_for_short_inputs_and_few_strided_outputs(length, kernel, stride, matmul):
    layer = Conv1d(4, kernel, stride=stride, padding=kernel // 2)
    x = jnp.ones((2, length, 4))
    params = layer.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(layer.apply(p, x))))(params))
    assert ("conv_general_dilated" not in jaxpr) == matmul


def test_conv1d_rejects_inputs_shorter_than_its_window():
    layer = Conv1d(3, 7, padding=0)
    with pytest.raises(ValueError, match="shorter than the kernel"):
        layer.init(jax.random.key(0), jnp.zeros((1, 4, 2)))


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


@pytest.mark.parametrize("head_dim", [1, 2])
def test_attention_one_head_at_a_time_is_the_batched_attention_and_its_gradients(head_dim):
    """The CPU's head-by-head path computes the same values as all heads in one batched product, forward and
    gradients. Its gradient really loops over the heads (recomputing each head's scores); its forward loops only
    for heads one dimension wide (`FORWARD_BY_HEAD_MAX_DIM`)."""
    q, k, v, cotangent = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(0), 4),
        ((3, 4, 16, head_dim), (3, 4, 12, head_dim), (3, 4, 12, head_dim), (3, 4, 16, head_dim)), strict=True))

    def loss(by_head):
        return lambda q, k, v: jnp.sum(layers.attend(q, k, v, by_head) * cotangent)

    def grad(by_head):
        return jax.grad(loss(by_head), (0, 1, 2))

    np.testing.assert_allclose(layers.attend(q, k, v, True), layers.attend(q, k, v, False), rtol=1e-6, atol=1e-6)
    for got, want in zip(grad(True)(q, k, v), grad(False)(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "scan" in str(jax.make_jaxpr(grad(True))(q, k, v))
    assert "scan" not in str(jax.make_jaxpr(grad(False))(q, k, v))
    forward_loops = "scan" in str(jax.make_jaxpr(loss(True))(q, k, v))
    assert forward_loops == (head_dim <= layers.FORWARD_BY_HEAD_MAX_DIM)


def test_attention_goes_head_by_head_on_the_cpu_only_for_large_score_tensors(monkeypatch):
    # 64 samples of the U-Net's 128-position attention with 8 heads: 32 MiB of scores; 16 samples: 8 MiB.
    assert layers.attention_by_head(64, 8, 128, 128) and not layers.attention_by_head(16, 8, 128, 128)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not layers.attention_by_head(64, 8, 128, 128)


def test_multihead_attention_is_the_same_head_by_head(monkeypatch):
    """The module takes the head-by-head path above its size threshold (its gradient loops over the heads): same
    output and parameter gradients as below it."""
    layer = TorchMultiheadAttention(16, 4)
    query, key = jax.random.normal(jax.random.key(1), (2, 2, 10, 16))
    params = layer.init(jax.random.key(2), query, key, key)

    def run():  # new functions each time: JAX caches traces by function, and the path is chosen when tracing
        out = jax.jit(lambda p: layer.apply(p, query, key, key))(params)
        grad = jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, query, key, key))))
        return out, jax.jit(grad)(params), str(jax.make_jaxpr(grad)(params))

    monkeypatch.setattr(layers, "BY_HEAD_MIN_SCORE_BYTES", float("inf"))
    *want, jaxpr = run()
    assert "scan" not in jaxpr
    monkeypatch.setattr(layers, "BY_HEAD_MIN_SCORE_BYTES", 0)
    *got, jaxpr = run()
    assert "scan" in jaxpr
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)


def _attention_inputs(dtype=jnp.float32):
    shapes = ((3, 4, 16, 2), (3, 4, 12, 2), (3, 4, 12, 2), (3, 4, 16, 2))
    return [jax.random.normal(key, shape).astype(dtype)
            for key, shape in zip(jax.random.split(jax.random.key(3), 4), shapes, strict=True)]


@pytest.mark.parametrize("by_head", [False, True])
def test_narrow_head_gradients_are_the_plain_gradients(by_head):
    """The transposed query-axis products (k's and v's gradients) give the plain autodiff gradients; the forward
    is the same program; the barrier that keeps XLA from folding them back is in the gradient's program."""
    q, k, v, cotangent = _attention_inputs()

    def loss(narrow):
        return lambda q, k, v: jnp.sum(layers.attend(q, k, v, by_head, narrow) * cotangent)

    np.testing.assert_array_equal(layers.attend(q, k, v, by_head, True), layers.attend(q, k, v, by_head, False))
    for got, want in zip(jax.grad(loss(True), (0, 1, 2))(q, k, v), jax.grad(loss(False), (0, 1, 2))(q, k, v),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(loss(True), (0, 1, 2)))(q, k, v))
    assert "optimization_barrier" not in str(jax.make_jaxpr(jax.grad(loss(False), (0, 1, 2)))(q, k, v))


def test_narrow_head_gradients_keep_bfloat16_inputs_bfloat16():
    """With bf16 q, k, v the gradients come back bf16 (a custom VJP must return its inputs' dtypes) and close to
    the float32 gradients of the same values."""
    q, k, v, cotangent = _attention_inputs(jnp.bfloat16)

    def grads(narrow, dtype):
        loss = lambda q, k, v: jnp.sum(layers.attend(q, k, v, False, narrow).astype(jnp.float32) * cotangent)
        return jax.grad(loss, (0, 1, 2))(*(x.astype(dtype) for x in (q, k, v)))

    exact = grads(False, jnp.float32)
    for got, want in zip(grads(True, jnp.bfloat16), exact, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05,
                                   atol=0.05 * float(jnp.abs(want).max()))


def test_bfloat16_attention_takes_its_scores_in_float32():
    """With bf16 q, k, v the scores and softmax are float32 (`_scores`): the output is the float32 attention of the
    same values up to bf16's rounding (RMS 0.0021 of the output's RMS here). Scores rounded to bf16 (0.0062) are
    off by 2^-8 of their size, which the softmax turns into percent-level weight errors where scores are large."""
    q, k, v, _ = _attention_inputs(jnp.bfloat16)
    q = (q.astype(jnp.float32) * 4.0 + 3.0).astype(jnp.bfloat16)  # scores far from 0, where their precision matters
    exact = layers.attend(*(x.astype(jnp.float32) for x in (q, k, v)))
    for by_head, narrow in ((False, False), (True, True)):
        got = layers.attend(q, k, v, by_head, narrow)
        assert got.dtype == jnp.bfloat16
        relative_rms = jnp.sqrt(jnp.mean(jnp.square(got.astype(jnp.float32) - exact)) / jnp.mean(jnp.square(exact)))
        assert relative_rms < 2**-8, (by_head, float(relative_rms))


@pytest.mark.parametrize(("by_head", "narrow"), [(False, False), (True, True)])
def test_attention_values_and_gradients_are_the_softmax_definitions(by_head, narrow):
    """`attend` divides after the product and stops the gradient at the maximum: the values and gradients are
    still those of softmax(q k^T) v written out plainly (scores shifted far from 0, where the shift matters)."""
    q, k, v, cotangent = _attention_inputs()
    q = q * 4.0 + 3.0

    def plain(q, k, v):
        return jax.nn.softmax(q @ k.swapaxes(-1, -2), axis=-1) @ v

    np.testing.assert_allclose(layers.attend(q, k, v, by_head, narrow), plain(q, k, v), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda *a: jnp.sum(layers.attend(*a, by_head, narrow) * cotangent), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cotangent), (0, 1, 2))(q, k, v)
    for got_leaf, want_leaf in zip(got, want, strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-5)


def test_narrow_head_gradients_on_the_cpu_only_up_to_the_width_limit(monkeypatch):
    assert layers.narrow_head_gradients(1) and layers.narrow_head_gradients(layers.NARROW_HEAD_MAX_DIM)
    assert not layers.narrow_head_gradients(layers.NARROW_HEAD_MAX_DIM + 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not layers.narrow_head_gradients(1)


def test_multihead_attention_takes_the_narrow_head_gradients(monkeypatch):
    """Heads of 4 dimensions take the transposed gradient products: the same parameter gradients as without."""
    layer = TorchMultiheadAttention(16, 4)
    query, key = jax.random.normal(jax.random.key(4), (2, 2, 10, 16))
    params = layer.init(jax.random.key(5), query, key, key)

    def run():  # new functions each time: the path is chosen when tracing, and JAX caches traces by function
        loss = lambda p: jnp.sum(jnp.sin(layer.apply(p, query, key, key)))
        return jax.jit(jax.grad(loss))(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    monkeypatch.setattr(layers, "NARROW_HEAD_MAX_DIM", 0)
    want, jaxpr = run()
    assert "optimization_barrier" not in jaxpr
    monkeypatch.setattr(layers, "NARROW_HEAD_MAX_DIM", 8)
    got, jaxpr = run()
    assert "optimization_barrier" in jaxpr
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)


def test_linear_params_are_linear_layers_parameters():
    """Same names, shapes and initial values as `linear`, so checkpoints and seeds carry over."""
    def init(make):
        class Holder(nn.Module):
            @nn.compact
            def __call__(self, x):
                return make()(x)
        return Holder().init(jax.random.key(6), jnp.ones((2, 5)))["params"]

    want = init(lambda: layers.linear(7, 5, name="to_q"))
    got = init(lambda: (lambda x: (lambda kb: x @ kb[0] + kb[1])(layers.LinearParams(7, 5, name="to_q")())))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got_leaf, want_leaf)


@pytest.mark.parametrize(("batch", "composed"), [(1, False), (3, True)])
def test_attention_between_linears_is_the_layers_in_turn(batch, composed):
    """`between_linears` equals the three linears, the attention and the output linear applied in turn, values
    and gradients, on both of its paths: weights multiplied first when the batch has more positions (3 x 6)
    than the block is wide (8), the layers in turn otherwise (1 x 6)."""
    width, embed, out_width = 8, 16, 5
    attention = TorchMultiheadAttention(embed, 4)
    x = jax.random.normal(jax.random.key(7), (batch, 6, width))
    keys = jax.random.split(jax.random.key(8), 9)
    before = tuple((jax.random.normal(keys[2 * i], (width, embed)) / 3,
                    jax.random.normal(keys[2 * i + 1], (embed,))) for i in range(3))
    after = (jax.random.normal(keys[6], (embed, out_width)) / 4, jax.random.normal(keys[7], (out_width,)))
    params = attention.init(keys[8], x @ before[0][0], x @ before[1][0], x @ before[2][0])

    def in_turn(params, x, before, after):
        q, k, v = (x @ w + b for w, b in before)
        return attention.apply(params, q, k, v) @ after[0] + after[1]

    def between(params, x, before, after):
        return attention.apply(params, x, before, after, method=TorchMultiheadAttention.between_linears)

    np.testing.assert_allclose(between(params, x, before, after), in_turn(params, x, before, after),
                               rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(9), (batch, 6, out_width))
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), (0, 1, 2, 3))(params, x, before, after)
             for f in (between, in_turn)]
    # k's bias has no gradient (it shifts each query's scores by a constant): compare on the gradients' scale.
    scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(grads[1]))
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    jaxpr = str(jax.make_jaxpr(between)(params, x, before, after))
    assert ("HIGHEST" in jaxpr) == composed  # the weights' own product runs in full float32


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


def test_mish_and_its_gradient_are_pytorchs_definition_in_float32():
    """`mish` is computed as x n / (n + 2), not as x tanh(softplus(x)): the same function to float32 rounding,
    including where tanh saturates (x >= 20) and far below 0, and so is its gradient."""
    x = np.concatenate([np.linspace(-100, 100, 4001), np.linspace(-6, 6, 2401)]).astype(np.float32)
    exact = x.astype(np.float64)
    softplus = np.logaddexp(exact, 0)
    want = exact * np.tanh(softplus)
    np.testing.assert_allclose(mish(jnp.asarray(x)), want, rtol=2e-6, atol=1e-30)
    # d/dx x tanh(sp(x)) = tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)
    want_grad = np.tanh(softplus) + exact * (1 - np.tanh(softplus) ** 2) / (1 + np.exp(-exact))
    np.testing.assert_allclose(jax.vmap(jax.grad(mish))(jnp.asarray(x)), want_grad, rtol=1e-5, atol=1e-6)
    bf16 = jax.vmap(jax.grad(lambda v: mish(v)))(jnp.asarray(x, jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16 and bool(jnp.isfinite(mish(jnp.asarray(x, jnp.bfloat16))).all())
    assert bool(jnp.isfinite(bf16).all())


def test_pytorch_default_initialisation_bounds():
    """Weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in as PyTorch computes it."""
    from diffusets_jax.models.layers import conv1d, linear

    x = jnp.zeros((1, 8, 6))
    conv = conv1d(64, 6, 7, padding=3, name="c").init(jax.random.key(0), x)["params"]
    tconv = ConvTranspose1d(40, 4, stride=2, padding=1).init(jax.random.key(1), x)["params"]
    dense = linear(300, 6, name="d").init(jax.random.key(2), x)["params"]
    for params, fan_in in ((conv, 6 * 7), (tconv, 40 * 4), (dense, 6)):
        for leaf in (params["kernel"], params["bias"]):
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound
    assert tconv["kernel"].shape == (4, 6, 40)
