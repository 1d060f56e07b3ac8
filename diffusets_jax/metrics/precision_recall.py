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
tile per device, so 100k x 100k comparisons run in a few hundred MB. Given a `Mesh`, the query rows are split
over one of its axes with `shard_map` (reference vectors replicated: 100k x 64 float32 is 25 MB), so every
device of a node or pod slice scans its share.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def _radii_kernel(rows, row_index, points, n_valid, *, k: int, row_block: int, col_block: int):
    """Squared distance from each of `rows` `(r_pad, d)` (global indices `row_index`) to its k-th nearest
    point of `points` `(n_pad, d)`, skipping itself and padding (index >= n_valid). Returns `(r_pad,)`."""
    sq = jnp.sum(points * points, axis=1)
    index = jnp.arange(points.shape[0])
    col_blocks = (_blocks(points, col_block), _blocks(sq, col_block), _blocks(index, col_block))
    kept_per_block = min(k, col_block)

    def one_row_block(row_args):
        block_rows, block_index = row_args
        block_sq = jnp.sum(block_rows * block_rows, axis=1)

        def scan_columns(best, col_args):
            cols, col_sq, col_index = col_args
            d2 = _squared_distances(block_rows, block_sq, cols, col_sq)
            excluded = (col_index[None, :] >= n_valid) | (col_index[None, :] == block_index[:, None])
            d2 = jnp.where(excluded, jnp.inf, d2)
            block_smallest = -jax.lax.top_k(-d2, kept_per_block)[0]
            merged = jnp.concatenate([best, block_smallest], axis=1)
            return -jax.lax.top_k(-merged, k)[0], None

        best = jnp.full((block_rows.shape[0], k), jnp.inf, dtype=block_rows.dtype)
        best, _ = jax.lax.scan(scan_columns, best, col_blocks)
        return best[:, k - 1]

    return jax.lax.map(one_row_block, (_blocks(rows, row_block), _blocks(row_index, row_block))).reshape(-1)


def _membership_kernel(queries, centres, sq_radii, *, row_block: int, col_block: int):
    """For each query `(m_pad, d)`: is it within (inclusive) any ball (centres `(n_pad, d)`, squared radii
    `(n_pad,)`, padding marked by radius -inf)? Returns bool `(m_pad,)`."""
    centre_sq = jnp.sum(centres * centres, axis=1)
    col_blocks = (_blocks(centres, col_block), _blocks(centre_sq, col_block), _blocks(sq_radii, col_block))

    def one_row_block(block_rows):
        block_sq = jnp.sum(block_rows * block_rows, axis=1)

        def scan_columns(found, col_args):
            cols, col_sq, col_radii = col_args
            d2 = _squared_distances(block_rows, block_sq, cols, col_sq)
            return found | jnp.any(d2 <= col_radii[None, :], axis=1), None

        found, _ = jax.lax.scan(scan_columns, jnp.zeros(block_rows.shape[0], dtype=bool), col_blocks)
        return found

    return jax.lax.map(one_row_block, _blocks(queries, row_block)).reshape(-1)


@functools.lru_cache(maxsize=64)
def _compiled(kernel_name: str, mesh: Mesh | None, axis: str, **static):
    """The jitted kernel; with a mesh, query rows are split over `axis` (reference set replicated), so
    each device scans its share of rows against all reference vectors."""
    kernel = functools.partial({"radii": _radii_kernel, "membership": _membership_kernel}[kernel_name], **static)
    if mesh is None:
        return jax.jit(kernel)
    rows, replicated = PartitionSpec(axis), PartitionSpec()
    in_specs = (rows, rows, replicated, replicated) if kernel_name == "radii" else (rows, replicated, replicated)
    shardings = tuple(NamedSharding(mesh, spec) for spec in in_specs)
    # check_vma=False: each shard's work is independent (no collectives), so there is nothing for the
    # varying-manual-axes checker to protect, and it would reject the scans' freshly built initial carries.
    compiled = jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False))

    def placed(*args):
        # device_put first: with explicitly typed mesh axes, shard_map accepts only arrays already laid out.
        return compiled(*(jax.device_put(arg, sharding) for arg, sharding in zip(args, shardings, strict=True)))

    return placed


