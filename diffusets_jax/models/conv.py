"""1-D channels-last convolution whose gradient XLA:CPU runs at full speed inside loop bodies.

JAX differentiates a `("NWC", "WIO", "NWC")` convolution into two convolutions of other layouts: the input
gradient reads the kernel with its in/out axes swapped, the kernel gradient contracts over the batch.
XLA:CPU's fast convolution kernel takes only the channels-last layout; the compiler rewrites the other two
into it with explicit transposes at a program's top level, but not in the body of a loop
(jax-ml/jax#12868, open), where they run as naive loops. Our loops with convolution gradients inside are
gradient accumulation (`train.grad_accum_steps`, a `lax.scan` over micro-batches) and the steps of posterior
sampling, editing and digital twins (the gradient through the U-Net and the decoder). Measured 2026-12-03
on this project's 2-core development machine: the gradient of a k3 convolution at (16, 512, 256) inside a
4-step scan took 3.2 s, and 0.033 s in the form below; the published VAE's batch-16 train step with
`grad_accum_steps=4` took 83 s, and 2.2-2.9 s in the form below.

So on the CPU, `channels_last_conv`'s gradient is written in the channels-last layout itself, with the
transposes made explicit: the arithmetic of JAX's own transpose rules (the tests compare them). On other
backends (cuDNN, the TPU compiler) it is `lax.conv_general_dilated`, differentiated by JAX.

The price, on the CPU only: a `custom_vjp` function has no forward-mode derivative, so `jax.jvp` and
`jax.jacfwd` through the models raise there; `jax.grad`, `jax.vjp` and their nesting work.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

CHANNELS_LAST = ("NWC", "WIO", "NWC")
_FLAX_CHANNELS_LAST = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 2, 1), rhs_spec=(2, 1, 0), out_spec=(0, 2, 1))


def _correlate(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int], lhs_dilation: int = 1,
               rhs_dilation: int = 1, out_sharding=None) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride,), (padding,), lhs_dilation=(lhs_dilation,),
                                        rhs_dilation=(rhs_dilation,), dimension_numbers=CHANNELS_LAST,
                                        out_sharding=out_sharding)


def sharding_of(array: jax.Array, axes: tuple[int, ...], x: jax.Array, kernel: jax.Array) -> NamedSharding:
    """`array`'s sharding with its axes taken in the order `axes`: a gradient is sharded as its primal. On meshes
    with Explicit axes a convolution that contracts a sharded axis (the kernel gradient contracts the batch)
    must be told its output sharding, as JAX's own transpose rules do. The mesh is the one x or the kernel
    carries (a replicated kernel may carry none)."""
    spec = tuple(jax.typeof(array).sharding.spec)
    spec += (None,) * (array.ndim - len(spec))
    meshes = [jax.typeof(a).sharding.mesh for a in (x, kernel)]
    mesh = next((m for m in meshes if not m.empty), meshes[0])
    return NamedSharding(mesh, PartitionSpec(*(spec[axis] for axis in axes)))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_channels_last_gradient(x, kernel, stride, padding):
    return _correlate(x, kernel, stride, padding)


def _forward(x, kernel, stride, padding):
    return _correlate(x, kernel, stride, padding), (x, kernel)


def _backward(stride, padding, residuals, dy):
    """Gradients of `y = conv(x, kernel)`, x `(batch, length, in)`, kernel `(k, in, out)`, dy `(batch, out_length,
    out)`, as two channels-last convolutions.

    With x padded by (lo, hi), output t reads padded input t s + j through tap j. So:
    - dx is the correlation of dy, dilated by the stride s, with the kernel flipped and its in/out axes
      swapped, padded so that it covers exactly the padded input's positions lo .. lo + length - 1;
    - dkernel[j] = sum over batch and t of x_padded[t s + j] dy[t]: the correlation of x with batch and
      channel axes swapped, `(in, length, batch)`, by dy as a kernel `(out_length, batch, out)` dilated by
      s, which gives `(in, k, out)`; padded on the right so that exactly k taps come out.
    """
    x, kernel = residuals
    lo, _ = padding
    length, taps, out_length = x.shape[1], kernel.shape[0], dy.shape[1]
    span = (out_length - 1) * stride  # from the first output's first tap to the last output's
    swapped = jnp.flip(kernel, axis=0).transpose(0, 2, 1)  # (k, out, in)
    dx = _correlate(dy, swapped, 1, (taps - 1 - lo, length + lo - span - 1), lhs_dilation=stride,
                    out_sharding=sharding_of(x, (0, 1, 2), x, kernel))
    dkernel = _correlate(x.transpose(2, 1, 0), dy.transpose(1, 0, 2), 1, (lo, taps + span - lo - length),
                         rhs_dilation=stride, out_sharding=sharding_of(kernel, (1, 0, 2), x, kernel))
    return dx, dkernel.transpose(1, 0, 2)


_conv_with_channels_last_gradient.defvjp(_forward, _backward)


def channels_last_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: tuple[int, int] = (0, 0)
                       ) -> jax.Array:
    """Correlation of `x` `(batch, length, in)` padded by `padding` with `kernel` `(k, in, out)`, every `stride`-th
    output: `(batch, (length + sum(padding) - k) // stride + 1, out)`, as `lax.conv_general_dilated(x, kernel,
    (stride,), (padding,), dimension_numbers=CHANNELS_LAST)` computes it. On the CPU its gradient is the
    channels-last form above (module docstring)."""
    padding = (int(padding[0]), int(padding[1]))
    if jax.default_backend() != "cpu":
        return _correlate(x, kernel, stride, padding)
    return _conv_with_channels_last_gradient(x, kernel, int(stride), padding)


def flax_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count=1, precision=None):
    """For `flax.linen.Conv(..., conv_general_dilated=flax_conv_general_dilated)`: `channels_last_conv` for the
    1-D, ungrouped, undilated, explicitly padded convolutions our models use, `lax.conv_general_dilated` for
    anything else (a grouped convolution's gradient lost 2x in a loop body, not 100x: 0.064 against 0.032 s
    at (16, 512, 128) with 16 groups)."""
    plain = (lhs.ndim == 3 and dimension_numbers == _FLAX_CHANNELS_LAST and feature_group_count == 1
             and precision is None and tuple(lhs_dilation or (1,)) == (1,) and tuple(rhs_dilation or (1,)) == (1,)
             and not isinstance(padding, str))
    if not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision)
    (stride,), ((lo, hi),) = window_strides, padding
    return channels_last_conv(lhs, rhs, stride, (lo, hi))
