"""Winograd minimal filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) for 1-D
convolutions, channels-last: the VAE's convolutions with fewer multiply-adds.

F(m, r) computes m outputs of an r-tap correlation from an input tile of a = m + r - 1 samples with a
multiplications instead of m * r:

    y = A^T [(G g) * (B^T d)]        d: input tile (a,), g: taps (r,), y: outputs (m,)

Across channels every one of the a "multiplications" becomes a matmul `(tiles, c_in) @ (c_in, c_out)`, so a
k3 convolution does 6/12 of the direct matmul work with F(4, 3) and a 2-tap one 5/8 with F(4, 2). The
transforms are memory-bound additions over the tile axis, whose cost grows with length x channels while the
matmuls grow with length x channels^2: they pay off at the VAE's 256- and 512-channel levels and not at its
128-channel one (`MIN_CHANNELS`).

Why: XLA:CPU's convolution already runs the VAE's k3 convolutions near the machine's compute ceiling
(`benchmarks/vae_ceiling.py`), so its decoder and training step could only get faster by doing less
arithmetic.

Accuracy: the transforms are exact in float64 (small integers and halves); float32 rounding in them puts the
result within 1e-5 of a float64 reference relative to the output's scale, a few times the direct
convolution's own rounding error (`tests/test_models_winograd.py`; the published VAE stays within 1e-5 of
the PyTorch reference vectors, `tests/test_convert_vae.py`). In bfloat16 the transforms would lose too much,
so "auto" never takes this path for bfloat16 compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.models.conv import channels_last_conv

# Outputs per tile. Larger tiles save more multiplications (a / (m * r) -> 1 / r) but the transforms' rounding
# grows quickly with the interpolation points; m = 4 is the usual compromise (cuDNN's and Lavin's F(4, 3)).
TILE = 4
# Interpolation points for a = m + r - 1 (the last point is always infinity), smallest magnitudes first, as
# rounding grows with them: 0, +-1, +-2 for F(4, 3); 0, +-1, 2 for F(4, 2).
_FINITE_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)
# Below this many input and output channels the matmuls are too small to pay for the transforms on the CPU, nor
# below this many tiles in the batch (rows of each matmul). Chosen by timing the published VAE on 2 cores
# (2026-12-02); `benchmarks/vae_ceiling.py --batch B` re-checks them: at batch 1 it times the decode with
# Winograd forced everywhere against the direct path.
MIN_CHANNELS = 256
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


def correlate(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], tile: int = TILE) -> jax.Array:
    """Stride-1 correlation of `x` `(batch, length, c_in)`, zero-padded by `padding` = (left, right), with
    `kernel` `(r, c_in, c_out)`: `(batch, length + left + right - r + 1, c_out)`, as
    `lax.conv_general_dilated(x, kernel, (1,), (padding,), ("NWC", "WIO", "NWC"))` computes it.
    """
    batch, length, c_in = x.shape
    r, _, c_out = kernel.shape
    out_length = length + padding[0] + padding[1] - r + 1
    a = tile + r - 1
    tiles = -(-out_length // tile)
    a_t, g, b_t = transforms(tile, r)
    # Tile t reads padded samples [tile * t, tile * t + a); pad the right so the last tile is whole.
    extra = tile * tiles + r - 1 - (length + padding[0] + padding[1])
    x = jnp.pad(x, ((0, 0), (padding[0], padding[1] + extra), (0, 0)))
    # Sample j of every tile: (batch, tiles, c_in) strided views of the padded input.
    samples = [x[:, j:j + tile * (tiles - 1) + 1:tile] for j in range(a)]
    v = [t.reshape(batch * tiles, c_in) for t in _combine(b_t, samples)]
    u = _combine(g, list(kernel))
    # The a matmuls, one per transformed sample, each (batch * tiles, c_out). Separate 2-D matmuls, not one
    # batched dot_general: XLA:CPU ran the batched form's kernel gradient (a contraction over the tiles) slower
    # than the direct convolution's own.
    m = [vi @ ui for vi, ui in zip(v, u, strict=True)]
    y = jnp.stack(_combine(a_t, m), axis=1)  # (batch * tiles, tile, c_out)
    return y.reshape(batch, tiles * tile, c_out)[:, :out_length]


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
