"""Classification metrics against hand-worked examples and brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffusets_jax.metrics.classification import (
    average_precision,
    f1_threshold,
    roc_auc,
    threshold_metrics,
)


def brute_auroc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_average_precision(labels, scores):
    """Straight from the definition: for each distinct threshold, high to low, precision times recall gained."""
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        tp = np.sum(predicted & (labels == 1))
        recall = tp / labels.sum()
        total += (recall - previous_recall) * tp / predicted.sum()
        previous_recall = recall
    return total


def test_hand_worked_example():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # Positive/negative pairs ordered correctly: (0.9, 0.8), (0.9, 0.1), (0.7, 0.1); not (0.7, 0.8).
    assert roc_auc(labels, scores) == pytest.approx(3 / 4)
    # Precision at each recall step: 1/1 at recall 1/2, then 2/3 at recall 1.
    assert average_precision(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    m = threshold_metrics(labels, scores, 0.75)  # predicted positive: 0.9, 0.8
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 1, 1, 1)
    assert m.sensitivity == 0.5 and m.specificity == 0.5 and m.precision == 0.5 and m.f1 == 0.5


def test_ties_count_half_and_enter_together():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.5, 0.5, 0.2, 0.2])
    assert roc_auc(labels, scores) == pytest.approx(0.5)
    # Both records at 0.5 enter together: precision 1/2 at recall 1/2, then 2/4 at recall 1.
    assert average_precision(labels, scores) == pytest.approx(0.5)


def test_against_brute_force_on_random_tied_scores():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[0], labels[1] = 0, 1
        scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1.0), 1)  # rounding makes ties
        assert roc_auc(labels, scores) == pytest.approx(brute_auroc(labels, scores)), trial
        assert average_precision(labels, scores) == pytest.approx(brute_average_precision(labels, scores)), trial


def test_undefined_values_are_nan():
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert np.isnan(average_precision(np.array([0, 0]), np.array([0.2, 0.3])))
    m = threshold_metrics(np.array([0, 0]), np.array([0.2, 0.3]), 0.5)
    assert np.isnan(m.sensitivity) and m.specificity == 1.0 and np.isnan(m.f1)
    assert threshold_metrics(np.array([1, 0]), np.array([0.2, 0.3]), 0.5).f1 == 0.0  # positives, none found


def test_f1_threshold_attains_the_best_f1():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(3, 30))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = np.round(rng.normal(labels, 1.0), 1)
        distinct = np.unique(scores)
        cuts = np.r_[distinct, distinct[-1] + 1]  # every achievable split, incl. "nothing positive"
        best = max(threshold_metrics(labels, scores, t).f1 for t in cuts)
        chosen = f1_threshold(labels, scores)
        assert threshold_metrics(labels, scores, chosen).f1 == pytest.approx(best)
    assert f1_threshold(np.array([1, 0]), np.array([0.8, 0.2])) == pytest.approx(0.5)  # midpoint of the gap
    assert f1_threshold(np.array([0, 0]), np.array([0.8, 0.2]), default=0.5) == 0.5  # no positives


def test_bad_inputs():
    with pytest.raises(ValueError, match="0/1"):
        roc_auc(np.array([2, 0]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="two"):
        roc_auc(np.array([1, 0]), np.array([0.1]))
    with pytest.raises(ValueError, match="finite"):
        average_precision(np.array([1, 0]), np.array([np.nan, 0.2]))


def test_logit_midpoint_is_halfway_in_probability_also_where_probabilities_round_to_one():
    from scipy.special import expit, logit

    from diffusets_jax.metrics.classification import logit_midpoint

    for a, b in [(0.3, -1.2), (2.0, 5.0), (-4.0, -4.0), (10.0, -10.0)]:
        assert logit_midpoint(a, b) == pytest.approx(logit((expit(a) + expit(b)) / 2), rel=1e-9)
    assert logit_midpoint(7.5, 7.5) == pytest.approx(7.5)
    # expit(50) == expit(40) == 1.0 in float64; halfway between them lies at 40 + log 2 - log(1 + e^-10).
    assert logit_midpoint(50.0, 40.0) == pytest.approx(40.0 + np.log(2.0) - np.log1p(np.exp(-10.0)), abs=1e-9)
    assert logit_midpoint(-50.0, -40.0) == pytest.approx(-(40.0 + np.log(2.0) - np.log1p(np.exp(-10.0))), abs=1e-9)
