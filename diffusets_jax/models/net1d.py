"""Net1D: the 1-D ResNeXt-style ECG encoder of the DiffuSETS CLIP model, channels-last.

A port of Hong et al.'s Net1D as the reference builds it (reference section 8): a stride-2 "same" conv
stem, then stages of bottleneck blocks (BN -> Swish -> dropout -> conv 1x1, BN -> Swish -> dropout ->
grouped conv k, BN -> Swish -> dropout -> conv 1x1, squeeze-excitation), whose shortcut is max-pooled
when the block downsamples and zero-padded on the channel axis when it widens; mean pooling at the end.
`(batch, 1024, 12) -> (batch, 1024)` features for the published configuration; with `num_classes > 0` a linear
head on those features gives `(batch, num_classes)` logits, as Hong et al.'s Net1D does (the downstream classifier).

BatchNorm follows PyTorch exactly (`BatchNorm1d`): batch statistics in training, running statistics in
inference, running variance updated with the unbiased batch variance, momentum 0.1. Use
`train=True` with `mutable=['batch_stats']` and a `'dropout'` rng.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusets_jax.models.conv import flax_conv_general_dilated

BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch


def same_padding(length: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """Zero padding (left, right) of the reference's "same" convs: output length ceil(length / stride), left = pad // 2."""
    out_length = -(-length // stride)
    pad = max(0, (out_length - 1) * stride + kernel_size - length)
    return pad // 2, pad - pad // 2


class BatchNorm1d(nn.Module):
    """PyTorch-exact BatchNorm over all axes but the last. `(..., channels) -> (..., channels)`.

    Params `scale`, `bias`; `batch_stats` collection `mean`, `var`. In training the batch is normalised with
    its biased variance and the running variance takes the unbiased one, as `torch.nn.BatchNorm1d` does.
    Under `jax.jit` with a sharded batch the means are global, i.e. synchronised BatchNorm.
    """

    momentum: float = BATCH_NORM_MOMENTUM
    epsilon: float = BATCH_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        # float32 named: the initialisers' default dtype is float64 under jax_enable_x64.
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((channels,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((channels,), jnp.float32))
        # Statistics and normalisation in float32 whatever the computation dtype: a bf16 mean would shift
        # every activation by its rounding error.
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)  # two-pass, as PyTorch
            if not self.is_initializing():
                count = math.prod(x.shape[:-1])
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * jax.lax.stop_gradient(mean)
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * jax.lax.stop_gradient(unbiased)
        else:
            mean, var = running_mean.value, running_var.value
        return ((xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


def _same_conv(x: jax.Array, features: int, kernel_size: int, stride: int, groups: int, name: str) -> jax.Array:
    padding = same_padding(x.shape[1], kernel_size, stride)
    return nn.Conv(features, (kernel_size,), strides=(stride,), padding=(padding,), feature_group_count=groups,
                   conv_general_dilated=flax_conv_general_dilated, name=name)(x)


def _max_pool_same(x: jax.Array, kernel_size: int) -> jax.Array:
    """The reference's shortcut pooling: zero "same" padding computed for stride 1, then max-pool with stride = kernel.

    (Zeros, not -inf: a padded position can win over negative activations, exactly as in the reference.)
    """
    left, right = same_padding(x.shape[1], kernel_size, 1)
    x = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    return nn.max_pool(x, (kernel_size,), strides=(kernel_size,), padding="VALID")


class Net1DBlock(nn.Module):
    """One bottleneck block. `(batch, length, c_in) -> (batch, ceil(length / stride), features)`."""

    features: int
    kernel_size: int
    stride: int
    groups: int
    downsample: bool
    is_first_block: bool = False
    ratio: float = 1.0
    se_ratio: int = 2
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        middle = int(self.features * self.ratio)
        stride = self.stride if self.downsample else 1

        def norm_act_drop(h: jax.Array, name: str) -> jax.Array:
            h = nn.swish(BatchNorm1d(name=name)(h, train))
            return nn.Dropout(self.dropout_rate, deterministic=not train)(h)

        # The reference builds bn1 for the very first block too but skips it there (the stem already normalised).
        out = x if self.is_first_block else norm_act_drop(x, "bn1")
        out = _same_conv(out, middle, 1, 1, 1, "conv1")
        out = _same_conv(norm_act_drop(out, "bn2"), middle, self.kernel_size, stride, self.groups, "conv2")
        out = _same_conv(norm_act_drop(out, "bn3"), self.features, 1, 1, 1, "conv3")

        # Squeeze-excitation: channel gates from the length-averaged activations.
        gate = nn.Dense(self.features // self.se_ratio, name="se_fc1")(jnp.mean(out, axis=1))
        gate = jax.nn.sigmoid(nn.Dense(self.features, name="se_fc2")(nn.swish(gate)))
        out = out * gate[:, None, :]

        shortcut = _max_pool_same(x, stride) if self.downsample else x
        if self.features != x.shape[-1]:
            extra = self.features - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return out + shortcut


class Net1D(nn.Module):
    """The CLIP ECG encoder. Defaults are the published configuration (22.0 M parameters with the CLIP heads).

    `__call__(ecg (batch, 1024, in_channels), train) -> (batch, filters[-1])` mean-pooled features, or with
    `num_classes > 0` `(batch, num_classes)` logits of a linear head (`dense`) on them.
    Stage i has `blocks_per_stage[i]` blocks of width `filters[i]`, grouped convs of group width
    `group_width`, and downsamples by `stride` in its first block; the stem downsamples by `stem_stride`.
    """

    in_channels: int = 12
    base_filters: int = 64
    filters: tuple[int, ...] = (64, 128, 128, 256, 256, 512, 1024)
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 3, 3, 4, 4)
    kernel_size: int = 16
    stride: int = 2
    stem_stride: int = 2
    group_width: int = 16
    ratio: float = 1.0
    se_ratio: int = 2
    dropout_rate: float = 0.5
    num_classes: int = 0  # 0: the pooled features (the CLIP tower); > 0: logits of a linear head

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.filters) != len(self.blocks_per_stage):
            raise ValueError(f"Net1D: filters {self.filters} and blocks_per_stage {self.blocks_per_stage} differ in length")
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"Net1D expects ECGs shaped (batch, length, {self.in_channels}), got {x.shape}")
        self._check_widths()
        out = _same_conv(x, self.base_filters, self.kernel_size, self.stem_stride, 1, "first_conv")
        out = nn.swish(BatchNorm1d(name="first_bn")(out, train))
        for stage, (features, blocks) in enumerate(zip(self.filters, self.blocks_per_stage, strict=True)):
            for block in range(blocks):
                out = Net1DBlock(
                    features=features, kernel_size=self.kernel_size, stride=self.stride,
                    groups=features // self.group_width, downsample=block == 0,
                    is_first_block=stage == 0 and block == 0, ratio=self.ratio, se_ratio=self.se_ratio,
                    dropout_rate=self.dropout_rate, name=f"stage_{stage}_block_{block}",
                )(out, train)
        features = jnp.mean(out, axis=1)
        return nn.Dense(self.num_classes, name="dense")(features) if self.num_classes > 0 else features

    def _check_widths(self) -> None:
        """The widths every block can be built with, said in one line (they failed deep in JAX or Flax)."""
        widths = (self.base_filters, *self.filters)
        if any(after < before for before, after in zip(widths[:-1], widths[1:], strict=True)):
            raise ValueError(f"Net1D config: base_filters {self.base_filters} then filters {self.filters} must not "
                             "decrease (each block zero-pads its shortcut up to its own width)")
        for features in self.filters:
            groups, middle = features // self.group_width, int(features * self.ratio)
            if groups < 1 or middle % groups:
                raise ValueError(f"Net1D config: filters {features} with group_width {self.group_width} make "
                                 f"{groups} convolution groups, which must be at least 1 and divide the block's "
                                 f"{middle} channels (e.g. a group_width that divides every filter)")
