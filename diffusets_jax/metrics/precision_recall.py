"""Improved precision and recall of generative models (Kynkäänniemi et al., 2019), k = 3 by default.

Reference spec section 8: each feature vector spans a ball whose radius is the distance to its k-th nearest
neighbour in its own set (itself excluded). A vector lies on a set's manifold when it is inside (distance <=
radius, inclusive) the ball of at least one vector of that set.
- precision = fraction of generated vectors on the real manifold (are the samples realistic?)
- recall    = fraction of real vectors on the generated manifold (is the real variety covered?)
- F1        = 2 p r / (p + r)

Pairwise distances are never held for whole sets: a jitted kernel walks the query vectors in row blocks
(`lax.map`) and, inside each, the reference vectors in column blocks (`lax.scan`), keeping a running k-smallest
list (radii) or a running "inside any ball" flag (membership). Peak memory is one `(row_block, col_block)`
tile, so 100k x 100k comparisons run in a few hundred MB.

Distances are squared Euclidean |a|^2 + |b|^2 - 2 a.b in float32 with `Precision.HIGHEST` matmuls (the
accelerator default, TF32/bf16, would move points across ball boundaries), after centring both sets on the
real mean to limit cancellation. The same kernel computes radii and memberships, so a point compared with
its own radius is consistent.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = np.ndarray | jax.Array

DEFAULT_K = 3
DEFAULT_ROW_BLOCK = 1024
DEFAULT_COL_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    f1: float
    k: int


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    pad = (-x.shape[0]) % multiple
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _squared_distances(rows: jax.Array, row_sq: jax.Array, cols: jax.Array, col_sq: jax.Array) -> jax.Array:
    """(r, d), (r,), (c, d), (c,) -> (r, c) squared distances, clipped at 0 against round-off."""
    cross = jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(row_sq[:, None] + col_sq[None, :] - 2.0 * cross, 0.0)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    return x.reshape((x.shape[0] // block, block) + x.shape[1:])


@functools.partial(jax.jit, static_argnames=("k", "row_block", "col_block"))
def _kth_neighbour_sq_radii(points: jax.Array, n_valid: jax.Array, k: int, row_block: int, col_block: int):
    """Squared distance from each point to its k-th nearest other point. `points` `(n_pad, d)` is padded to a
    multiple of both block sizes; rows at index >= n_valid are padding. Returns `(n_pad,)`."""
    sq = jnp.sum(points * points, axis=1)
    index = jnp.arange(points.shape[0])
    col_blocks = (_blocks(points, col_block), _blocks(sq, col_block), _blocks(index, col_block))
    kept_per_block = min(k, col_block)

    def one_row_block(row_args):
        rows, row_sq, row_index = row_args

        def scan_columns(best, col_args):
            cols, col_sq, col_index = col_args
            d2 = _squared_distances(rows, row_sq, cols, col_sq)
            excluded = (col_index[None, :] >= n_valid) | (col_index[None, :] == row_index[:, None])
            d2 = jnp.where(excluded, jnp.inf, d2)
            block_smallest = -jax.lax.top_k(-d2, kept_per_block)[0]
            merged = jnp.concatenate([best, block_smallest], axis=1)
            return -jax.lax.top_k(-merged, k)[0], None

        best = jnp.full((rows.shape[0], k), jnp.inf, dtype=rows.dtype)
        best, _ = jax.lax.scan(scan_columns, best, col_blocks)
        return best[:, k - 1]

    radii = jax.lax.map(one_row_block, (_blocks(points, row_block), _blocks(sq, row_block), _blocks(index, row_block)))
    return radii.reshape(-1)


@functools.partial(jax.jit, static_argnames=("row_block", "col_block"))
def _inside_any_ball(queries: jax.Array, centres: jax.Array, sq_radii: jax.Array, row_block: int, col_block: int):
    """For each query `(m_pad, d)`: is it within (inclusive) any ball (centres `(n_pad, d)`, squared radii
    `(n_pad,)`, padding marked by radius -inf)? Returns bool `(m_pad,)`."""
    centre_sq = jnp.sum(centres * centres, axis=1)
    col_blocks = (_blocks(centres, col_block), _blocks(centre_sq, col_block), _blocks(sq_radii, col_block))

    def one_row_block(row_args):
        rows, row_sq = row_args

        def scan_columns(found, col_args):
            cols, col_sq, col_radii = col_args
            d2 = _squared_distances(rows, row_sq, cols, col_sq)
            return found | jnp.any(d2 <= col_radii[None, :], axis=1), None

        found, _ = jax.lax.scan(scan_columns, jnp.zeros(rows.shape[0], dtype=bool), col_blocks)
        return found

    query_sq = jnp.sum(queries * queries, axis=1)
    inside = jax.lax.map(one_row_block, (_blocks(queries, row_block), _blocks(query_sq, row_block)))
    return inside.reshape(-1)


def _block_sizes(n: int, row_block: int, col_block: int) -> tuple[int, int]:
    # Small sets: one block covering the set (rounded up to 8) instead of a mostly-padding tile.
    cap = -(-n // 8) * 8
    return min(row_block, cap), min(col_block, cap)


def _padded(x: jax.Array, row_block: int, col_block: int) -> jax.Array:
    return _pad_rows(x, int(np.lcm(row_block, col_block)))


def manifold_sq_radii(
    points: jax.Array, k: int = DEFAULT_K, row_block: int = DEFAULT_ROW_BLOCK, col_block: int = DEFAULT_COL_BLOCK
) -> jax.Array:
    """Squared k-th nearest-neighbour distance of each of `points` `(n, d)` within the set (self excluded),
    shape `(n,)`. Duplicates of a point are other points (distance 0), not itself."""
    n = int(points.shape[0])
    if not 1 <= k < n:
        raise ValueError(f"k-NN radii need 1 <= k < number of vectors; got k={k} with {n} vectors")
    row_block, col_block = _block_sizes(n, row_block, col_block)
    padded = _padded(jnp.asarray(points, jnp.float32), row_block, col_block)
    return _kth_neighbour_sq_radii(padded, jnp.asarray(n), k, row_block, col_block)[:n]


def manifold_membership(
    queries: jax.Array,
    points: jax.Array,
    sq_radii: jax.Array,
    row_block: int = DEFAULT_ROW_BLOCK,
    col_block: int = DEFAULT_COL_BLOCK,
) -> jax.Array:
    """bool `(m,)`: is each of `queries` `(m, d)` inside the manifold of `points` `(n, d)` with squared radii
    `(n,)` (from `manifold_sq_radii`)?"""
    m, n = int(queries.shape[0]), int(points.shape[0])
    query_row_block, _ = _block_sizes(m, row_block, col_block)
    _, point_col_block = _block_sizes(n, row_block, col_block)
    queries_padded = _pad_rows(jnp.asarray(queries, jnp.float32), query_row_block)
    points_padded = _pad_rows(jnp.asarray(points, jnp.float32), point_col_block)
    radii_padded = jnp.pad(
        jnp.asarray(sq_radii, jnp.float32), (0, points_padded.shape[0] - n), constant_values=-jnp.inf
    )
    inside = _inside_any_ball(queries_padded, points_padded, radii_padded, query_row_block, point_col_block)
    return inside[:m]


def precision_recall(
    real: ArrayLike,
    generated: ArrayLike,
    k: int = DEFAULT_K,
    row_block: int = DEFAULT_ROW_BLOCK,
    col_block: int = DEFAULT_COL_BLOCK,
) -> PrecisionRecall:
    """Manifold precision, recall and F1 of `generated` `(m, d)` against `real` `(n, d)` features."""
    for name, x in (("real", real), ("generated", generated)):
        if x.ndim != 2:
            raise ValueError(f"{name}: expected features of shape (n, dim), got shape {tuple(x.shape)}")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]} vs generated {generated.shape[1]}")
    real = jnp.asarray(real, jnp.float32)
    generated = jnp.asarray(generated, jnp.float32)
    if not (bool(jnp.all(jnp.isfinite(real))) and bool(jnp.all(jnp.isfinite(generated)))):
        raise ValueError("precision_recall: non-finite values (NaN or inf) in the features")
    # Distances are translation invariant; centring keeps |a|^2 + |b|^2 - 2ab from cancelling badly.
    centre = jnp.mean(real, axis=0)
    real, generated = real - centre, generated - centre
    real_radii = manifold_sq_radii(real, k, row_block, col_block)
    generated_radii = manifold_sq_radii(generated, k, row_block, col_block)
    # Counted on the host so the fractions are exact (a float32 mean of 100k booleans is not).
    precision = float(np.mean(np.asarray(manifold_membership(generated, real, real_radii, row_block, col_block))))
    recall = float(np.mean(np.asarray(manifold_membership(real, generated, generated_radii, row_block, col_block))))
    f1 = 0.0 if precision + recall == 0.0 else 2.0 * precision * recall / (precision + recall)
    return PrecisionRecall(precision=precision, recall=recall, f1=f1, k=k)
