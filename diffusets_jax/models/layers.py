"""PyTorch-compatible building blocks, channels-last: `(batch, length, channels)`.

Each layer computes what its PyTorch namesake computes and initialises its parameters the way PyTorch
does, so a model trained from scratch here starts from the same distribution as the reference, and a
converted checkpoint (see `diffusets_jax.convert`) runs unchanged:

- `linear` / `conv1d`: `nn.Linear` / `nn.Conv1d` (kaiming-uniform(a=sqrt 5) weights, uniform biases).
- `ConvTranspose1d`: `nn.ConvTranspose1d` including its padding arithmetic.
- Convolutions over short inputs (length <= kernel size, e.g. the U-Net's deepest levels: lengths 2-4
  under a kernel of 7) run as one matrix product over the stacked taps (`conv_as_matmul`): XLA:CPU's
  convolution is 8-15x slower there than a matmul of the same arithmetic. So do strided ones with fewer
  outputs than taps (the U-Net's last downsampling, 4 -> 2 positions under a kernel of 3): XLA:CPU ran that
  convolution's gradient in 10.7 ms against 1.6 ms as a matmul (batch 64, 256 channels, 2026-12-04; from 8
  positions up the two were level). The published U-Net's gradient with respect to its input at batch 16,
  what posterior sampling computes at every step, went from 89-91 to 85-86 ms (two alternated runs); its
  train step at batch 64 did not move beyond noise.
- `group_norm` / `layer_norm`: `nn.GroupNorm` / `nn.LayerNorm` (eps 1e-5, exact two-pass variance).
- `TorchMultiheadAttention`: `nn.MultiheadAttention(batch_first=True)` with its packed q/k/v projection; on
  the CPU, attention whose scores would fill `BY_HEAD_MIN_SCORE_BYTES` or more computes its gradient one
  head at a time (and its forward pass too for heads one dimension wide, `FORWARD_BY_HEAD_MAX_DIM`), and
  heads of at most `NARROW_HEAD_MAX_DIM` dimensions compute their gradient's query-axis products transposed.
  `between_linears` runs it between linear layers (`LinearParams`) with the weights multiplied first.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from diffusets_jax.models.conv import channels_last_conv

Dtype = Any
Array = jax.Array

# PyTorch's default for Linear/Conv weights, kaiming_uniform_(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)):
# variance scaling with scale 1/3 and a uniform distribution over the same fan_in (Flax counts the
# receptive field into fan_in for conv kernels (k, in, out), exactly as PyTorch does).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def maybe_remat(module_class: type, remat: bool) -> type:
    """`nn.remat(module_class)` when `remat`: same parameters, activations recomputed in the backward pass.

    Trades about one extra forward pass of compute for not keeping the block's intermediate activations
    between the forward and backward passes (the memory that limits the batch on an accelerator).
    """
    return nn.remat(module_class) if remat else module_class


# tanh(softplus(x)) is 1 in float32 (and bfloat16) from here on; clamping keeps e^(2x) finite.
MISH_SATURATION = 20.0


def mish(x: Array) -> Array:
    """Mish activation x * tanh(softplus(x)) (PyTorch `nn.Mish`), elementwise.

    Computed as x * n / (n + 2) with n = e^x (e^x + 2), the same function (tanh(log(1 + e^x)) written out): one
    exp and one division instead of exp, log1p and tanh, as accurate in float32 (within 2e-6 of a float64 Mish of
    the same inputs over [-100, 100], its gradient within 1e-5: tests/test_models_layers.py). The U-Net applies
    it after every normalisation; on 2 Intel Xeon cores (2026-12-05, alternated runs) its forward at batch 128
    went from 110-116 to 107-112 ms (medians of 20 calls).
    """
    e = jnp.exp(jnp.minimum(x, MISH_SATURATION))
    n = e * (e + 2)
    return x * (n / (n + 2))


def linear(
    features: int, in_features: int, *, name: str, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32
) -> nn.Dense:
    """`nn.Linear(in_features, features)` as a Flax Dense (kernel (in, out)) with PyTorch's initialisation."""
    return nn.Dense(
        features, kernel_init=torch_kernel_init, bias_init=torch_bias_init(in_features),
        dtype=dtype, param_dtype=param_dtype, name=name,
    )


