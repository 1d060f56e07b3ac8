"""The DiffuSETS ECG VAE: (batch, 1024, 12) ECG <-> (batch, 128, 4) latent, channels-last.

Architecture of the published model (reference section 5), a 1-D version of the Stable Diffusion VAE:
residual blocks of GroupNorm -> SiLU -> conv, one single-head self-attention block at the lowest
resolution, stride-2 convs preceded by one zero of padding on the right only, nearest-neighbour
upsampling. Layer names follow the structure (`down_1_res_0`, `mid_attn`, ...);
`diffusets_jax.convert.vae` maps them to the reference's `nn.Sequential` indices.

`dtype` is the computation dtype (e.g. bfloat16 for accelerator training; parameters stay float32):
convolutions and projections run in it, normalisation statistics and the attention softmax in float32,
and `encode` / `decode` return float32. `remat=True` recomputes each residual and attention block's
activations in the backward pass instead of keeping them (less memory, about one more forward of work);
the parameters are the same either way. `conv_algorithm` picks how the convolutions are computed
(`winograd.CONV_ALGORITHMS`): "auto" runs the wide float32 ones of large enough batches on the CPU as
Winograd F(6, 3) / F(6, 2), under half the multiply-adds, within about 1e-5 of the direct convolution (relative
to the output's scale); it too leaves the parameters alone.

Usage::

    vae = VAE()
    mean, logvar = vae.apply(variables, ecg, method=VAE.encode)
    z = VAE.sample_latent(mean, logvar, key)          # scaled latent, what the diffusion model sees
    ecg = vae.apply(variables, z, method=VAE.decode)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusets_jax.models import winograd
from diffusets_jax.models.conv import flax_conv_general_dilated
from diffusets_jax.models.group_norm import GroupNormSiLU
from diffusets_jax.models.layers import Dtype, maybe_remat

# Stable Diffusion's latent scale factor, kept by DiffuSETS: the diffusion model works on latent * LATENT_SCALE.
# A VAE trained from scratch has latents of another spread; the diffusion trainer can measure its own scale
# (`train.scale_by_std`, as latent diffusion's `scale_by_std`) and records it in `generation.json`.
LATENT_SCALE = 0.18215
# The reference clamps the encoder's log-variance to this range before use.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _norm_silu(groups: int, name: str, dtype: Dtype | None = None) -> GroupNormSiLU:
    # Every normalisation of the VAE is followed by SiLU: one fused op (`group_norm.py` says why).
    return GroupNormSiLU(groups, dtype=dtype, name=name)


class SameConv(nn.Module):
    """Stride-1 conv with symmetric zero padding that keeps the length (k3 -> pad 1, k1 -> pad 0).

    `(batch, length, c) -> (batch, length, features)`. Parameters, their initialisation and the result are
    those of `nn.Conv(features, (kernel_size,), padding=((pad, pad),))`; `conv_algorithm` only picks how it
    is computed (`winograd.convolve`).
    """

    features: int
    kernel_size: int
    dtype: Dtype | None = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 named, as nn.Conv's param_dtype: the initialisers' default dtype is float64 under jax_enable_x64.
        kernel = self.param("kernel", nn.linear.default_kernel_init, (self.kernel_size, x.shape[-1], self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pad = (self.kernel_size - 1) // 2
        return winograd.convolve(x, kernel, (pad, pad), self.conv_algorithm) + bias


def _conv(features: int, kernel_size: int, name: str, dtype: Dtype | None = None, conv_algorithm: str = "auto"
          ) -> SameConv:
    return SameConv(features, kernel_size, dtype, conv_algorithm, name=name)


class NearestUpsampleConv(nn.Module):
    """Nearest-neighbour x2 upsampling then a k3 "same" conv, computed at the input length.

    `(batch, length, c) -> (batch, 2 * length, features)`; parameters exactly those of the conv
    (`kernel` `(3, c, features)`, `bias`), so checkpoints map as for `nn.Conv`. With u the upsampled
    input (u[2m] = u[2m+1] = x[m]) the conv's even outputs are w0 x[m-1] + (w1 + w2) x[m] and its odd
    ones (w0 + w1) x[m] + w2 x[m+1]: two 2-tap convs at half the length, 2/3 of the multiply-adds, and
    the upsampled copy is never written.
    """

    features: int
    dtype: Dtype | None = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # nn.Conv's initialisers, so a VAE initialised from scratch starts as before.
        kernel = self.param("kernel", nn.linear.default_kernel_init, (3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        even_taps = jnp.stack([kernel[0], kernel[1] + kernel[2]])
        odd_taps = jnp.stack([kernel[0] + kernel[1], kernel[2]])

        even = winograd.convolve(x, even_taps, (1, 0), self.conv_algorithm)
        odd = winograd.convolve(x, odd_taps, (0, 1), self.conv_algorithm)
        batch, length, features = even.shape
        return jnp.stack([even, odd], axis=2).reshape(batch, 2 * length, features) + bias


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv k3 -> GroupNorm -> SiLU -> Conv k3, plus a 1x1-conv skip if widths differ.

    `(batch, length, c_in) -> (batch, length, features)`.
    """

    features: int
    groups: int = 32
    dtype: Dtype | None = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, algorithm = self.dtype, self.conv_algorithm
        h = _conv(self.features, 3, "conv_1", dt, algorithm)(_norm_silu(self.groups, "norm_1", dt)(x))
        h = _conv(self.features, 3, "conv_2", dt, algorithm)(_norm_silu(self.groups, "norm_2", dt)(h))
        skip = x if x.shape[-1] == self.features else _conv(self.features, 1, "skip", dt)(x)
        return skip.astype(h.dtype) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the length axis with a residual: `x + out_proj(softmax(q k^T / sqrt(c)) v)`.

    q, k, v come from one packed projection (`in_proj`, c -> 3c, in that order) like the reference. The
    reference block also builds a GroupNorm that its forward never applies; it has no counterpart here.
    `(batch, length, c) -> (batch, length, c)`.
    """

    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        q, k, v = jnp.split(nn.Dense(3 * channels, dtype=self.dtype, name="in_proj")(x), 3, axis=-1)
        # Scores and softmax in float32 even for bf16 compute: 512-wide dot products, 128 positions.
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(channels)
        attended = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
        return x.astype(attended.dtype) + nn.Dense(channels, dtype=self.dtype, name="out_proj")(attended)


class VAEEncoder(nn.Module):
    """`(batch, length, in_channels) -> (batch, length / 2**len(widths), 2 * latent_channels)` moments.

    Levels of `num_res_blocks` residual blocks at `widths + (widths[-1],)`, each but the last followed by a
    stride-2 downsampling conv; then res / attention / res, GroupNorm, SiLU, conv to 2 * latent channels and
    a 1x1 conv. Channels [:latent] are the mean, [latent:] the (unclamped) log-variance.
    """

    widths: tuple[int, ...] = (128, 256, 512)
    latent_channels: int = 4
    groups: int = 32
    num_res_blocks: int = 2
    remat: bool = False
    dtype: Dtype | None = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, algorithm = self.dtype, self.conv_algorithm
        res_block = maybe_remat(ResidualBlock, self.remat)
        h = _conv(self.widths[0], 3, "conv_in", dt, algorithm)(x)
        for level, width in enumerate((*self.widths, self.widths[-1])):
            for block in range(self.num_res_blocks):
                h = res_block(width, self.groups, dt, algorithm, name=f"down_{level}_res_{block}")(h)
            if level < len(self.widths):
                # The reference pads one zero on the right only, then convolves k3 s2 without padding.
                h = nn.Conv(width, (3,), strides=(2,), padding=((0, 1),), dtype=dt,
                            conv_general_dilated=flax_conv_general_dilated, name=f"down_{level}_downsample")(h)
        h = res_block(self.widths[-1], self.groups, dt, algorithm, name="mid_res_0")(h)
        h = maybe_remat(SelfAttention, self.remat)(dt, name="mid_attn")(h)
        h = res_block(self.widths[-1], self.groups, dt, algorithm, name="mid_res_1")(h)
        h = _norm_silu(self.groups, "norm_out", dt)(h)
        h = _conv(2 * self.latent_channels, 3, "conv_out", dt, algorithm)(h)
        return _conv(2 * self.latent_channels, 1, "conv_moments", dt)(h).astype(jnp.float32)


class VAEDecoder(nn.Module):
    """`(batch, latent_length, latent_channels)` unscaled latent -> `(batch, latent_length * 2**len(widths), out_channels)`.

    1x1 conv, conv to widths[-1], res / attention / res, then levels of `num_res_blocks + 1` residual blocks
    at `(widths[-1],) + reversed(widths)`, each but the last followed by nearest x2 upsampling and a conv
    (`NearestUpsampleConv`);
    GroupNorm, SiLU, conv to the output channels.
    """

    widths: tuple[int, ...] = (128, 256, 512)
    out_channels: int = 12
    groups: int = 32
    num_res_blocks: int = 2
    remat: bool = False
    dtype: Dtype | None = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        dt, algorithm = self.dtype, self.conv_algorithm
        res_block = maybe_remat(ResidualBlock, self.remat)
        h = _conv(z.shape[-1], 1, "conv_latent", dt)(z)
        h = _conv(self.widths[-1], 3, "conv_in", dt, algorithm)(h)
        h = res_block(self.widths[-1], self.groups, dt, algorithm, name="mid_res_0")(h)
        h = maybe_remat(SelfAttention, self.remat)(dt, name="mid_attn")(h)
        h = res_block(self.widths[-1], self.groups, dt, algorithm, name="mid_res_1")(h)
        level_widths = (self.widths[-1], *reversed(self.widths))
        for level, width in enumerate(level_widths):
            for block in range(self.num_res_blocks + 1):
                h = res_block(width, self.groups, dt, algorithm, name=f"up_{level}_res_{block}")(h)
            if level < len(level_widths) - 1:
                h = NearestUpsampleConv(width, dt, algorithm, name=f"up_{level}_upsample")(h)
        h = _norm_silu(self.groups, "norm_out", dt)(h)
        return _conv(self.out_channels, 3, "conv_out", dt, algorithm)(h).astype(jnp.float32)


def _check_array(value: Any, where: str, what: str) -> None:
    # A list has no .ndim: without this the shape check itself failed with an AttributeError.
    if not hasattr(value, "shape"):
        raise ValueError(f"{where} expects an array of {what} (np.asarray or jnp.asarray), got a Python "
                         f"{type(value).__name__}")


class VAE(nn.Module):
    """The ECG VAE. Defaults are the published model; e.g. `VAE(widths=(32, 64, 64), groups=8)` is a small one.

    `remat`, `dtype` and `conv_algorithm` change how it computes (see the module docstring), never its parameters.

    Parameters live under `params/encoder` and `params/decoder`. Call the parts with
    `vae.apply(variables, x, method=VAE.encode)` / `method=VAE.decode`; `__call__` is the training pass.
    """

    in_channels: int = 12
    latent_channels: int = 4
    widths: tuple[int, ...] = (128, 256, 512)
    groups: int = 32
    num_res_blocks: int = 2
    remat: bool = False
    dtype: Dtype | None = None
    conv_algorithm: str = "auto"

    def setup(self) -> None:
        self.encoder = VAEEncoder(self.widths, self.latent_channels, self.groups, self.num_res_blocks, self.remat,
                                  self.dtype, self.conv_algorithm)
        self.decoder = VAEDecoder(self.widths, self.in_channels, self.groups, self.num_res_blocks, self.remat,
                                  self.dtype, self.conv_algorithm)

    @property
    def downsampling(self) -> int:
        """Length ratio ECG / latent (8 for three levels: 1024 -> 128)."""
        return 2 ** len(self.widths)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ECG `(batch, 1024, in_channels)` (mV, standard lead order) -> `(mean, logvar)`, each `(batch, 128, latent_channels)`.

        The log-variance is clamped to [-30, 20] as in the reference.
        """
        _check_array(x, "VAE.encode", "ECGs")
        if x.ndim != 3 or x.shape[-1] != self.in_channels or x.shape[1] % self.downsampling:
            raise ValueError(
                f"VAE.encode expects ECGs shaped (batch, length, {self.in_channels}) with length a multiple of "
                f"{self.downsampling}, got {x.shape}"
            )
        moments = self.encoder(x)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array, latent_scale: float = LATENT_SCALE
                      ) -> jax.Array:
        """Reparameterised draw, scaled for the diffusion model: `(mean + exp(logvar / 2) * eps) * latent_scale`.

        `mean`, `logvar`: `(batch, 128, latent_channels)`; returns the same shape.
        """
        eps = jax.random.normal(key, mean.shape, mean.dtype)
        return (mean + jnp.exp(0.5 * logvar) * eps) * latent_scale

    def decode(self, z: jax.Array, latent_scale: float = LATENT_SCALE) -> jax.Array:
        """Scaled latent `(batch, 128, latent_channels)` -> ECG `(batch, 1024, in_channels)` (mV, standard order).

        `latent_scale` is the factor the latent was scaled by (`sample_latent`'s): the published 0.18215, or
        the one a diffusion run measured (the model directory's `diffusion.latent_scale`).
        """
        _check_array(z, "VAE.decode", "latents")
        if z.ndim != 3 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"VAE.decode expects latents shaped (batch, length, {self.latent_channels}), got {z.shape}")
        return self.decoder(z / latent_scale)

    def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Training pass: ECG `(batch, 1024, in_channels)` -> `(reconstruction, mean, logvar)`.

        reconstruction `(batch, 1024, in_channels)`; mean and clamped logvar `(batch, 128, latent_channels)`.
        """
        mean, logvar = self.encode(x)
        return self.decode(self.sample_latent(mean, logvar, key)), mean, logvar
