"""GroupNorm followed by SiLU, as one op with a hand-written gradient: the VAE's only normalisation.

`silu(GroupNorm(groups, eps)(x))` on channels-last `(batch, length, channels)`, exactly what PyTorch's
`F.silu(nn.GroupNorm(groups, C)(x))` computes (two-pass variance, eps inside the square root), with
`nn.GroupNorm`'s parameters (`scale` ones, `bias` zeros), so checkpoints and conversion are unchanged.

Why not `nn.GroupNorm` and autodiff. `nn.GroupNorm` reduces a `(batch, length, groups, channels / groups)`
view over the length and the group's channels, which XLA:CPU does slowly when a group holds few channels
(4 at the VAE's 128). Here every reduction is over the length axis first, one vectorised sum per channel
into `(batch, channels)`, and only those small sums are folded into groups. The backward pass is the
textbook one (two per-group sums, one elementwise pass) and keeps only the input and the per-group
statistics: the normalised and activated tensors are recomputed where they are needed instead of stored.
`benchmarks/vae_ceiling.py` times the op's gradient both ways at the VAE's activation shapes.

Statistics and the backward pass are float32 whatever the input's dtype (bf16 compute keeps exact
statistics); the output has the module's `dtype`.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusets_jax.models.layers import Dtype

GROUP_NORM_EPS = 1e-5


def _group_sums(per_channel: jax.Array, groups: int) -> jax.Array:
    """`(batch, channels)` -> `(batch, groups)`: sums over each group's channels."""
    batch, channels = per_channel.shape
    return per_channel.reshape(batch, groups, channels // groups).sum(axis=2)


def _per_channel(per_group: jax.Array, channels: int) -> jax.Array:
    """`(batch, groups)` -> `(batch, 1, channels)`, each group's value repeated over its channels."""
    return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)[:, None, :]


def _statistics(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-group mean and 1 / sqrt(var + eps), each `(batch, groups)`; two passes, as PyTorch."""
    _, length, channels = x.shape
    count = length * (channels // groups)
    mean = _group_sums(x.sum(axis=1), groups) / count
    centred = x - _per_channel(mean, channels)
    var = _group_sums(jnp.square(centred).sum(axis=1), groups) / count
    return mean, jax.lax.rsqrt(var + eps)


def _normalised(x, mean, inv_std):
    channels = x.shape[-1]
    return (x - _per_channel(mean, channels)) * _per_channel(inv_std, channels)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_silu(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float = GROUP_NORM_EPS
                    ) -> jax.Array:
    """`silu(group_norm(x) * scale + bias)`; x `(batch, length, channels)` float32, scale and bias `(channels,)`."""
    return _forward(x, scale, bias, groups, eps)[0]


def _forward(x, scale, bias, groups, eps):
    mean, inv_std = _statistics(x, groups, eps)
    return jax.nn.silu(_normalised(x, mean, inv_std) * scale + bias), (x, scale, bias, mean, inv_std)


def _backward(groups, eps, residuals, grad_out):
    # The barrier keeps XLA from merging this recomputation with the forward pass's (CSE), which would
    # store the normalised and activated tensors after all.
    x, scale, bias, mean, inv_std = jax.lax.optimization_barrier(residuals)
    _, length, channels = x.shape
    count = length * (channels // groups)
    x_hat = _normalised(x, mean, inv_std)
    y = x_hat * scale + bias
    sigmoid = jax.nn.sigmoid(y)
    grad_y = grad_out * sigmoid * (1 + y * (1 - sigmoid))  # silu'(y) = s + y s (1 - s)
    grad_bias = grad_y.sum(axis=(0, 1))
    grad_scale = (grad_y * x_hat).sum(axis=(0, 1))
    grad_x_hat = grad_y * scale
    # d x = inv_std (g - mean_group(g) - x_hat mean_group(g x_hat)), with g the gradient at x_hat.
    mean_grad = _group_sums(grad_x_hat.sum(axis=1), groups) / count
    mean_grad_x_hat = _group_sums((grad_x_hat * x_hat).sum(axis=1), groups) / count
    grad_x = _per_channel(inv_std, channels) * (
        grad_x_hat - _per_channel(mean_grad, channels) - x_hat * _per_channel(mean_grad_x_hat, channels)
    )
    return grad_x, grad_scale, grad_bias


group_norm_silu.defvjp(_forward, _backward)


class GroupNormSiLU(nn.Module):
    """`silu(nn.GroupNorm(groups, epsilon=1e-5)(x))` with `nn.GroupNorm`'s parameters; `(batch, length, c) -> same`.

    The input is taken to float32 for the statistics and the gradient; the result has `dtype` (by default
    that of the input promoted with the float32 parameters).
    """

    groups: int = 32
    epsilon: float = GROUP_NORM_EPS
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.groups:
            raise ValueError(f"GroupNormSiLU: {channels} channels do not split into {self.groups} groups")
        # float32 named: the initialisers' default dtype is float64 under jax_enable_x64.
        scale = self.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32)
        out_dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, scale.dtype)
        out = group_norm_silu(x.astype(jnp.float32), scale, bias, self.groups, self.epsilon)
        return out.astype(out_dtype)
