"""Agreement between raters: Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement among many raters").

Used to score clinical Turing tests, where several cardiologists classify the same ECG sheets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def category_counts(ratings: Sequence[Sequence[str]], categories: Sequence[str]) -> np.ndarray:
    """Ratings `(raters, subjects)` of labels from `categories` -> counts `(subjects, categories)`: how many raters
    put subject i in category j (the table Fleiss' kappa is computed from)."""
    ratings = [list(r) for r in ratings]
    if not ratings or len({len(r) for r in ratings}) != 1:
        raise ValueError("every rater must rate the same subjects: ratings must be (raters, subjects)")
    index = {category: j for j, category in enumerate(categories)}
    counts = np.zeros((len(ratings[0]), len(categories)), np.int64)
    for rater, row in enumerate(ratings):
        for subject, label in enumerate(row):
            if label not in index:
                raise ValueError(f"rater {rater}, subject {subject}: {label!r} is not one of {list(categories)}")
            counts[subject, index[label]] += 1
    return counts


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a `(subjects, categories)` count table with the same number n >= 2 of ratings per subject.

    kappa = (P_bar - P_e) / (1 - P_e), with P_i = (sum_j n_ij^2 - n) / (n (n - 1)) the agreement on subject i,
    P_bar their mean, p_j = sum_i n_ij / (N n) and P_e = sum_j p_j^2 the agreement expected by chance.
    1 is perfect agreement, 0 chance level, negative below chance. NaN when P_e = 1 (every rating in one
    category): agreement beyond chance is then undefined.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 2:
        raise ValueError(f"counts must be (subjects, categories) with at least 2 categories, got shape {counts.shape}")
    if np.any(counts < 0) or not np.all(counts == np.round(counts)):
        raise ValueError("counts must be non-negative integers")
    per_subject = counts.sum(axis=1)
    n = int(per_subject[0])
    if n < 2 or np.any(per_subject != n):
        raise ValueError(f"every subject needs the same number (>= 2) of ratings, got {sorted(set(per_subject.tolist()))}")
    counts = counts.astype(np.float64)
    agreement = (np.sum(counts**2, axis=1) - n) / (n * (n - 1))
    p_bar = float(agreement.mean())
    shares = counts.sum(axis=0) / (counts.shape[0] * n)
    p_e = float(np.sum(shares**2))
    if np.isclose(p_e, 1.0):
        return float("nan")
    return (p_bar - p_e) / (1.0 - p_e)
