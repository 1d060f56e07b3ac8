"""The fused GroupNorm + SiLU: same results, gradients and parameters as `nn.GroupNorm` then `nn.silu`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.group_norm import GroupNormSiLU


def _inputs(shape, offset, spread, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), shape) * spread + offset
    channels = shape[-1]
    params = {
        "scale": 1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 1), (channels,)),
        "bias": 0.2 * jax.random.normal(jax.random.PRNGKey(seed + 2), (channels,)),
    }
    return x, params


def _exact(groups, params, x, weights):
    """Flax's GroupNorm then SiLU in float64: the output and the gradients of sum(output * weights)."""
    norm = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False, dtype=jnp.float64,
                        param_dtype=jnp.float64)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64, weights64 = jnp.asarray(x, jnp.float64), jnp.asarray(weights, jnp.float64)
        apply = lambda p, x: nn.silu(norm.apply({"params": p}, x))  # noqa: E731
        out = apply(params64, x64)
        grads = jax.grad(lambda p, x: jnp.sum(apply(p, x) * weights64), argnums=(0, 1))(params64, x64)
        return jax.tree.map(np.asarray, (out, grads))


def test_parameters_are_those_of_nn_group_norm():
    x = jnp.ones((2, 16, 64))
    ours = GroupNormSiLU(8).init(jax.random.PRNGKey(0), x)
    theirs = nn.GroupNorm(num_groups=8).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == jax.tree.map(lambda a: (a.shape, a.dtype), theirs)
    np.testing.assert_array_equal(ours["params"]["scale"], theirs["params"]["scale"])
    np.testing.assert_array_equal(ours["params"]["bias"], theirs["params"]["bias"])


@pytest.mark.parametrize("shape,groups", [((3, 64, 128), 32), ((2, 40, 64), 8), ((2, 8, 512), 32), ((1, 5, 6), 3)])
@pytest.mark.parametrize("offset,spread", [(0.0, 1.0), (3.0, 0.05)])
def test_forward_and_gradients_match_float64_group_norm_then_silu(shape, groups, offset, spread):
    x, params = _inputs(shape, offset, spread)
    weights = jax.random.normal(jax.random.PRNGKey(9), shape)
    apply = lambda p, x: GroupNormSiLU(groups).apply({"params": p}, x)  # noqa: E731
    out = apply(params, x)
    grad_params, grad_x = jax.grad(lambda p, x: jnp.sum(apply(p, x) * weights), argnums=(0, 1))(params, x)
    exact_out, (exact_params, exact_x) = _exact(groups, params, x, weights)

    # float32 holds x to 6e-8 of its magnitude, so x - mean is off by about that times offset / spread in
    # normalised units: the bound grows with it (Flax's own float32 GroupNorm misses the tight one).
    conditioning = 1.0 + abs(offset) / spread
    np.testing.assert_allclose(out, exact_out, atol=1e-6 * conditioning)
    for name in ("scale", "bias"):
        size = np.abs(exact_params[name]).max()
        np.testing.assert_allclose(grad_params[name], exact_params[name], atol=2e-6 * conditioning * size)
    np.testing.assert_allclose(grad_x, exact_x, atol=2e-6 * conditioning * np.abs(exact_x).max())


def test_statistics_are_two_pass_at_a_large_offset():
    # E[x^2] - E[x]^2 in float32 loses every digit of a variance of 1e-4 at a mean of 100 (an error of
    # order 1 after normalising); two passes keep it to float32's rounding of x itself (8e-6 / 0.01).
    x, params = _inputs((2, 256, 32), 100.0, 0.01)
    out = GroupNormSiLU(4).apply({"params": params}, x)
    exact_out, _ = _exact(4, params, x, jnp.zeros_like(x))
    np.testing.assert_allclose(out, exact_out, atol=3e-3)


def test_bfloat16_compute_keeps_float32_statistics():
    x, params = _inputs((2, 64, 64), 2.0, 0.5)
    out = GroupNormSiLU(8, dtype=jnp.bfloat16).apply({"params": params}, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    exact = GroupNormSiLU(8).apply({"params": params}, x.astype(jnp.bfloat16).astype(jnp.float32))
    # Only the output's rounding to bfloat16 (8 bits of mantissa, half an ulp 2^-8 relative) separates the two.
    # Statistics taken in bfloat16 moved 45 % of the outputs by more (up to 0.047) and passed the older atol 2e-2, rtol 1e-2.
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=1e-6, rtol=2**-7)
    grad = jax.grad(lambda x: jnp.sum(GroupNormSiLU(8, dtype=jnp.bfloat16).apply({"params": params}, x)
                                      .astype(jnp.float32)))(x.astype(jnp.bfloat16))
    assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))


def test_channels_that_do_not_split_into_groups_are_refused():
    with pytest.raises(ValueError, match="do not split into 32 groups"):
        GroupNormSiLU(32).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 48)))
