import numpy as np
import pytest

from diffusets_jax.metrics.bootstrap import cluster_bootstrap


def test_point_value_is_the_ratio_of_sums():
    num = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 1.0]])
    den = np.array([[1.0, 4.0], [1.0, 0.0], [1.0, 4.0]])
    value, low, high = cluster_bootstrap(num, den, n_boot=200, seed=0)
    np.testing.assert_allclose(value, [3.0, 3.0 / 8.0])
    assert np.all(low <= value) and np.all(value <= high)


def test_matches_a_direct_resampling_loop():
    # Independent computation: draw patients with replacement, concatenate their records, take the mean.
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(30), rng.integers(1, 4, 30))
    values = rng.normal(size=patients.size) + 0.5 * patients / 30
    value, low, high = cluster_bootstrap(values, np.ones_like(values), patients, n_boot=4000, seed=1)
    draws = np.random.default_rng(2)
    means = []
    for _ in range(4000):
        chosen = draws.integers(0, 30, 30)
        means.append(np.concatenate([values[patients == p] for p in chosen]).mean())
    assert value == pytest.approx(values.mean())
    assert low == pytest.approx(np.percentile(means, 2.5), abs=0.04)
    assert high == pytest.approx(np.percentile(means, 97.5), abs=0.04)


def test_clustering_widens_the_interval_of_duplicated_patients():
    # Ten copies of each of 40 patients carry the information of 40 records, not 400.
    values = np.random.default_rng(0).normal(size=40)
    copies = np.repeat(values, 10)
    patients = np.repeat(np.arange(40), 10)
    _, lo_c, hi_c = cluster_bootstrap(copies, np.ones(400), patients, n_boot=2000, seed=0)
    _, lo_r, hi_r = cluster_bootstrap(copies, np.ones(400), None, n_boot=2000, seed=0)
    _, lo_1, hi_1 = cluster_bootstrap(values, np.ones(40), None, n_boot=2000, seed=0)
    assert (hi_c - lo_c) == pytest.approx(hi_1 - lo_1, rel=0.15)
    assert (hi_r - lo_r) < 0.5 * (hi_c - lo_c)


def test_seeded_and_nan_where_nothing_was_measured():
    num, den = np.array([1.0, 0.0, 2.0]), np.array([1.0, 0.0, 1.0])
    assert cluster_bootstrap(num, den, seed=5) == cluster_bootstrap(num, den, seed=5)
    value, low, high = cluster_bootstrap(np.zeros(3), np.zeros(3))
    assert np.isnan(value) and np.isnan(low) and np.isnan(high)


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-finite"):
        cluster_bootstrap(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="clusters: expected one patient id per record"):
        cluster_bootstrap(np.ones(3), np.ones(3), np.arange(2))
    with pytest.raises(ValueError, match="level"):
        cluster_bootstrap(np.ones(3), np.ones(3), level=95)
