"""FID / rFID against independent float64 NumPy/SciPy computations."""

import jax
import numpy as np
import pytest
import scipy.linalg

from diffusets_jax.metrics.fid import FeatureStatistics, feature_statistics, fid, frechet_distance, rfid


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID with scipy.linalg.sqrtm of the (non-symmetric) product, valid for full-rank covariances."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(root)))


def eigen_trace_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Rank-safe reference: S_a S_b is similar to a PSD matrix, so Tr((S_a S_b)^1/2) = sum sqrt(eig(S_a S_b)),
    with the eigenvalues from the general (non-symmetric) solver."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.clip(np.real(np.linalg.eigvals(cov_a @ cov_b)), 0.0, None)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(eigenvalues)))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_full_rank_matches_scipy_sqrtm(rng):
    mixing = rng.normal(size=(16, 16))
    real = rng.normal(size=(600, 16)) @ mixing
    generated = rng.normal(size=(500, 16)) @ (mixing + 0.3 * rng.normal(size=(16, 16))) + 0.5
    expected = reference_fid(real, generated)
    assert expected > 1.0
    assert fid(real, generated) == pytest.approx(expected, rel=2e-5)


def test_batched_and_streamed_statistics_equal_one_shot(rng):
    features = rng.normal(size=(257, 8)) * 3.0 + 7.0
    whole = feature_statistics(features, batch_size=10_000)
    batched = feature_statistics(features, batch_size=16)
    streamed = feature_statistics(iter([features[:100], features[100:101], features[101:]]))
    for stats in (batched, streamed):
        assert stats.count == 257
        np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole.covariance, np.cov(features, rowvar=False), rtol=1e-5, atol=1e-5)
    merged = feature_statistics(features[:50]).merge(feature_statistics(features[50:]))
    np.testing.assert_allclose(merged.scatter, whole.scatter, rtol=1e-5)


def test_large_common_offset_does_not_lose_precision(rng):
    # A float32 running sum of squares would cancel catastrophically at offset 1e3 with unit spread.
    a = rng.normal(size=(4000, 6))
    b = rng.normal(size=(4000, 6)) * 1.1 + 0.2
    offset = 1000.0
    assert fid(a + offset, b + offset, batch_size=512) == pytest.approx(reference_fid(a, b), rel=1e-3)


def test_rank_deficient_fewer_samples_than_dimensions(rng):
    d = 64
    real = rng.normal(size=(40, d))  # rank 39 covariance in 64-d
    generated = rng.normal(size=(30, d)) * 0.8 + 0.1
    expected = eigen_trace_fid(real, generated)
    value = fid(real, generated)
    assert np.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-4)
    # Identical rank-deficient sets are at distance 0 (sqrtm-based code returns noise or complex values here).
    assert abs(fid(real, real)) < 1e-6 * np.trace(np.cov(real, rowvar=False))


def test_closed_form_for_diagonal_covariances_with_zero_variances():
    var_a = np.array([4.0, 1.0, 0.0, 0.0, 2.0])
    var_b = np.array([1.0, 0.0, 9.0, 0.0, 2.0])
    mean_a, mean_b = np.zeros(5), np.arange(5.0)
    n = 11
    stats_a = FeatureStatistics(count=n, mean=mean_a, scatter=np.diag(var_a) * (n - 1))
    stats_b = FeatureStatistics(count=n, mean=mean_b, scatter=np.diag(var_b) * (n - 1))
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-12)
    assert fid(stats_a, stats_b) == pytest.approx(expected, rel=1e-12)


def test_rfid_with_key_and_explicit_split(rng):
    real = rng.normal(size=(400, 8))
    close = rng.normal(size=(400, 8))
    far = rng.normal(size=(400, 8)) * 2.0 + 1.0
    key = jax.random.key(0)
    good, bad = rfid(real, close, key=key), rfid(real, far, key=key)
    assert good.value == pytest.approx(good.fid / good.real_vs_real_fid)
    assert bad.value > 20 * good.value
    split = (np.arange(0, 400, 2), np.arange(1, 400, 2))
    explicit = rfid(real, close, split=split)
    assert explicit.real_vs_real_fid == pytest.approx(reference_fid(real[::2], real[1::2]), rel=1e-4)
    assert explicit.fid == pytest.approx(reference_fid(real, close), rel=1e-4)
    # Same key, same halves: deterministic.
    assert rfid(real, close, key=key) == good


def test_rfid_needs_exactly_one_of_key_or_split(rng):
    real = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="exactly one"):
        rfid(real, real)
    with pytest.raises(ValueError, match="exactly one"):
        rfid(real, real, key=jax.random.key(0), split=(np.arange(5), np.arange(5, 10)))
    with pytest.raises(ValueError, match="disjoint"):
        rfid(real, real, split=(np.arange(6), np.arange(4, 10)))


def test_bad_features_are_rejected(rng):
    good = rng.normal(size=(20, 4))
    with pytest.raises(ValueError, match="non-finite"):
        fid(good, np.full((20, 4), np.nan))
    with pytest.raises(ValueError, match=r"shape \(n, dim\)"):
        fid(good, good[None])
    with pytest.raises(ValueError, match="dimensions differ"):
        fid(good, good[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        fid(good, good[:1])


def test_device_sharded_features_give_the_same_fid(rng):
    real = rng.normal(size=(64, 5))
    generated = rng.normal(size=(48, 5)) + 0.3
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = fid(jax.device_put(real.astype(np.float32), sharding), jax.device_put(generated.astype(np.float32), sharding))
    assert sharded == pytest.approx(reference_fid(real, generated), rel=1e-5)


def test_python_lists_of_feature_vectors_are_one_feature_set(rng):
    """A list of per-ECG feature vectors failed with "'list' object has no attribute 'ndim'"."""
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 0.3
    assert fid(a.tolist(), b.tolist()) == pytest.approx(fid(a, b), rel=1e-12)
    assert fid(list(a), b) == pytest.approx(fid(a, b), rel=1e-12)  # a list of (d,) arrays
    key = jax.random.PRNGKey(0)
    assert rfid(a.tolist(), b.tolist(), key=key) == rfid(a, b, key=key)
    with pytest.raises(ValueError, match=r"features_a: expected features of shape \(n, dim\), got shape \(6,\)"):
        fid(a[0].tolist(), b)
