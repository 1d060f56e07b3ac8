"""Fréchet distance between feature sets (FID) and the relative FID (rFID) of the DiffuSETS paper.

FID(a, b) = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) on the CLIP ECG-tower features (reference
spec section 8); rFID = FID(real, generated) / FID(real half A, real half B).

Numerics, and why they are split between JAX and NumPy:
- Means and covariances are accumulated batch by batch, so any number of features (or a stream of feature
  batches straight from the feature extractor) fits in memory. Each batch's mean and *centred* scatter matrix
  are computed by a jitted JAX function on the accelerator in float32 (the only O(n d^2) work); batches are
  merged on the host in float64 with Chan et al.'s pairwise update, which neither loses precision to a
  large common offset nor to a large n.
- The final step works on two d x d matrices (d = 64 for the DiffuSETS CLIP features) once per FID, so it
  runs in NumPy float64 on the host. Float64 inside JAX would need the process-wide `jax_enable_x64` switch
  (the `enable_x64` context manager is experimental, not thread-safe and forces re-tracing); for a 64 x 64
  eigendecomposition that buys nothing.
- (S_a S_b)^{1/2} is not symmetric, and `scipy.linalg.sqrtm` of it fails or turns complex when either
  covariance is singular (fewer samples than dimensions, or collapsed features). We use the identity
  Tr((S_a S_b)^{1/2}) = Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}): both square roots are of symmetric positive
  semi-definite matrices, taken by symmetric eigendecomposition with round-off negative eigenvalues clipped
  to zero, so the result is real and exact for rank-deficient covariances too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = np.ndarray | jax.Array

DEFAULT_BATCH_SIZE = 8192


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Running first and second moments of a feature set, in float64.

    `scatter` is the sum over samples of (x - mean)(x - mean)^T, shape `(d, d)`; `mean` has shape `(d,)`.
    Build with `feature_statistics(...)`; combine partial statistics (e.g. from several hosts) with `merge`.
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance `(d, d)` (divides by n - 1, like `np.cov`)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self.scatter / (self.count - 1)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Statistics of the union of both sets (Chan, Golub & LeVeque's pairwise update)."""
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {self.dim}-d and {other.dim}-d features")
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / count)
        return FeatureStatistics(count=count, mean=mean, scatter=scatter)


