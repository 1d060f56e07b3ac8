"""The DiffuSETS noise-prediction U-Net, channels-last (reference spec section 6).

`UNet()(x_t, t, text_embedding, sex, age, heart_rate) -> eps`, latents `(batch, 128, 4)`. Six
down-sampling blocks, a bottleneck and six up-sampling blocks (7 levels): every block adds its own time
embedding, then conv -> GroupNorm -> Mish -> 1x1 conv -> self-attention over length -> cross-attention to
the condition [text, sex, age, heart rate] -> LayerNorm -> conv -> GroupNorm -> Mish, plus a 1x1 residual.

Variables:
- `params`: everything trainable (13,017,436 for the defaults; the reference's 13,345,792 also counts
  each block's `block.down` conv, which it builds but never calls, so it is not part of this model).
- `constants`: the 13 frozen sinusoidal time tables `(1000, 64)`, one per block as in the checkpoints.
  Pass them to `apply` beside `params`; keep them out of the optimizer.

The cross-attention attends from every position to `length` copies of one condition vector, so its
softmax is uniform and its output is a per-sample bias; `apply` computes it that way (set
`exact_cross_attention=True` for the literal computation). Its query/key weights are still parameters,
so checkpoints round-trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from diffusets_jax.models.layers import (
    ConvTranspose1d,
    Dtype,
    LinearParams,
    TorchMultiheadAttention,
    conv1d,
    group_norm,
    layer_norm,
    linear,
    maybe_remat,
    mish,
)

Array = jax.Array


def sinusoidal_time_table(num_timesteps: int = 1000, dim: int = 64) -> np.ndarray:
    """The reference's frozen time table `(num_timesteps, dim)`, float32.

    Row i = [sin((i + 1) f_j), cos((i + 1) f_j)] for f_j = exp(-j * 10 / (dim / 2 - 1)), j < dim / 2
    (10 / 31 for dim 64). Computed in float64, so it can differ from a published checkpoint's float32 table
    in the last bits; converting a checkpoint copies its stored table instead.
    """
    half = dim // 2
    frequencies = np.exp(-np.arange(half) * (10.0 / (half - 1)))
    angles = (np.arange(num_timesteps, dtype=np.float64)[:, None] + 1.0) * frequencies[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class TimeEmbedding(nn.Module):
    """Frozen table row t -> Linear(dim -> hidden) -> Mish -> Linear(hidden -> features): `(batch,) -> (batch, features)`."""

    features: int
    num_timesteps: int = 1000
    table_dim: int = 64
    hidden_dim: int = 128
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        table = self.variable(
            "constants", "embeddings", lambda: jnp.asarray(sinusoidal_time_table(self.num_timesteps, self.table_dim))
        )
        # The table is frozen in the reference too; stop_gradient keeps it so even if a caller differentiates
        # with respect to the constants collection.
        rows = jax.lax.stop_gradient(table.value)[t]
        h = linear(self.hidden_dim, self.table_dim, name="fc1", dtype=self.dtype, param_dtype=self.param_dtype)(rows)
        return linear(self.features, self.hidden_dim, name="fc2", dtype=self.dtype, param_dtype=self.param_dtype)(
            mish(h)
        )


class SelfAttention(nn.Module):
    """s + to_out(MHA(to_q(n), to_k(n), to_v(n))), n = LayerNorm(s): `(batch, length, C) -> same`.

    Computed by `TorchMultiheadAttention.between_linears`, which multiplies each linear into the attention's
    projection first when the batch has more positions than C (same parameters, same values to rounding);
    `exact_projections=True` applies them in turn, as the published module does."""

    attention_dim: int
    num_heads: int
    exact_projections: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array) -> Array:
        c, h = s.shape[-1], self.attention_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = layer_norm(name="norm", **kw)(s)
        before = tuple(LinearParams(h, c, name=name, param_dtype=self.param_dtype)()
                       for name in ("to_q", "to_k", "to_v"))
        after = LinearParams(c, h, name="to_out", param_dtype=self.param_dtype)()
        attention = TorchMultiheadAttention(h, self.num_heads, name="attention", **kw)
        return s + attention.between_linears(n, before, after, compose=not self.exact_projections)


class CrossAttention(nn.Module):
    """s + to_out(MHA(q = to_q(LayerNorm(s)), k, v from LayerNorm(value_combiner(cond)) repeated along length)).

    `s` `(batch, length, C)`, `cond` `(batch, cond_dim)` -> `(batch, length, C)`.
    """

    attention_dim: int
    num_heads: int
    exact: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, s: Array, cond: Array) -> Array:
        c, h = s.shape[-1], self.attention_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        to_q, to_k, to_v = (linear(h, c, name=n, **kw) for n in ("to_q", "to_k", "to_v"))
        attention = TorchMultiheadAttention(h, self.num_heads, name="attention", **kw)
        to_out = linear(c, h, name="to_out", **kw)
        # The condition mixes unit-norm text with raw age and heart rate (tens to ~200): project it in
        # float32 whatever the computation dtype (bf16 keeps 8 bits; one small matmul per block).
        combined = linear(
            c, cond.shape[-1], name="value_combiner", dtype=jnp.float32, param_dtype=self.param_dtype
        )(cond.astype(jnp.float32))
        context = layer_norm(name="condition_normalization", **kw)(combined)
        if self.exact or self.is_initializing():  # initialising always creates every parameter
            query = to_q(layer_norm(name="normalization", **kw)(s))
            context_seq = jnp.broadcast_to(context[:, None, :], s.shape[:2] + (c,))
            return s + to_out(attention(query, to_k(context_seq), to_v(context_seq)))
        # Every key equals every other key: uniform softmax, the output is one vector per sample.
        return s + to_out(attention.identical_keys(to_v(context)))[:, None, :]


class ResidualAttentionBlock(nn.Module):
    """One U-Net block, C_in -> C_out at unchanged length: `(batch, length, C_in) -> (batch, length, C_out)`.

    x0 = x; x += TE(t); s = conv_k -> GroupNorm -> Mish -> conv1x1 (width (C_in + C_out) // 2);
    s = SelfAttn(s); s = CrossAttn(s, cond); s = LayerNorm(s); o = conv_k -> GroupNorm -> Mish;
    return o + conv1x1(x0)   (the residual takes x before the time embedding, as the reference does).
    """

    features: int
    attention_dim: int
    num_heads: int
    kernel_size: int = 7
    exact_cross_attention: bool = False
    exact_projections: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, t: Array, cond: Array) -> Array:
        c_in, c_out = x.shape[-1], self.features
        c_mid = (c_in + c_out) // 2
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pad = self.kernel_size // 2
        h = x + TimeEmbedding(c_in, name="time_emb", **kw)(t)[:, None, :]
        s = conv1d(c_mid, c_in, self.kernel_size, padding=pad, name="pre_shortcut_convs", **kw)(h)
        s = mish(group_norm(name="layer_norm1", **kw)(s))
        s = conv1d(c_mid, c_mid, 1, name="shortcut_convs", **kw)(s)
        s = SelfAttention(
            self.attention_dim, self.num_heads, self.exact_projections, name="self_attention", **kw
        )(s)
        s = CrossAttention(
            self.attention_dim, self.num_heads, exact=self.exact_cross_attention, name="cross_attention", **kw
        )(s, cond)
        s = layer_norm(name="attention_norm", **kw)(s)
        o = conv1d(c_out, c_mid, self.kernel_size, padding=pad, name="post_shortcut_convs", **kw)(s)
        o = mish(group_norm(name="layer_norm2", **kw)(o))
        residual = x if c_in == c_out else conv1d(c_out, c_in, 1, name="res_conv", **kw)(x)
        return o + residual


class Bottleneck(nn.Module):
    """The deepest level, C -> C: x + TE -> conv3 -> GroupNorm -> Mish -> conv3 -> SelfAttn -> CrossAttn ->
    LayerNorm -> conv3 -> GroupNorm -> Mish, plus x. `(batch, length, C) -> same`."""

    attention_dim: int
    num_heads: int
    exact_cross_attention: bool = False
    exact_projections: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, t: Array, cond: Array) -> Array:
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x + TimeEmbedding(c, name="time_emb", **kw)(t)[:, None, :]
        h = conv1d(c, c, 3, padding=1, name="bottleneck_conv1", **kw)(h)
        h = mish(group_norm(name="bottleneck_layer_norm1", **kw)(h))
        h = conv1d(c, c, 3, padding=1, name="bottleneck_conv1_2", **kw)(h)
        h = SelfAttention(
            self.attention_dim, self.num_heads, self.exact_projections, name="self_attention", **kw
        )(h)
        h = CrossAttention(
            self.attention_dim, self.num_heads, exact=self.exact_cross_attention, name="cross_attention", **kw
        )(h, cond)
        h = layer_norm(name="attention_norm", **kw)(h)
        h = conv1d(c, c, 3, padding=1, name="bottleneck_conv2", **kw)(h)
        h = mish(group_norm(name="bottleneck_layer_norm2", **kw)(h))
        return h + x


class DownLevel(nn.Module):
    """Block at full length, then Conv(k3, s2, p1): returns (downsampled `(batch, length/2, C_out)`, skip)."""

    features: int
    attention_dim: int
    num_heads: int
    kernel_size: int
    exact_cross_attention: bool = False
    exact_projections: bool = False
    remat: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, t: Array, cond: Array) -> tuple[Array, Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skip = maybe_remat(ResidualAttentionBlock, self.remat)(
            self.features, self.attention_dim, self.num_heads, self.kernel_size, self.exact_cross_attention,
            self.exact_projections, name="block", **kw,
        )(x, t, cond)
        down = conv1d(self.features, self.features, 3, stride=2, padding=1, name="down", **kw)(skip)
        return down, skip


class UpLevel(nn.Module):
    """ConvTranspose(k4, s2, p1) doubling the length, concat([upsampled, skip]) on channels, then the block."""

    features: int
    attention_dim: int
    num_heads: int
    kernel_size: int
    exact_cross_attention: bool = False
    exact_projections: bool = False
    remat: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, skip: Array | None, t: Array, cond: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ConvTranspose1d(x.shape[-1], 4, stride=2, padding=1, name="up", **kw)(x)
        if skip is not None:
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
        return maybe_remat(ResidualAttentionBlock, self.remat)(
            self.features, self.attention_dim, self.num_heads, self.kernel_size, self.exact_cross_attention,
            self.exact_projections, name="block", **kw,
        )(h, t, cond)


class UNet(nn.Module):
    """DiffuSETS epsilon-prediction U-Net; the defaults are the published model (7 levels).

    Attributes:
      latent_channels: channels of the latent (4).
      channels: output width of each down block; the levels are these blocks plus the bottleneck (7 for
        the default 6 widths). Up block j mirrors them: up0 maps channels[-1] -> channels[-2] with no
        skip; up j >= 1 takes 2 * channels[-1-j] (upsampled + skip) to channels[-2-j] (the last to
        latent_channels).
      down_attention_dims, up_attention_dims: attention width H of each down / up block (reference: twice
        the block's input width); bottleneck_attention_dim: the bottleneck's.
      num_heads, bottleneck_heads: attention heads in the blocks (8) and in the bottleneck (4).
      kernel_size: the blocks' convolution kernel (7).
      text_dim: text embedding width (1536 for ada-002, 384 for MiniLM); the condition is
        [text, sex, age, heart rate], text_dim + 3 values in raw units.
      exact_cross_attention: compute the cross-attention literally instead of as its per-sample bias.
      exact_projections: apply the self-attention's linears and the attention's projections in turn instead
        of multiplying their weights first (`TorchMultiheadAttention.between_linears`).
      remat: recompute each block's activations in the backward pass instead of keeping them (less
        memory for about one more forward of work); the parameters are the same either way.
      dtype: computation dtype (e.g. jnp.bfloat16); param_dtype: parameter dtype (float32).
    The latent length must be divisible by 2 ** len(channels) (128 by default: 64).
    """

    latent_channels: int = 4
    channels: Sequence[int] = (8, 16, 32, 64, 128, 256)
    down_attention_dims: Sequence[int] = (8, 16, 32, 64, 128, 256)
    bottleneck_attention_dim: int = 32
    up_attention_dims: Sequence[int] = (512, 512, 256, 128, 64, 32)
    num_heads: int = 8
    bottleneck_heads: int = 4
    kernel_size: int = 7
    text_dim: int = 1536
    exact_cross_attention: bool = False
    exact_projections: bool = False
    remat: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def num_levels(self) -> int:
        """Down blocks plus the bottleneck (7 for the published model)."""
        return len(self.channels) + 1

    @nn.compact
    def __call__(
        self, x_t: Array, t: Array, text_embedding: Array, sex: Array, age: Array, heart_rate: Array
    ) -> Array:
        """Predict the noise in `x_t`.

        Args:
          x_t: noisy latents `(batch, 128, 4)`.
          t: integer timesteps `(batch,)` in [0, num_timesteps); out-of-range values are clamped by the
            table lookup, so validate them upstream.
          text_embedding: `(batch, text_dim)`.
          sex, age, heart_rate: `(batch,)` in the reference's raw units (sex 1 = male, years, bpm).
        Returns:
          eps `(batch, 128, 4)`, float32 whatever the computation dtype.
        """
        self._check_inputs(x_t, t, text_embedding, sex, age, heart_rate)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cond = jnp.concatenate(
            [text_embedding, sex[:, None], age[:, None], heart_rate[:, None]], axis=-1
        ).astype(jnp.float32)
        h = x_t.astype(self.dtype or x_t.dtype)
        skips = []
        for i, (features, attention_dim) in enumerate(zip(self.channels, self.down_attention_dims, strict=True)):
            h, skip = DownLevel(
                features, attention_dim, self.num_heads, self.kernel_size, self.exact_cross_attention,
                self.exact_projections, self.remat, name=f"downsampling_blocks_{i}", **kw,
            )(h, t, cond)
            skips.append(skip)
        skips.pop()  # the deepest level's pre-downsampling output is not used as a skip
        h = maybe_remat(Bottleneck, self.remat)(
            self.bottleneck_attention_dim, self.bottleneck_heads, self.exact_cross_attention,
            self.exact_projections, name="bottleneck", **kw,
        )(h, t, cond)
        up_features = list(self.channels[-2::-1]) + [self.latent_channels]
        for j, (features, attention_dim) in enumerate(zip(up_features, self.up_attention_dims, strict=True)):
            h = UpLevel(
                features, attention_dim, self.num_heads, self.kernel_size, self.exact_cross_attention,
                self.exact_projections, self.remat, name=f"upsampling_blocks_{j}", **kw,
            )(h, skips.pop() if j > 0 else None, t, cond)
        c = self.latent_channels
        h = mish(conv1d(c, c, 3, padding=1, name="output_conv_0", **kw)(h))
        return conv1d(c, c, 1, name="output_conv_2", **kw)(h).astype(jnp.float32)

    def _check_inputs(self, x_t: Array, t: Array, text_embedding: Array, sex: Array, age: Array,
                      heart_rate: Array) -> None:
        inputs = {"x_t": x_t, "t": t, "text_embedding": text_embedding, "sex": sex, "age": age, "heart_rate": heart_rate}
        for name, value in inputs.items():
            if not hasattr(value, "shape"):
                raise ValueError(f"UNet: {name} is a Python {type(value).__name__}; pass an array "
                                 "(jnp.asarray or np.asarray), shaped as the docstring says")
        if len(self.down_attention_dims) != len(self.channels) or len(self.up_attention_dims) != len(self.channels):
            raise ValueError(
                f"UNet config: channels has {len(self.channels)} levels but down_attention_dims has "
                f"{len(self.down_attention_dims)} and up_attention_dims {len(self.up_attention_dims)}; give one "
                "attention width per down and per up block"
            )
        if self.kernel_size % 2 == 0:  # padded by kernel_size // 2 on each side, an even kernel adds a sample
            raise ValueError(f"UNet config: kernel_size must be odd (its convolutions keep the length), got "
                             f"{self.kernel_size}")
        if x_t.ndim != 3 or x_t.shape[-1] != self.latent_channels:
            raise ValueError(
                f"UNet: x_t has shape {x_t.shape}, expected (batch, length, {self.latent_channels}) channels-last; "
                "transpose PyTorch-layout (batch, channels, length) latents first"
            )
        factor = 2 ** len(self.channels)
        if x_t.shape[1] % factor:
            raise ValueError(f"UNet: latent length {x_t.shape[1]} must be divisible by {factor} (2 ** down levels)")
        # The per-sample inputs are checked here, while tracing, so that a missing or extra axis is one sentence
        # naming the argument instead of an indexing or concatenation error deep inside the network.
        batch = x_t.shape[0]
        if np.ndim(text_embedding) != 2 or np.shape(text_embedding)[0] != batch:
            raise ValueError(f"UNet: text_embedding has shape {np.shape(text_embedding)}, expected (batch, text_dim) = "
                             f"({batch}, {self.text_dim}), one row per latent of x_t")
        if text_embedding.shape[-1] != self.text_dim:
            raise ValueError(
                f"UNet: text_embedding has width {text_embedding.shape[-1]} but the model takes text_dim="
                f"{self.text_dim}; use the matching text encoder or build UNet(text_dim=...)"
            )
        for name, value in (("t", t), ("sex", sex), ("age", age), ("heart_rate", heart_rate)):
            if np.shape(value) != (batch,):
                raise ValueError(f"UNet: {name} has shape {np.shape(value)}, expected (batch,) = ({batch},), one value "
                                 "per latent of x_t (jnp.full(batch, value) repeats one)")
        if not jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
            raise ValueError(f"UNet: t has dtype {jnp.asarray(t).dtype}, expected integer timesteps (batch,) in "
                             "[0, num_timesteps); e.g. jnp.asarray(t, jnp.int32)")


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
