"""Winograd minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) for 1-D
convolutions, channels-last: the VAE's convolutions with fewer multiply-adds.

F(m, r) computes m outputs of an r-tap correlation from an input tile of a = m + r - 1 samples with a
multiplications instead of m * r:

    y = A^T [(G g) * (B^T d)]        d: input tile (a,), g: taps (r,), y: outputs (m,)

Across channels every one of the a "multiplications" becomes a matmul `(tiles, c_in) @ (c_in, c_out)`, so a
k3 convolution does 8/18 of the direct matmul work with F(6, 3) and a 2-tap one 7/12 with F(6, 2). The
transforms are memory-bound additions over the tile axis, whose cost grows with length x channels while the
matmuls grow with length x channels^2: below `MIN_CHANNELS` they cost more than they save.

The gradient is written out rather than left to autodiff (`_backward` says why): every transform in it reads
its input as slices, which XLA:CPU fuses into loops that vectorise.

Why: XLA:CPU's convolution already runs the VAE's k3 convolutions near the machine's compute ceiling
(`benchmarks/vae_ceiling.py`), so its decoder and training step could only get faster by doing less
arithmetic.

Accuracy: the transforms are exact in float64 (small integers, halves and quarters); float32 rounding in them
puts the result within 1e-5 of a float64 reference relative to the output's scale, a few times the direct
convolution's own rounding error (F(6, 3) at 256-512 channels: 3-7e-6 at most, root mean square 4-6 times the
direct convolution's, against 2-4e-6 and 3-4 times for F(4, 3); `tests/test_models_winograd.py`). Over the
published VAE's training gradient, the median relative root-mean-square error against float64 is 5.5e-7 (F(4,
3) 4.0e-7, direct 2.4e-7; 2026-12-05), and the published VAE stays within 1e-5 of the PyTorch reference vectors
(`tests/test_convert_vae.py`). In bfloat16 the transforms would lose too much, so "auto" never takes this path
for bfloat16 compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from diffusets_jax.models.conv import channels_last_conv, sharding_of

# Outputs per tile. Larger tiles save more multiplications (a / (m * r) -> 1 / r) but the transforms' rounding
# grows quickly with the interpolation points. m = 6 is the largest whose points are all 0, +-1, +-2, +-1/2
# (NNPACK's float32 F(6, 3)); against m = 4 (cuDNN's F(4, 3)) it made the published VAE's batch-16 training
# gradient 8% faster on 2 cores (2026-12-05), with the accuracy in the module docstring.
TILE = 6
# Interpolation points for a = m + r - 1 (the last point is always infinity), smallest magnitudes first, as
# rounding grows with them: 0, +-1, +-2, +-1/2 for F(6, 3); 0, +-1, +-2, 1/2 for F(6, 2).
_FINITE_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)
# Below this many input and output channels the matmuls are too small to pay for the transforms on the CPU, nor
# below this many tiles in the batch (rows of each matmul). Chosen by timing the published VAE on 2 cores
# (2026-12-02). 128 channels since the written-out gradient (2026-12-05): with the 128-channel level on this
# path the training gradient took 2.29 s against 2.33 s (minimum of 8 alternated calls, within this machine's
# noise, so at least no loss). `benchmarks/vae_ceiling.py --batch B` re-checks them: at batch 1 it times the
# decode with Winograd forced everywhere against the direct path.
MIN_CHANNELS = 128
MIN_ROWS = 256


@functools.cache
def transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(A^T (m, a), G (a, r), B^T (a, a))` of F(m, r), float64.

    Toom-Cook at the points `_FINITE_POINTS[:a - 1]` and infinity: with E_n the `(a, n)` evaluation matrix
    (row p = 1, p, ..., p^(n-1); the infinity row picks the leading coefficient), the linear convolution of
    an r- and an m-vector is `E_a^-1 [(E_r g) * (E_m h)]`; the correlation is its transpose in h, giving
    A^T = E_m^T, G = E_r and B^T = E_a^-T.
    """
    a = m + r - 1
    points = _FINITE_POINTS[:a - 1]
    if len(points) != a - 1:
        raise ValueError(f"F({m}, {r}) needs {a - 1} finite points; only {len(_FINITE_POINTS)} are defined")

    def evaluation(n: int) -> np.ndarray:
        rows = [[p ** k for k in range(n)] for p in points] + [[0.0] * (n - 1) + [1.0]]
        return np.array(rows, dtype=np.float64)

    return evaluation(m).T, evaluation(r), np.linalg.inv(evaluation(a)).T