@jax.jit
def _batch_moments(batch: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean `(d,)` and centred scatter `(d, d)`, in float32, of the first `count` rows of a `(b, d)` batch
    (the rest is padding: batches are padded to a power of two so a stream of ragged batches compiles a
    handful of shapes, not one per batch size)."""
    batch = batch.astype(jnp.float32)
    valid = (jnp.arange(batch.shape[0]) < count).astype(jnp.float32)[:, None]
    mean = jnp.sum(batch * valid, axis=0) / count
    centred = (batch - mean) * valid
    # HIGHEST: on GPUs/TPUs the default float32 matmul precision is TF32/bfloat16, far too coarse here.
    scatter = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
    return mean, scatter


def _padded_batch(batch: ArrayLike) -> jax.Array:
    rows = int(batch.shape[0])
    padded_rows = max(8, 1 << (rows - 1).bit_length())
    batch = jnp.asarray(batch)
    return jnp.pad(batch, ((0, padded_rows - rows), (0, 0))) if padded_rows > rows else batch


def _check_features(batch: ArrayLike, what: str) -> None:
    # np.shape, not .shape: a Python list of rows failed here with "'list' object has no attribute 'ndim'".
    if len(np.shape(batch)) != 2:
        raise ValueError(f"{what}: expected features of shape (n, dim), got shape {tuple(np.shape(batch))}")


def _as_features(features: ArrayLike | Iterable[ArrayLike]) -> ArrayLike | Iterable[ArrayLike]:
    """A list or tuple of feature vectors (Python lists or 1-d arrays) as one `(n, d)` array; anything else as it is
    (an array, or an iterable of `(b, d)` batches)."""
    if isinstance(features, (list, tuple)) and len(features) and np.ndim(features[0]) <= 1:
        return np.asarray(features)
    return features


def feature_statistics(
    features: ArrayLike | Iterable[ArrayLike], batch_size: int = DEFAULT_BATCH_SIZE, what: str = "features"
) -> FeatureStatistics:
    """Mean and scatter of `features`: one `(n, d)` array, or an iterable of `(b, d)` batches (streamed).

    Non-finite features raise a ValueError: a NaN would silently turn the FID into NaN. A list of `(d,)` vectors is
    one set.
    """
    features = _as_features(features)
    if hasattr(features, "ndim"):
        _check_features(features, what)
        batches: Iterable[ArrayLike] = (features[i : i + batch_size] for i in range(0, features.shape[0], batch_size))
    else:
        batches = features
    stats: FeatureStatistics | None = None
    for batch in batches:
        _check_features(batch, what)
        # Via the host: a batch is small (b x 64), and a device-sharded batch (e.g. straight from a data-parallel
        # feature extractor under an explicitly sharded mesh) would otherwise need its own reduction sharding.
        batch = np.asarray(batch)
        if batch.shape[0] == 0:
            continue
        mean, scatter = jax.device_get(_batch_moments(_padded_batch(batch), jnp.float32(batch.shape[0])))
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scatter))):
            raise ValueError(f"{what}: non-finite values (NaN or inf) in the features; check the feature extractor")
        part = FeatureStatistics(
            count=int(batch.shape[0]), mean=mean.astype(np.float64), scatter=scatter.astype(np.float64)
        )
        stats = part if stats is None else stats.merge(part)
    if stats is None:
        raise ValueError(f"{what}: no feature vectors given")
    return stats


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix; round-off negatives -> 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(stats_a: FeatureStatistics, stats_b: FeatureStatistics) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (float64)."""
    if stats_a.dim != stats_b.dim:
        raise ValueError(f"feature dimensions differ: {stats_a.dim} vs {stats_b.dim}")
    cov_a, cov_b = stats_a.covariance, stats_b.covariance
    diff = stats_a.mean - stats_b.mean
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    middle_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(middle_eigenvalues, 0.0, None))))
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def fid(
    features_a: ArrayLike | FeatureStatistics,
    features_b: ArrayLike | FeatureStatistics,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """FID between two feature sets, each `(n, d)` (n may differ, and may be smaller than d).

    Either argument may also be precomputed `FeatureStatistics` (e.g. of the real set, computed once).
    """
    stats_a = features_a if isinstance(features_a, FeatureStatistics) else feature_statistics(
        features_a, batch_size, "features_a"
    )
    stats_b = features_b if isinstance(features_b, FeatureStatistics) else feature_statistics(
        features_b, batch_size, "features_b"
    )
    return frechet_distance(stats_a, stats_b)


class UndefinedRelativeFID(ValueError):
    """rFID's real-vs-real FID is zero (or below it by round-off), so the ratio is undefined: the real features are
    duplicated or constant (a CLIP whose ECG tower collapsed gives every ECG one feature vector). `fid` and
    `real_vs_real_fid` hold the two FIDs, for a caller that reports them rather than stopping."""

    def __init__(self, message: str, fid: float, real_vs_real_fid: float) -> None:
        super().__init__(message)
        self.fid = fid
        self.real_vs_real_fid = real_vs_real_fid


@dataclasses.dataclass(frozen=True)
class RelativeFID:
    """rFID = `fid` / `real_vs_real_fid`: how far generated features are from the real ones, in units of
    the distance between two random halves of the real set (1.0 = as close as real data is to itself)."""

    value: float
    fid: float
    real_vs_real_fid: float


def rfid(
    real: ArrayLike,
    generated: ArrayLike,
    *,
    key: jax.Array | None = None,
    split: tuple[ArrayLike, ArrayLike] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RelativeFID:
    """Relative FID of `generated` `(m, d)` against `real` `(n, d)`.

    The real-vs-real baseline compares two disjoint halves of `real`: either a random split drawn with
    `key` (a `jax.random` key; with odd n one real vector is left out) or an explicit `split` of two index
    arrays. Exactly one of the two must be given. Note the baseline uses n/2 samples per side while the
    numerator uses all of them, as in the paper; FID is biased upwards for small samples, so compare rFIDs
    computed with the same set sizes.
    """
    if (key is None) == (split is None):
        raise ValueError("rfid needs exactly one of `key` (random halves of the real set) or `split` (index arrays)")
    real = np.asarray(_as_features(real)) if not hasattr(real, "ndim") else real
    _check_features(real, "real")
    n = int(real.shape[0])
    if split is None:
        permutation = np.asarray(jax.random.permutation(key, n))
        half = n // 2
        index_a, index_b = permutation[:half], permutation[half : 2 * half]
    else:
        index_a, index_b = (np.asarray(index) for index in split)
        if np.intersect1d(index_a, index_b).size:
            raise ValueError("rfid: the two halves of `split` share indices; they must be disjoint")
    if min(len(index_a), len(index_b)) < 2:
        raise ValueError(f"rfid: each real half needs at least 2 vectors (real set has {n})")
    stats_real = feature_statistics(real, batch_size, "real")
    fid_generated = frechet_distance(stats_real, feature_statistics(generated, batch_size, "generated"))
    fid_real = frechet_distance(
        feature_statistics(real[index_a], batch_size, "real half A"),
        feature_statistics(real[index_b], batch_size, "real half B"),
    )
    if fid_real <= 0.0:
        raise UndefinedRelativeFID(
            f"rfid: the real-vs-real FID is {fid_real:.3g}, so the ratio is undefined; are the real features "
            "duplicated or constant?", fid_generated, fid_real
        )
    return RelativeFID(value=fid_generated / fid_real, fid=fid_generated, real_vs_real_fid=fid_real)
