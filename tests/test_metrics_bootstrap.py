import numpy as np
import pytest
from scipy import stats

from diffusets_jax.metrics.bootstrap import bootstrap_statistic, cluster_bootstrap
from diffusets_jax.metrics.classification import roc_auc


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


# bootstrap_statistic: any metric (AUROC, average precision) recomputed on each resample's records.


def test_statistic_and_ratio_of_sums_share_the_draws():
    rng = np.random.default_rng(4)
    patients = np.repeat(np.arange(20), rng.integers(1, 4, 20))
    values = rng.normal(size=patients.size)
    _, low, high = cluster_bootstrap(values, np.ones_like(values), patients, n_boot=300, seed=9)
    interval = bootstrap_statistic(lambda idx: {"mean": values[idx].mean()}, patients, n_boot=300, seed=9)["mean"]
    assert (interval.low, interval.high) == pytest.approx((low, high))
    assert interval.value == pytest.approx(values.mean()) and interval.valid == 300
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_statistic(lambda i: {"m": 0.0}, 3, n_boot=0)
    with pytest.raises(ValueError, match="no records"):
        bootstrap_statistic(lambda i: {"m": 0.0}, 0)


def test_bootstrap_matches_scipy_percentile_interval():
    x = np.random.default_rng(2).normal(1.0, 2.0, 200)
    ours = bootstrap_statistic(lambda idx: {"mean": x[idx].mean()}, len(x), n_boot=4000, seed=0)["mean"]
    theirs = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                             random_state=np.random.default_rng(1)).confidence_interval
    assert ours.value == pytest.approx(x.mean())
    # Independent draws: the two Monte-Carlo intervals agree to a few hundredths of the sd (0.14).
    assert ours.low == pytest.approx(theirs.low, abs=0.03) and ours.high == pytest.approx(theirs.high, abs=0.03)
    assert ours.valid == 4000


def test_clustered_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(3)
    patient_values = rng.normal(size=25)
    groups = np.repeat(np.arange(25), 3)  # 3 identical records per patient
    records = patient_values[groups]
    seen = []

    def mean_of(idx):
        seen.append(idx)
        return {"mean": records[idx].mean()}

    # Patient ids are arbitrary numbers (here increasing, so patient k is the k-th cluster in both runs).
    clustered = bootstrap_statistic(mean_of, 10_000 + 7 * groups, n_boot=500, seed=7)["mean"]
    for idx in seen[1:]:  # every drawn patient brings all 3 of its records
        assert np.all(np.bincount(groups[idx], minlength=25) % 3 == 0)
    # The same draws over patients directly: with identical records per patient the means are equal.
    direct = bootstrap_statistic(lambda idx: {"mean": patient_values[idx].mean()}, 25, n_boot=500, seed=7)["mean"]
    assert (clustered.low, clustered.high) == pytest.approx((direct.low, direct.high))
    # Treating the 75 records as independent would understate the uncertainty.
    naive = bootstrap_statistic(lambda idx: {"mean": records[idx].mean()}, 75, n_boot=500, seed=7)["mean"]
    assert naive.high - naive.low < 0.75 * (clustered.high - clustered.low)


def test_bootstrap_leaves_undefined_resamples_out():
    labels = np.array([1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])
    interval = bootstrap_statistic(lambda idx: {"auroc": roc_auc(labels[idx], scores[idx])}, 6, n_boot=300, seed=0)["auroc"]
    assert interval.value == 1.0 and 0 < interval.valid < 300  # some resamples miss the one positive
    assert interval.low == interval.high == 1.0