def worth_it(rows: int, in_channels: int, out_channels: int) -> bool:
    """Whether a convolution of `rows` tiles (batch x length / TILE) this wide runs faster through `correlate` on
    the CPU (`MIN_CHANNELS`, `MIN_ROWS`)."""
    return rows >= MIN_ROWS and min(in_channels, out_channels) >= MIN_CHANNELS


def _combine(matrix: np.ndarray, terms: list[jax.Array]) -> list[jax.Array]:
    """`[sum_j matrix[i, j] * terms[j] for each row i]`, skipping zero coefficients (XLA fuses the sums)."""
    rows = []
    for coefficients in matrix:
        row = [float(c) * t if c != 1.0 else t for c, t in zip(coefficients, terms, strict=True) if c != 0.0]
        rows.append(functools.reduce(jnp.add, row))
    return rows


def _input_transform(x: jax.Array, padding: tuple[int, int], r: int, tile: int) -> tuple[list[jax.Array], int]:
    """`(B^T d)` of every tile of `x` `(batch, length, c)` padded by `padding`, for an r-tap correlation: a list of
    `a = tile + r - 1` arrays `(batch * tiles, c)`, and the number of outputs."""
    batch, length, channels = x.shape
    out_length = length + padding[0] + padding[1] - r + 1
    tiles = -(-out_length // tile)
    # Tile t reads padded samples [tile * t, tile * t + a); pad the right so the last tile is whole.
    extra = tile * tiles + r - 1 - (length + padding[0] + padding[1])
    x = jnp.pad(x, ((0, 0), (padding[0], padding[1] + extra), (0, 0)))
    # Sample j of every tile: (batch, tiles, c) strided views of the padded input.
    samples = [x[:, j:j + tile * (tiles - 1) + 1:tile] for j in range(tile + r - 1)]
    b_t = transforms(tile, r)[2]
    return [_reshape(t, (batch * tiles, channels)) for t in _combine(b_t, samples)], out_length


def _reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`x.reshape(shape)` that merges or splits the leading (batch) axis, which keeps its sharding.

    The matmuls take the batch and tile axes as one (batch * tiles) axis: as three-dimensional dots XLA:CPU
    copied the transformed input into a transposed layout for the kernel gradient, 12 ms for each of them in the
    published VAE's step. On meshes with Explicit axes such a reshape of a sharded axis must be told its output's
    sharding: the same mesh axes on the leading and the channel axis.
    """
    sharding = jax.typeof(x).sharding
    if not any(kind == AxisType.Explicit for kind in getattr(sharding.mesh, "axis_types", ())):
        return x.reshape(shape)
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    out_spec = PartitionSpec(spec[0], *(None,) * (len(shape) - 2), spec[-1])
    return jax.lax.reshape(x, shape, out_sharding=NamedSharding(sharding.mesh, out_spec))


def _output_transform(m: list[jax.Array], a_t: np.ndarray, batch: int, out_length: int) -> jax.Array:
    """`A^T m` of the `a` products `(batch * tiles, c)` back to `(batch, out_length, c)`.

    Written as a sum of broadcast products, not a stack of the `tile` output rows: a stack is a concatenate,
    which XLA:CPU fuses into the next op (often a GroupNorm's backward) as a loop that does not vectorise.
    """
    rows, channels = m[0].shape
    terms = [jnp.asarray(a_t[:, i], mi.dtype)[:, None] * mi[:, None, :] for i, mi in enumerate(m)]
    y = functools.reduce(jnp.add, terms)  # (batch * tiles, tile, c)
    return _reshape(y, (batch, rows // batch * a_t.shape[0], channels))[:, :out_length]


def _winograd(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], tile: int, swapped: bool = False
              ) -> tuple[jax.Array, list[jax.Array]]:
    """The correlation of `correlate`, and the transformed input tiles (the kernel gradient needs them).

    `swapped`: the kernel is `(r, c_out, c_in)` and correlates with its in/out axes swapped (the input gradient),
    transposed inside the matmuls rather than copied before its transform.
    """
    r = kernel.shape[0]
    a_t, g, _ = transforms(tile, r)
    v, out_length = _input_transform(x, padding, r, tile)
    u = _combine(g, list(kernel))
    contract = (((1,), (1,)), ((), ())) if swapped else (((1,), (0,)), ((), ()))
    # The a matmuls, one per transformed sample, each (batch * tiles, c_out). Separate 2-D matmuls, not one
    # batched dot_general: XLA:CPU ran the batched form's kernel gradient (a contraction over the tiles) slower
    # than the direct convolution's own.
    m = [jax.lax.dot_general(vi, ui, contract) for vi, ui in zip(v, u, strict=True)]
    return _output_transform(m, a_t, x.shape[0], out_length), v


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def correlate(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], tile: int = TILE) -> jax.Array:
    """Stride-1 correlation of `x` `(batch, length, c_in)`, zero-padded by `padding` = (left, right), each side
    between 0 and r - 1, with `kernel` `(r, c_in, c_out)`: `(batch, length + left + right - r + 1, c_out)`, as
    `lax.conv_general_dilated(x, kernel, (1,), (padding,), ("NWC", "WIO", "NWC"))` computes it.

    Its gradient is written out (`_backward`); as a `custom_vjp` it has no forward-mode derivative.
    """
    return _winograd(x, kernel, _checked(padding, kernel.shape[0]), tile)[0]


def _checked(padding: tuple[int, int], r: int) -> tuple[int, int]:
    if not all(0 <= p <= r - 1 for p in padding):
        raise ValueError(f"Winograd correlation pads each side by 0 to {r - 1} for {r} taps, got {padding}")
    return padding


def _forward(x, kernel, padding, tile):
    y, v = _winograd(x, kernel, _checked(padding, kernel.shape[0]), tile)
    return y, (v, kernel)


def _backward(padding, tile, residuals, dy):
    """Gradients of `y = correlate(x, kernel)` with every transform a gather, never a scatter.

    Autodiff would transpose the input transform's strided slices into interior-padded pads and the output
    transform into slices of a concatenate; XLA:CPU fuses those into the neighbouring GroupNorm backward as loops
    that do not vectorise. Instead, with v_i the saved transformed input tiles and dm_i = (A dy)_i the output
    gradient taken through the output transform's transpose (plain slices of a `(batch * tiles, tile, c_out)` view):
    - dkernel = G^T (v_i^T dm_i), the Winograd-domain kernel gradient mapped back to taps;
    - dx is the correlation of dy with the flipped kernel, in/out swapped, padded by (r - 1 - left, r - 1 - right):
      another Winograd correlation, of the same matmul work as the scatter it replaces.
    """
    v, kernel = residuals
    r = kernel.shape[0]
    a_t, g, _ = transforms(tile, r)
    batch, out_length, c_out = dy.shape
    rows = v[0].shape[0]  # batch * tiles
    dy_tiles = _reshape(jnp.pad(dy, ((0, 0), (0, rows // batch * tile - out_length), (0, 0))), (rows, tile, c_out))
    dm = _combine(a_t.T, [dy_tiles[:, k] for k in range(tile)])
    # A contraction over the (batch-sharded) tiles: on meshes with Explicit axes it must be told its output's
    # sharding, that of the kernel.
    du_sharding = sharding_of(kernel, (1, 2), dy, kernel)
    du = [jax.lax.dot_general(vi, dmi, (((0,), (0,)), ((), ())), out_sharding=du_sharding)
          for vi, dmi in zip(v, dm, strict=True)]
    dkernel = jnp.stack(_combine(g.T, du))
    left, right = padding
    dx, _ = _winograd(dy, jnp.flip(kernel, axis=0), (r - 1 - left, r - 1 - right), tile, swapped=True)
    return dx, dkernel


correlate.defvjp(_forward, _backward)


# How a model's convolutions are computed: "auto" = Winograd on the CPU for float32 convolutions where it pays
# (`worth_it`), the backend's own convolution elsewhere (cuDNN and the TPU compiler pick their own
# algorithms); "direct" = always the backend's convolution; "winograd" = always `correlate`.
CONV_ALGORITHMS = ("auto", "direct", "winograd")


def check_algorithm(algorithm: str) -> None:
    """ValueError unless `algorithm` is one of `CONV_ALGORITHMS`."""
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"conv_algorithm must be one of {', '.join(CONV_ALGORITHMS)}, got {algorithm!r}")


def uses_winograd(algorithm: str, x: jax.Array, kernel: jax.Array) -> bool:
    """Whether `convolve` takes the Winograd path for this input `(batch, length, c_in)` and kernel `(r, c_in, c_out)`."""
    check_algorithm(algorithm)
    if algorithm == "direct" or kernel.shape[0] == 1:  # a 1x1 convolution is a matmul already
        return False
    if algorithm == "winograd":
        return True
    return (jax.default_backend() == "cpu" and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
            and worth_it(x.shape[0] * -(-x.shape[1] // TILE), kernel.shape[1], kernel.shape[2]))


def convolve(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], algorithm: str = "auto") -> jax.Array:
    """Stride-1 correlation of `x` `(batch, length, c_in)` padded by `padding` with `kernel` `(r, c_in, c_out)`:
    `(batch, length + sum(padding) - r + 1, c_out)`, by `algorithm` (`CONV_ALGORITHMS`)."""
    if uses_winograd(algorithm, x, kernel):
        return correlate(x, kernel, padding)
    return channels_last_conv(x, kernel, 1, padding)