def _block_sizes(n: int, row_block: int, col_block: int) -> tuple[int, int]:
    # Small sets: one block covering the set (rounded up to 8) instead of a mostly-padding tile.
    cap = -(-n // 8) * 8
    return min(row_block, cap), min(col_block, cap)


def _row_shards(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None else int(mesh.shape[axis])


def manifold_sq_radii(
    points: ArrayLike,
    k: int = DEFAULT_K,
    row_block: int = DEFAULT_ROW_BLOCK,
    col_block: int = DEFAULT_COL_BLOCK,
    mesh: Mesh | None = None,
    axis: str = "data",
) -> np.ndarray:
    """Squared k-th nearest-neighbour distance of each of `points` `(n, d)` within the set (self excluded),
    shape `(n,)`. Duplicates of a point are other points (distance 0), not itself."""
    n = int(points.shape[0])
    if not 1 <= k < n:
        raise ValueError(f"k-NN radii need 1 <= k < number of vectors; got k={k} with {n} vectors")
    row_block, col_block = _block_sizes(n, row_block, col_block)
    points = jnp.asarray(points, jnp.float32)
    rows = _pad_rows(points, row_block * _row_shards(mesh, axis))
    row_index = jnp.arange(rows.shape[0])
    kernel = _compiled("radii", mesh, axis, k=k, row_block=row_block, col_block=col_block)
    # One value per row: gathered to the host, where slicing off the padding needs no collective.
    return np.asarray(kernel(rows, row_index, _pad_rows(points, col_block), jnp.asarray(n)))[:n]


def manifold_membership(
    queries: ArrayLike,
    points: ArrayLike,
    sq_radii: ArrayLike,
    row_block: int = DEFAULT_ROW_BLOCK,
    col_block: int = DEFAULT_COL_BLOCK,
    mesh: Mesh | None = None,
    axis: str = "data",
) -> np.ndarray:
    """bool `(m,)`: is each of `queries` `(m, d)` inside the manifold of `points` `(n, d)` with squared radii
    `(n,)` (from `manifold_sq_radii`)?"""
    m, n = int(queries.shape[0]), int(points.shape[0])
    query_row_block, _ = _block_sizes(m, row_block, col_block)
    _, point_col_block = _block_sizes(n, row_block, col_block)
    queries_padded = _pad_rows(jnp.asarray(queries, jnp.float32), query_row_block * _row_shards(mesh, axis))
    points_padded = _pad_rows(jnp.asarray(points, jnp.float32), point_col_block)
    radii_padded = jnp.pad(
        jnp.asarray(sq_radii, jnp.float32), (0, points_padded.shape[0] - n), constant_values=-jnp.inf
    )
    kernel = _compiled("membership", mesh, axis, row_block=query_row_block, col_block=point_col_block)
    return np.asarray(kernel(queries_padded, points_padded, radii_padded))[:m]


def precision_recall(
    real: ArrayLike,
    generated: ArrayLike,
    k: int = DEFAULT_K,
    row_block: int = DEFAULT_ROW_BLOCK,
    col_block: int = DEFAULT_COL_BLOCK,
    mesh: Mesh | None = None,
    axis: str = "data",
) -> PrecisionRecall:
    """Manifold precision, recall and F1 of `generated` `(m, d)` against `real` `(n, d)` features.

    With a `mesh`, the query rows of every pass are split over its `axis` (e.g. all GPUs of a node:
    `parallel.make_mesh()`); the result does not depend on the mesh.
    """
    # Python lists of feature vectors failed below with "'list' object has no attribute 'ndim'".
    real, generated = (x if hasattr(x, "ndim") else np.asarray(x) for x in (real, generated))
    for name, x in (("real", real), ("generated", generated)):
        if x.ndim != 2:
            raise ValueError(f"{name}: expected features of shape (n, dim), got shape {tuple(x.shape)}")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]} vs generated {generated.shape[1]}")
    # Features are gathered to the host once (n x 64 float32: 25 MB at 100k), then placed by the kernels:
    # device-sharded inputs would otherwise carry their layout into the padding and blocking below.
    real = jnp.asarray(np.asarray(real, np.float32))
    generated = jnp.asarray(np.asarray(generated, np.float32))
    if not (bool(jnp.all(jnp.isfinite(real))) and bool(jnp.all(jnp.isfinite(generated)))):
        raise ValueError("precision_recall: non-finite values (NaN or inf) in the features")
    # Distances are translation invariant; centring keeps |a|^2 + |b|^2 - 2ab from cancelling badly.
    centre = jnp.mean(real, axis=0)
    real, generated = real - centre, generated - centre
    blocks = dict(row_block=row_block, col_block=col_block, mesh=mesh, axis=axis)
    real_radii = manifold_sq_radii(real, k, **blocks)
    generated_radii = manifold_sq_radii(generated, k, **blocks)
    # Counted on the host so the fractions are exact (a float32 mean of 100k booleans is not).
    precision = float(np.mean(manifold_membership(generated, real, real_radii, **blocks)))
    recall = float(np.mean(manifold_membership(real, generated, generated_radii, **blocks)))
    f1 = 0.0 if precision + recall == 0.0 else 2.0 * precision * recall / (precision + recall)
    return PrecisionRecall(precision=precision, recall=recall, f1=f1, k=k)
