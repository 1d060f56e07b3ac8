"""Patient-clustered bootstrap intervals, one function for every metric.

Records of one patient are not independent, so resampling records would make intervals too narrow. Patients
(clusters) are drawn with replacement, each bringing all of its records. Every metric here is a ratio of sums over
records, sum(numerator) / sum(denominator): a mean over measured records (numerator = value, denominator = 1 where
measured), a share (numerator = 0/1), or pooled precision/recall/F1 (numerator = true positives, denominator = the
detections or the reference beats). A resample counts each cluster as often as it was drawn, so all metrics are
computed at once from the same draws as one matrix product. Metrics that are not ratios of sums (AUROC, average
precision) use `bootstrap_statistic`, which recomputes them on each resample's records from the same draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from diffusets_jax.io.files import json_safe


def cluster_draws(clusters: np.ndarray | None, n: int, *, n_boot: int = 1000,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The resamples of a patient-clustered bootstrap: `(cluster_of, counts)`.

    `clusters` `(n,)` patient ids (None: every record is its own patient). `cluster_of` `(n,)` is each record's
    cluster index; `counts` `(n_boot, n_clusters)` how often each cluster is drawn in each resample (as many draws
    as there are clusters, with replacement). `seed` seeds a numpy Generator.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot: expected at least 1 resample, got {n_boot}")
    ids = np.arange(n) if clusters is None else np.asarray(clusters)
    if ids.shape != (n,):
        raise ValueError(f"clusters: expected one patient id per record ({n}), got shape {ids.shape}")
    _, cluster_of = np.unique(ids, return_inverse=True)
    cluster_of = cluster_of.reshape(n)
    n_clusters = int(cluster_of.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot) if n_clusters else (
        np.zeros((n_boot, 0), dtype=np.int64))
    return cluster_of, counts


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(low, high, valid)` per column of `draws` `(n_boot, metrics)`: the percentile interval over the finite
    resamples (NaN where none is) and how many there were."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a coverage in (0, 1), got {level}")
    tail = 100.0 * (1.0 - level) / 2.0
    metrics = draws.shape[1]
    low, high, valid = np.full(metrics, np.nan), np.full(metrics, np.nan), np.zeros(metrics, dtype=np.int64)
    for m in range(metrics):
        finite = draws[:, m][np.isfinite(draws[:, m])]
        valid[m] = finite.size
        if finite.size:
            low[m], high[m] = np.percentile(finite, [tail, 100.0 - tail])
    return low, high, valid


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
    cluster_of, counts = cluster_draws(clusters, num.shape[0], n_boot=n_boot, seed=seed)
    n_clusters = counts.shape[1]
    cluster_num = np.zeros((n_clusters, num.shape[1]))
    cluster_den = np.zeros((n_clusters, num.shape[1]))
    np.add.at(cluster_num, cluster_of, num)
    np.add.at(cluster_den, cluster_of, den)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = num.sum(axis=0) / np.where(den.sum(axis=0) > 0, den.sum(axis=0), np.nan)
        boot_den = counts @ cluster_den
        boot = (counts @ cluster_num) / np.where(boot_den > 0, boot_den, np.nan)
    low, high, _ = percentile_interval(boot, level)
    if one_metric:
        return value[0], low[0], high[0]
    return value, low, high


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point value and its bootstrap percentile interval; `valid` resamples where the metric was defined."""

    value: float
    low: float
    high: float
    valid: int

    def to_json(self) -> dict[str, float | int | None]:
        return json_safe({"value": float(self.value), "low": float(self.low), "high": float(self.high),
                          "valid": self.valid})


def bootstrap_statistic(statistic: Callable[[np.ndarray], Mapping[str, float]], clusters: np.ndarray | int, *,
                        n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Interval]:
    """Percentile intervals of any metrics `statistic(indices)` computes on a resample of records, by the same
    patient-clustered draws as `cluster_bootstrap`.

    `clusters`: `(n,)` patient ids, or the number of records `n` when every record is its own patient.
    `statistic(indices)` gets `(m,)` int record indices, each record repeated as often as its patient was drawn,
    and returns `{metric: value}`; a NaN value (e.g. AUROC of a resample without positives) leaves that resample
    out of that metric's interval, and `Interval.valid` counts the resamples used. The point value is
    `statistic(arange(n))`. The same inputs and `seed` give the same intervals.
    """
    if isinstance(clusters, int | np.integer):
        n, ids = int(clusters), None
    else:
        ids = np.asarray(clusters)
        if ids.ndim != 1:
            raise ValueError(f"clusters: expected one patient id per record, got shape {ids.shape}")
        n = ids.size
    if n == 0:
        raise ValueError("bootstrap_statistic: no records")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a coverage in (0, 1), got {level}")
    cluster_of, counts = cluster_draws(ids, n, n_boot=n_boot, seed=seed)
    point = {name: float(v) for name, v in statistic(np.arange(n)).items()}
    records = np.arange(n)
    draws = np.empty((n_boot, len(point)))
    for b, row in enumerate(counts):
        values = statistic(np.repeat(records, row[cluster_of]))
        draws[b] = [float(values[name]) for name in point]
    low, high, valid = percentile_interval(draws, level)
    return {name: Interval(value, float(low[m]), float(high[m]), int(valid[m]))
            for m, (name, value) in enumerate(point.items())}