def conv1d(
    features: int, in_features: int, kernel_size: int, *, name: str, stride: int = 1, padding: int = 0,
    dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
) -> Conv1d:
    """`nn.Conv1d(in_features, features, kernel_size, stride, padding)` on `(batch, length, in_features)`.

    Padding is explicit and symmetric as in PyTorch (Flax's "SAME" would pad differently for stride 2).
    """
    return Conv1d(features, kernel_size, stride, padding, in_features, dtype=dtype, param_dtype=param_dtype,
                  name=name)


def conv_as_matmul(x: Array, kernel: Array, stride: int = 1) -> Array:
    """Valid (unpadded) correlation of `x` `(batch, length, in)` with `kernel` `(k, in, out)` as one matmul.

    The taps are stacked on the channel axis, `(batch, out_length, k * in)`, and multiplied by the kernel
    reshaped to `(k * in, out)`. Same result as `lax.conv_general_dilated`, up to float summation order;
    worth it for short inputs only (the stacked copy is k times the input).
    """
    length, k = x.shape[1], kernel.shape[0]
    out_length = (length - k) // stride + 1
    columns = jnp.concatenate([x[:, i:i + stride * (out_length - 1) + 1:stride] for i in range(k)], axis=-1)
    return columns @ kernel.reshape(k * kernel.shape[1], kernel.shape[2])


def _live_taps(length: int, kernel_size: int, padding: int) -> tuple[int, int]:
    """`(first, last + 1)` of the taps of a stride-1 "same"-style conv that read any real input position.

    Output o reads input o + i - padding through tap i; with `length` inputs and outputs
    `length + 2 * padding - kernel_size + 1`, a tap outside this range only ever multiplies padding zeros.
    """
    out_length = length + 2 * padding - kernel_size + 1
    first = max(0, padding - out_length + 1)
    last = min(kernel_size, padding + length)
    return first, last


class Conv1d(nn.Module):
    """`nn.Conv1d(in_features, features, kernel_size, stride, padding)` on `(batch, length, in_features)`.

    Parameters as `flax.linen.Conv` names and shapes them (`kernel` `(kernel_size, in, features)`, `bias`),
    with PyTorch's initialisation. Inputs no longer than the kernel, and strided convolutions with fewer
    outputs than taps, go through `conv_as_matmul` (see the module docstring); the rest through
    `channels_last_conv`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    in_features: int | None = None  # checked against the input when given
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        if self.in_features is not None and in_features != self.in_features:
            raise ValueError(f"{self.name}: input has {in_features} channels, the layer takes {self.in_features}")
        kernel = self.param("kernel", torch_kernel_init, (self.kernel_size, in_features, self.features),
                            self.param_dtype)
        bias = self.param("bias", torch_bias_init(in_features * self.kernel_size), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        length, pad = x.shape[1], self.padding
        if length + 2 * pad < self.kernel_size:
            raise ValueError(f"{self.name}: input length {length} + padding {2 * pad} is shorter than the kernel "
                             f"({self.kernel_size}); the model needs longer inputs")
        out_length = (length + 2 * pad - self.kernel_size) // self.stride + 1
        short = length <= self.kernel_size or (self.stride > 1 and out_length < self.kernel_size)
        if short and self.kernel_size > 1:
            if self.stride == 1:
                first, last = _live_taps(length, self.kernel_size, pad)
                kernel = kernel[first:last]
                # Output o reads padded position o + i for tap i >= first: pad so index 0 is tap `first`.
                x = jnp.pad(x, ((0, 0), (pad - first, pad - (self.kernel_size - last)), (0, 0)))
            else:
                x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
            y = conv_as_matmul(x, kernel, self.stride)
        else:
            y = channels_last_conv(x, kernel, self.stride, (pad, pad))
        return y + bias


def group_norm(*, name: str, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
    """`nn.GroupNorm(1, C)`: one group, normalised jointly over (length, channel) per sample, eps 1e-5."""
    return nn.GroupNorm(
        num_groups=1, epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
    )


def layer_norm(*, name: str, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """`nn.LayerNorm(C)` over the channel axis, eps 1e-5."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


