"""Patient-clustered bootstrap intervals, one function for every metric.

Records of one patient are not independent, so resampling records would make intervals too narrow. Patients
(clusters) are drawn with replacement, each bringing all of its records. Every metric here is a ratio of sums over
records, sum(numerator) / sum(denominator): a mean over measured records (numerator = value, denominator = 1 where
measured), a share (numerator = 0/1), or pooled precision/recall/F1 (numerator = true positives, denominator = the
detections or the reference beats). A resample counts each cluster as often as it was drawn, so all metrics are
computed at once from the same draws as one matrix product.
"""

from __future__ import annotations

import numpy as np


def cluster_bootstrap(
    numerators: np.ndarray,
    denominators: np.ndarray,
    clusters: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point value and percentile interval of sum(numerators) / sum(denominators) for each metric.

    `numerators`, `denominators` `(records, metrics)` (or `(records,)` for one metric); `clusters` `(records,)`
    patient ids (None: every record is its own patient). Returns `(value, low, high)`, each `(metrics,)` (scalars
    for 1-D input): NaN where the denominator sums to zero; resamples whose denominator is zero are left out of
    the interval. `seed` seeds a numpy Generator: the same inputs and seed give the same interval.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    one_metric = num.ndim == 1
    num, den = np.atleast_2d(num.T).T, np.atleast_2d(den.T).T
    if num.shape != den.shape or num.ndim != 2:
        raise ValueError(f"numerators {num.shape} and denominators {den.shape}: expected equal (records, metrics)")
    if not (np.all(np.isfinite(num)) and np.all(np.isfinite(den))):
        raise ValueError("numerators/denominators: non-finite entry; give unmeasured records numerator 0, denominator 0")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a coverage in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot: expected at least 1 resample, got {n_boot}")
    n = num.shape[0]
    ids = np.arange(n) if clusters is None else np.asarray(clusters)
    if ids.shape != (n,):
        raise ValueError(f"clusters: expected one patient id per record ({n}), got shape {ids.shape}")
    _, cluster_of = np.unique(ids, return_inverse=True)
    n_clusters = int(cluster_of.max()) + 1 if n else 0
    cluster_num = np.zeros((n_clusters, num.shape[1]))
    cluster_den = np.zeros((n_clusters, num.shape[1]))
    np.add.at(cluster_num, cluster_of, num)
    np.add.at(cluster_den, cluster_of, den)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = num.sum(axis=0) / np.where(den.sum(axis=0) > 0, den.sum(axis=0), np.nan)
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot) if n_clusters else (
            np.zeros((n_boot, 0)))
        boot_den = counts @ cluster_den
        boot = (counts @ cluster_num) / np.where(boot_den > 0, boot_den, np.nan)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.full(num.shape[1], np.nan), np.full(num.shape[1], np.nan)
    for m in range(num.shape[1]):
        finite = boot[:, m][np.isfinite(boot[:, m])]
        if finite.size:
            low[m], high[m] = np.percentile(finite, [tail, 100.0 - tail])
    if one_metric:
        return value[0], low[0], high[0]
    return value, low, high
