"""Manifold precision / recall against brute-force float64 distances (scipy cdist)."""

import jax
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from diffusets_jax.metrics.precision_recall import manifold_sq_radii, precision_recall


def brute_force(real: np.ndarray, generated: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        distances = cdist(points, points)
        np.fill_diagonal(distances, np.inf)  # self excluded (by index, not by value)
        return np.sort(distances, axis=1)[:, k - 1]

    precision = np.mean(np.any(cdist(generated, real) <= radii(real)[None, :], axis=1))
    recall = np.mean(np.any(cdist(real, generated) <= radii(generated)[None, :], axis=1))
    return float(precision), float(recall)


@pytest.mark.parametrize(
    ("k", "row_block", "col_block"),
    [(3, 1024, 4096), (3, 7, 5), (5, 16, 3), (1, 64, 32)],  # k > col_block exercises the running merge
)
def test_matches_brute_force(k, row_block, col_block):
    rng = np.random.default_rng(k + row_block)
    # Equal set sizes: one compiled kernel serves both directions, which keeps the test fast.
    real = rng.normal(size=(181, 10))
    generated = rng.normal(size=(181, 10)) * 1.4 + 0.4
    expected_precision, expected_recall = brute_force(real, generated, k)
    result = precision_recall(real, generated, k=k, row_block=row_block, col_block=col_block)
    assert 0.0 < expected_precision < 1.0 and 0.0 < expected_recall < 1.0  # a discriminating case
    assert result.precision == pytest.approx(expected_precision, abs=1e-12)
    assert result.recall == pytest.approx(expected_recall, abs=1e-12)
    assert result.f1 == pytest.approx(2 * expected_precision * expected_recall / (expected_precision + expected_recall))
    assert result.k == k


def test_radii_match_brute_force_and_exclude_only_self():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 4))
    points[10] = points[11]  # an exact duplicate is another point at distance 0, not "self"
    distances = cdist(points, points)
    np.fill_diagonal(distances, np.inf)
    expected = np.sort(distances, axis=1)[:, 2] ** 2
    got = np.asarray(manifold_sq_radii(points, k=3, row_block=8, col_block=16))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    nearest = np.asarray(manifold_sq_radii(points, k=1))
    assert nearest[10] == 0.0 and nearest[11] == 0.0


def test_boundary_is_inclusive():
    # 1-d lattice: every real radius (k=1) is exactly 1; a generated point at distance exactly 1 counts.
    real = np.arange(5.0)[:, None]
    generated = np.array([[5.0], [6.5]])
    result = precision_recall(real, generated, k=1)
    assert result.precision == 0.5  # 5.0 is on the boundary of 4.0's ball, 6.5 is outside
    assert result.recall == 0.2  # generated radius 1.5 covers only real 4.0
    assert (result.precision, result.recall) == brute_force(real, generated, 1)


def test_mode_collapse_has_high_precision_and_low_recall():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(500, 16))
    mode = real[0]
    generated = mode + 0.01 * rng.normal(size=(400, 16))  # every sample is (nearly) the same realistic ECG
    result = precision_recall(real, generated)
    expected = brute_force(real, generated, 3)
    assert (result.precision, result.recall) == pytest.approx(expected, abs=1e-12)
    assert result.precision > 0.95
    assert result.recall < 0.05
    assert result.f1 < 0.1


def test_same_distribution_scores_high_and_identical_sets_score_one():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 6))
    same = precision_recall(real, real)
    assert same.precision == 1.0 and same.recall == 1.0 and same.f1 == 1.0
    fresh = precision_recall(real, rng.normal(size=(300, 6)))
    assert fresh.precision > 0.6 and fresh.recall > 0.6


def test_bad_inputs():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="k < number"):
        precision_recall(real, real[:3], k=3)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(real, real[:, :2])
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(real, np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match=r"shape \(n, dim\)"):
        precision_recall(real[0], real)


def test_rows_split_over_a_device_mesh_give_the_same_result():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rng = np.random.default_rng(11)
    real = rng.normal(size=(181, 10))
    generated = rng.normal(size=(181, 10)) * 1.4 + 0.4
    sharded = precision_recall(real, generated, row_block=8, col_block=32, mesh=mesh)
    assert (sharded.precision, sharded.recall) == brute_force(real, generated, 3)


def test_device_sharded_inputs_are_accepted():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(5)
    real, generated = rng.normal(size=(64, 4)), rng.normal(size=(64, 4)) + 0.5
    result = precision_recall(jax.device_put(real.astype(np.float32), sharding),
                              jax.device_put(generated.astype(np.float32), sharding))
    assert (result.precision, result.recall) == brute_force(real, generated, 3)


def test_python_lists_of_feature_vectors_are_accepted():
    """Lists of feature vectors failed with "'list' object has no attribute 'ndim'"."""
    rng = np.random.default_rng(5)
    real, generated = rng.normal(size=(20, 3)), rng.normal(size=(15, 3))
    assert precision_recall(real.tolist(), list(generated)) == precision_recall(real, generated)