class ConvTranspose1d(nn.Module):
    """`nn.ConvTranspose1d(in, features, kernel_size, stride, padding)` on `(batch, length, in)`.

    Output length `(length - 1) * stride - 2 * padding + kernel_size` (k4 s2 p1 doubles the length).
    Inputs no longer than the kernel run as a matmul (`conv_as_matmul`), longer ones as one correlation per
    output phase (`_polyphase_transposed_conv`).
    Parameters: `kernel` `(kernel_size, in, features)` = PyTorch's weight `(in, features, k)` moved to
    k-first (no flip), and `bias` `(features,)`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        # PyTorch computes the fan-in of a transposed-conv weight (in, out, k) from dim 1: out * k.
        fan_in = self.features * self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2),
            (self.kernel_size, in_features, self.features), self.param_dtype,
        )
        bias = self.param("bias", torch_bias_init(fan_in), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if x.shape[1] <= self.kernel_size:  # short input: the dilated, padded input times the taps as a matmul
            # A transposed convolution is a correlation of the stride-dilated input with the flipped kernel,
            # padded by k - 1 - p on both sides.
            edge = self.kernel_size - 1 - self.padding
            dilated = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (edge, edge, self.stride - 1), (0, 0, 0)))
            return conv_as_matmul(dilated, jnp.flip(kernel, axis=0)) + bias
        y = _polyphase_transposed_conv(x, kernel, self.stride, self.padding)
        return y + bias


def _polyphase_transposed_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """PyTorch's transposed convolution of `x` `(batch, length, in)` by `kernel` `(k, in, out)` as `stride`
    stride-1 correlations at the input length, one per output phase, interleaved:
    `(batch, (length - 1) * stride - 2 * padding + k, out)`.

    Output o = i s - p + j receives input i through tap j. Writing o + p = s q + r (0 <= r < s), it reads taps
    j = r, r + s, r + 2s, ... from inputs q, q - 1, q - 2, ...: phase r is a correlation of the input with those
    taps in reverse order. Against one correlation of the stride-dilated input this skips the products with
    the s - 1 zeros between inputs, and its gradient has no dilated convolution, whose kernel gradient XLA
    rewrites into a layout that XLA:CPU runs as a naive loop inside loop bodies (`conv.py`).
    """
    batch, length, _ = x.shape
    taps, features = kernel.shape[0], kernel.shape[2]
    out_length = (length - 1) * stride - 2 * padding + taps
    first, last = padding // stride, (out_length - 1 + padding) // stride  # the q of outputs 0 and out_length - 1
    phases = []
    for r in range(stride):
        used = range(r, taps, stride)
        # This phase's outputs: q from ceil((p - r) / s) to floor((out_length - 1 + p - r) / s). Each phase is
        # computed for its own outputs only and padded to the common range [first, last] afterwards: a
        # correlation with more outputs than inputs has its kernel gradient rewritten by XLA into a layout
        # that is slow in loop bodies (`conv.py`).
        q0, q1 = -((r - padding) // stride), (out_length - 1 + padding - r) // stride
        if not used or q1 < q0:  # a phase without taps (stride > k) or without outputs
            phases.append(jnp.zeros((batch, last - first + 1, features), x.dtype))
            continue
        # Reversed tap by tap, not by jnp.flip: XLA folds a reverse of the taps into the kernel gradient's
        # convolution, again in a layout that is slow in loop bodies.
        reversed_taps = jnp.stack([kernel[j] for j in reversed(used)])
        lo = len(used) - 1 - q0  # output q reads inputs q - len(used) + 1 .. q
        y = channels_last_conv(x, reversed_taps, 1, (lo, q1 - q0 + len(used) - length - lo))
        phases.append(jnp.pad(y, ((0, 0), (q0 - first, last - q1), (0, 0))))
    interleaved = jnp.stack(phases, axis=2).reshape(batch, (last - first + 1) * stride, features)
    start = padding - stride * first
    return interleaved[:, start:start + out_length]


# On the CPU, attention whose float32 scores for all heads at once would take at least this many bytes is
# computed one head at a time (`attend`), the backward pass recomputing each head's scores and softmax instead
# of storing them: the same operations per head, far less memory traffic over the score tensors (the U-Net's
# 128-position levels have 1-4 dimensions per head, so the scores dwarf everything else). Values agree with all
# heads at once to float32 rounding (tests/test_models_layers.py). Measured on 2 Intel Xeon cores (2026-12-04,
# 8 heads, attention alone, all heads at once -> one at a time, forward / gradient):
#   64 samples x 128 x 128 (32 MiB), head_dim 1: 9.3 -> 4.4 / 28.1 -> 11.8 ms; head_dim 4: 12.1 -> 5.8 / 38.7 -> 25.9
#   128 samples x 128 x 128 (64 MiB), head_dim 1: 20.0 -> 8.5 / 60.6 -> 22.4 ms
#   256 samples x 64 x 64 (32 MiB), head_dim 2: 13.4 -> 6.6 / 40.4 -> 25.3 ms
#   16 MiB: the gradient still gains (32 x 128 x 128: 20.6 -> 13.3 ms), the forward does not (3.3 -> 3.2 ms;
#   512 x 32 x 32: 3.4 -> 4.9 ms); 8 MiB: both lose (16 x 128 x 128 gradient: 6.1 -> 7.3 ms).
# In the published U-Net this takes the two 128-position levels from batch 64 up: its forward at batch 128 went
# from 146 to 119 ms and its train step at batch 64 from 0.346 to 0.312 s (same process, alternated). GPUs and
# TPUs keep all heads in one batched product. The rule reads the global batch (a jitted program sees no other),
# so on a CPU mesh each device's share of the scores is smaller than it counts. Rechecked the same day with the
# narrow-head gradients below (forward / gradient, all heads -> one at a time): at 32 MiB one head at a time still
# wins (64 x 128 x 128, head_dim 4: 13.8 -> 7.0 / 37.9 -> 16.4 ms); at 16 MiB it stays mixed (512 x 32 x 32:
# head_dim 4 4.6 -> 5.0 / 23.3 -> 14.5 ms; head_dim 16, too wide for the narrow path, 8.1 -> 13.0 / 27.4 -> 37.2
# ms), so the threshold stays.
BY_HEAD_MIN_SCORE_BYTES = 32 * 2**20

# Above that threshold the forward pass alone still computes all heads at once where the heads are at least two
# dimensions wide: XLA:CPU (YNNPACK) then runs scores, exp, weights times values and the division as one fusion,
# tiled so that no score tensor is written out, and the head loop only adds its slicing and copies. Heads one
# dimension wide make the scores an outer product, which stays outside that fusion, so they keep the loop. Measured
# on 2 Intel Xeon cores (2026-12-05, 8 heads, forward alone, one head at a time -> all at once, minimum of 11):
# 128 samples x 128 x 128, head_dim 4: 18.2 -> 12.3 ms; 64 x 128 x 128, head_dim 4: 10.3 -> 7.5 ms; 256 x 64 x 64,
# head_dim 2: 12.6 -> 9.4 ms, head_dim 8: 12.6 -> 6.8 ms; but head_dim 1, 128 x 128 x 128: 13.0 -> 18.7 ms (padding
# it to two dimensions: 14.6 ms). The gradient still loops (all at once it took 29.2 against 20.0 ms at 64 x 128
# x 128, head_dim 4).
FORWARD_BY_HEAD_MAX_DIM = 1


def attention_by_head(batch: int, heads: int, q_len: int, kv_len: int) -> bool:
    """Whether `attend` should loop over the heads for these sizes on this backend (`BY_HEAD_MIN_SCORE_BYTES`)."""
    return jax.default_backend() == "cpu" and batch * heads * q_len * kv_len * 4 >= BY_HEAD_MIN_SCORE_BYTES


# On the CPU, the attention gradient of heads this narrow (or narrower) computes its two products that contract
# over the query axis, k's gradient ds^T q and v's gradient p^T do, each as a transposed product, (q^T ds)^T:
# XLA:CPU runs ds^T q, whose output is only head_dim wide, on a slow path (0.97 ms against 0.26 ms for q^T ds,
# 64 samples x 128 x 128, head_dim 4), and folds a plain transpose back into the slow form, so an optimization
# barrier keeps the two apart. The forward program is unchanged; the gradients agree to float32 rounding. Measured
# on 2 Intel Xeon cores (2026-12-04, 8 heads, attention gradient, plain -> transposed, alternated in one process):
# one head at a time, 64 x 128 x 128: head_dim 4 26.4 -> 14.4 ms, head_dim 1 12.1 -> 12.0; all heads at once,
# 64 x 64 x 64: head_dim 2 5.9 -> 3.9, head_dim 8 6.1 -> 4.3 ms; wider heads gain nothing or lose (head_dim 16 at
# 32 positions 2.42 -> 2.23, 32 at 16: 1.53 -> 1.88, 64 at 8: 1.25 -> 1.80 ms). The published U-Net's train step at
# batch 64 went from 0.302-0.310 to 0.289-0.292 s (two alternated runs of 20 steps; the same losses to the last
# printed digit, parameters within an ulp).
NARROW_HEAD_MAX_DIM = 8


def narrow_head_gradients(head_dim: int) -> bool:
    """Whether `attend` should compute its query-axis gradient products transposed (`NARROW_HEAD_MAX_DIM`)."""
    return jax.default_backend() == "cpu" and head_dim <= NARROW_HEAD_MAX_DIM


def _transposed_at_b(a: Array, b: Array) -> Array:
    """a^T b over the second-to-last axis, `(..., n, m)`, `(..., n, d)` -> `(..., m, d)`, computed as
    (b^T a)^T."""
    product = jnp.einsum("...nd,...nm->...dm", b, a, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(product).swapaxes(-1, -2)


def _scores(q: Array, k: Array) -> Array:
    """q k^T, `(..., q_len, d)`, `(..., kv_len, d)` -> `(..., q_len, kv_len)`, in float32 even for bf16 compute:
    the length is short, the precision matters."""
    return jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _scores_narrow(q: Array, k: Array) -> Array:
    """`_scores` with k's gradient computed transposed."""
    return _scores(q, k)


