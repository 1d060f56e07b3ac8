"""Binary classification metrics in NumPy/SciPy (their patient-clustered intervals: `metrics.bootstrap`).

Conventions: `labels` `(n,)` are 0/1 (or bool), 1 = the positive class; `scores` `(n,)` are any real numbers, a
higher score meaning "more likely positive" (probabilities, logits). A record is predicted positive when
`score >= threshold`. Undefined values are NaN, never an exception: AUROC with one class only, AUPRC or
sensitivity without positives, specificity without negatives.

- `roc_auc`: the Mann-Whitney statistic, P(score of a random positive > that of a random negative), ties 1/2.
- `average_precision`: sum over distinct thresholds of (R_k - R_{k-1}) * P_k, records with tied scores entering
  together; the step-wise area under the precision-recall curve without interpolation (as scikit-learn's
  `average_precision_score`).
- `threshold_metrics`: F1 = 2 TP / (2 TP + FP + FN), sensitivity (recall), specificity, precision.
- `f1_threshold`: the threshold maximising F1 on a (validation) set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape}: expected two (n,) arrays")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1 (or bool)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return labels.astype(bool), scores


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count 1/2); NaN unless both classes occur."""
    labels, scores = _check(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks of ties: a tied positive/negative pair counts 1/2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the step-wise precision-recall curve); NaN without positives."""
    labels, scores = _check(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last position of each run of tied scores: every tied record is above the threshold at once.
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], labels.size - 1]
    true_pos = np.cumsum(sorted_labels)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclasses.dataclass(frozen=True)
class ThresholdMetrics:
    """Counts and rates at one threshold (rates NaN where their denominator is 0; F1 NaN only when there are
    neither positives nor predicted positives)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> ThresholdMetrics:
    """Confusion counts with `score >= threshold` predicted positive."""
    labels, scores = _check(labels, scores)
    predicted = scores >= threshold
    return ThresholdMetrics(float(threshold), tp=int(np.sum(predicted & labels)), fp=int(np.sum(predicted & ~labels)),
                            tn=int(np.sum(~predicted & ~labels)), fn=int(np.sum(~predicted & labels)))


def f1_threshold(labels: np.ndarray, scores: np.ndarray, default: float = 0.5,
                 midpoint: Callable[[float, float], float] | None = None) -> float:
    """The threshold maximising F1 on these records (`default` when they hold no positive).

    Candidates are cuts between consecutive distinct scores: the returned threshold is the midpoint between the
    lowest score predicted positive and the next lower score (or that score itself when it is the lowest), so it
    reproduces the best split here and sits halfway into the gap for new records. Ties in F1 go to the highest
    threshold (the fewest positive predictions). `midpoint(a, b)`: "halfway" other than the arithmetic mean
    (`logit_midpoint` for logits, halfway in probability).
    """
    labels, scores = _check(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float(default)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], labels.size - 1]
    true_pos = np.cumsum(sorted_labels)[last]
    predicted = last + 1
    f1 = 2 * true_pos / (predicted + n_pos)  # 2TP / (2TP + FP + FN) = 2TP / (predicted positives + positives)
    best = int(np.argmax(f1))
    cut = sorted_scores[last[best]]
    below = sorted_scores[last[best] + 1] if last[best] + 1 < labels.size else cut
    return float((cut + below) / 2) if midpoint is None else float(midpoint(cut, below))


def logit_midpoint(a: float, b: float) -> float:
    """The logit of the mean of the probabilities expit(a) and expit(b), without forming them: in float64 they round
    to exactly 1.0 above a logit of about 37, where a confident classifier's scores lie. Equals `a` when b == a."""
    log_expit = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731 - log(expit(x)), stable for large |x|
    return float(np.logaddexp(log_expit(a), log_expit(b)) - np.logaddexp(log_expit(-a), log_expit(-b)))