def _scores_narrow_fwd(q: Array, k: Array) -> tuple[Array, tuple[Array, Array]]:
    return _scores(q, k), (q, k)


def _scores_narrow_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    q, k = residuals
    dq = jnp.matmul(g, k, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), _transposed_at_b(g, q).astype(k.dtype)


_scores_narrow.defvjp(_scores_narrow_fwd, _scores_narrow_bwd)


@jax.custom_vjp
def _weights_values_narrow(p: Array, v: Array) -> Array:
    """p v, `(..., q_len, kv_len)`, `(..., kv_len, d)` -> `(..., q_len, d)`; v's gradient transposed."""
    return p @ v


def _weights_values_narrow_fwd(p: Array, v: Array) -> tuple[Array, tuple[Array, Array]]:
    return p @ v, (p, v)


def _weights_values_narrow_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    p, v = residuals
    dp = jnp.einsum("...id,...jd->...ij", g, v, preferred_element_type=jnp.float32)
    return dp.astype(p.dtype), _transposed_at_b(p, g).astype(v.dtype)


_weights_values_narrow.defvjp(_weights_values_narrow_fwd, _weights_values_narrow_bwd)


def _attend_batched(q: Array, k: Array, v: Array, narrow: bool = False) -> Array:
    # softmax(s) v computed as (exp(s - max) v) / sum: the division applies to the (q_len, head_dim) output, not
    # to the (q_len, kv_len) weights, for which XLA:CPU wrote the broadcast reciprocal out as a pass of its own,
    # and the gradient needs no reduction over the weights. The maximum only guards exp (the result does not
    # depend on it), so no gradient flows through it. On 2 Intel Xeon cores (2026-12-04, alternated runs) the
    # published U-Net's train step at batch 64 went from 0.287-0.288 to 0.275-0.279 s, its forward at batch
    # 128 from 124-125 to 113-118 ms; batch 16 unchanged (24.9 -> 24.6 ms).
    scores = (_scores_narrow if narrow else _scores)(q, k)
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    unnormalised = jnp.exp(scores - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    unnormalised = unnormalised.astype(v.dtype)
    out = _weights_values_narrow(unnormalised, v) if narrow else unnormalised @ v
    return (out / total).astype(v.dtype)


def _heads_first(*arrays: Array) -> tuple[Array, ...]:
    return tuple(x.swapaxes(0, 1) for x in arrays)


def _attend_forward(q: Array, k: Array, v: Array, narrow: bool) -> Array:
    """`_attend_batched`, all heads in one product, or one head at a time for heads one dimension wide
    (`FORWARD_BY_HEAD_MAX_DIM`)."""
    if q.shape[-1] > FORWARD_BY_HEAD_MAX_DIM:
        return _attend_batched(q, k, v, narrow)
    return jax.lax.map(lambda qkv: _attend_batched(*qkv, narrow), _heads_first(q, k, v)).swapaxes(0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend_head_by_head_gradient(q: Array, k: Array, v: Array, narrow: bool) -> Array:
    """`_attend_forward`, whose gradient recomputes the scores one head at a time instead of storing them."""
    return _attend_forward(q, k, v, narrow)


def _attend_fwd(q: Array, k: Array, v: Array, narrow: bool) -> tuple[Array, tuple[Array, Array, Array]]:
    return _attend_forward(q, k, v, narrow), (q, k, v)


def _attend_head_by_head_bwd(narrow: bool, residuals: tuple[Array, Array, Array], g: Array
                             ) -> tuple[Array, Array, Array]:
    q, k, v = residuals

    def one_head(qkvg: tuple[Array, ...]) -> tuple[Array, ...]:
        *qkv, g_head = qkvg
        return jax.vjp(lambda q, k, v: _attend_batched(q, k, v, narrow), *qkv)[1](g_head)

    return tuple(d.swapaxes(0, 1) for d in jax.lax.map(one_head, _heads_first(q, k, v, g)))


_attend_head_by_head_gradient.defvjp(_attend_fwd, _attend_head_by_head_bwd)


def attend(q: Array, k: Array, v: Array, one_head_at_a_time: bool = False, narrow: bool = False) -> Array:
    """softmax(q k^T) v per head: q `(batch, heads, q_len, head_dim)` (already scaled), k and v `(batch, heads,
    kv_len, head_dim)` -> `(batch, heads, q_len, head_dim)`. `one_head_at_a_time`: the backward pass loops over
    the heads, recomputing each head's scores (the batch axis, which a mesh shards, stays whole), and so does
    the forward pass of heads one dimension wide (`FORWARD_BY_HEAD_MAX_DIM`). `narrow`: the gradient products
    over the query axis computed transposed (`NARROW_HEAD_MAX_DIM`); same values."""
    if not one_head_at_a_time:
        return _attend_batched(q, k, v, narrow)
    return _attend_head_by_head_gradient(q, k, v, narrow)


class LinearParams(nn.Module):
    """The parameters of `linear(features, in_features)`, kernel `(in_features, features)` and bias, under the
    same names and with the same initialisation, returned instead of applied: for a caller that multiplies
    them into another layer's weights first (`TorchMultiheadAttention.between_linears`). `bias_init` defaults to
    PyTorch's."""

    features: int
    in_features: int
    bias_init: nn.initializers.Initializer | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        kernel = self.param("kernel", torch_kernel_init, (self.in_features, self.features), self.param_dtype)
        bias_init = self.bias_init or torch_bias_init(self.in_features)
        return kernel, self.param("bias", bias_init, (self.features,), self.param_dtype)


def compose_affine(first: tuple[Array, Array], second: tuple[Array, Array]) -> tuple[Array, Array]:
    """The affine map x -> (x W1 + b1) W2 + b2 as one `(W1 W2, b1 W2 + b2)`, multiplied in full float32 (on
    accelerators the default matmul precision would round the weights)."""
    (w1, b1), (w2, b2) = first, second
    highest = jax.lax.Precision.HIGHEST
    return jnp.matmul(w1, w2, precision=highest), jnp.matmul(b1, w2, precision=highest) + b2


class TorchMultiheadAttention(nn.Module):
    """PyTorch `nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`, no masks, no dropout.

    Parameters as PyTorch stores them, in Flax layout: `in_proj_kernel` `(embed_dim, 3 * embed_dim)` packs
    the q, k, v projections in that order (PyTorch `in_proj_weight` transposed), `in_proj_bias`
    `(3 * embed_dim,)`, and `out_proj` (`kernel` `(embed_dim, embed_dim)`, `bias`).
    """

    embed_dim: int
    num_heads: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"attention width {self.embed_dim} is not divisible by num_heads={self.num_heads}")
        # PyTorch: xavier_uniform_ on in_proj_weight (3E, E), zero biases; out_proj keeps Linear's weight init.
        self.in_proj_kernel = self.param(
            "in_proj_kernel", nn.initializers.xavier_uniform(), (self.embed_dim, 3 * self.embed_dim), self.param_dtype
        )
        self.in_proj_bias = self.param(
            "in_proj_bias", nn.initializers.zeros_init(), (3 * self.embed_dim,), self.param_dtype
        )
        self.out_proj = LinearParams(
            self.embed_dim, self.embed_dim, nn.initializers.zeros_init(), self.param_dtype
        )

    def _in_proj(self, which: int) -> tuple[Array, Array]:
        """Kernel `(E, E)` and bias of packed projection `which` (0 = q, 1 = k, 2 = v)."""
        e = self.embed_dim
        return self.in_proj_kernel[:, which * e:(which + 1) * e], self.in_proj_bias[which * e:(which + 1) * e]

    def _affine(self, x: Array, kernel: Array, bias: Array) -> Array:
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return x @ kernel + bias

    def _project(self, x: Array, which: int) -> Array:
        """Packed projection `which` of `(..., embed_dim)`."""
        return self._affine(x, *self._in_proj(which))

    def _attend(self, q: Array, k: Array, v: Array) -> Array:
        """The heads' attention over projected q `(batch, q_len, E)`, k and v `(batch, kv_len, E)` -> `(batch,
        q_len, E)`, before `out_proj`."""
        batch, q_len, _ = q.shape
        head_dim = self.embed_dim // self.num_heads
        # Heads-major (batch, heads, length, head_dim) and plain batched matmuls: with head_dim as small as
        # 1-4 here, XLA:CPU runs these ~3x faster than the equivalent "bqhd,bkhd->bhqk" einsum.
        def heads(x: Array) -> Array:
            return x.reshape(x.shape[0], x.shape[1], self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q = heads(q) * (1.0 / math.sqrt(head_dim))  # PyTorch scales q before q @ k
        out = attend(q, heads(k), heads(v), attention_by_head(batch, self.num_heads, q_len, k.shape[1]),
                     narrow_head_gradients(head_dim))
        return out.transpose(0, 2, 1, 3).reshape(batch, q_len, self.embed_dim)

    def __call__(self, query: Array, key: Array, value: Array) -> Array:
        """`(batch, q_len, E)`, `(batch, kv_len, E)`, `(batch, kv_len, E)` -> `(batch, q_len, E)`."""
        out = self._attend(self._project(query, 0), self._project(key, 1), self._project(value, 2))
        return self._affine(out, *self.out_proj())

    def between_linears(self, x: Array, before: tuple[tuple[Array, Array], ...], after: tuple[Array, Array],
                        compose: bool = True) -> Array:
        """`after(self(q(x), k(x), v(x)))`: self-attention over `x` `(batch, length, C)` between linear layers,
        `before` the (kernel `(C, E)`, bias) of the three that make query, key and value and `after` the one
        `(E, C_out)` applied to the output -> `(batch, length, C_out)`.

        With more positions in the batch than C, each linear and the projection it feeds run as one matmul
        with the two weights multiplied first (`compose_affine`): per position C x E instead of C x E + E x E
        multiply-adds, for C x E x E once. The U-Net's wide attention levels (E = 512 over blocks 160-192
        wide) do most of their arithmetic there. The values agree with the layers applied in turn to float32
        rounding; `compose=False` applies them in turn whatever the sizes. On 2 Intel Xeon cores (2026-12-04,
        alternated runs) the published U-Net's train step at batch 64 went from 0.291-0.297 to 0.254-0.255 s,
        its forward at batch 128 from 123-127 to 96-102 ms, at batch 16 from 25.8-26.8 to 24.2-25.6 ms; batch 1
        unchanged (5.9-6.6 ms).
        """
        batch, length, width = x.shape
        if not compose or batch * length <= width:
            q, k, v = (self._affine(x, *linear) for linear in before)
            return self._affine(self(q, k, v), *after)
        composed = [compose_affine(linear, self._in_proj(which)) for which, linear in enumerate(before)]
        qkv = self._affine(x, jnp.concatenate([w for w, _ in composed], axis=1),
                           jnp.concatenate([b for _, b in composed]))
        out = self._attend(*jnp.split(qkv, 3, axis=-1))
        return self._affine(out, *compose_affine(self.out_proj(), after))

    def identical_keys(self, value: Array) -> Array:
        """The attention output when every key/value position holds the same vector `value` `(batch, E)`.

        The softmax weights are then uniform whatever the query, so the output is `out_proj(W_v value +
        b_v)` for every query position: `(batch, E)`, to broadcast over the query length. Same parameters
        as `__call__`, a fraction of the work.
        """
        return self._affine(self._project(value, 2), *self.out_proj())
