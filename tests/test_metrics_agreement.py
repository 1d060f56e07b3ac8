"""Fleiss' kappa against the worked example of Fleiss (1971) as tabulated on Wikipedia, and against Scott's pi
computed by hand for two raters (which Fleiss' kappa reduces to)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusets_jax.metrics.agreement import category_counts, fleiss_kappa

# 10 subjects, 14 raters, 5 categories (Wikipedia, "Fleiss' kappa", worked example): P_bar = 0.378,
# P_e = 0.213, kappa = 0.210.
FLEISS_EXAMPLE = np.array([
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
])


def test_worked_example():
    assert fleiss_kappa(FLEISS_EXAMPLE) == pytest.approx(0.210, abs=5e-4)
    # The exact value from the example's fractions: P_bar = 0.37802..., P_e = 0.21338...
    p_bar = (np.sum(FLEISS_EXAMPLE**2, axis=1) - 14).sum() / (10 * 14 * 13)
    p_e = np.sum((FLEISS_EXAMPLE.sum(axis=0) / 140.0) ** 2)
    assert p_bar == pytest.approx(0.378, abs=5e-4) and p_e == pytest.approx(0.213, abs=5e-4)


def test_two_raters_is_scotts_pi_by_hand():
    # 2 raters, 10 subjects, yes/no. Agree on 7 (4 yes-yes, 3 no-no), disagree on 3.
    a = ["y"] * 4 + ["n"] * 3 + ["y", "y", "n"]
    b = ["y"] * 4 + ["n"] * 3 + ["n", "n", "y"]
    counts = category_counts([a, b], ["y", "n"])
    assert counts.tolist() == [[2, 0]] * 4 + [[0, 2]] * 3 + [[1, 1]] * 3
    # Scott's pi: observed 0.7; pooled shares y = (6 + 5) / 20 = 0.55, n = 0.45; expected 0.55^2 + 0.45^2 = 0.505.
    assert fleiss_kappa(counts) == pytest.approx((0.7 - 0.505) / (1 - 0.505))


def test_perfect_chance_and_degenerate_agreement():
    assert fleiss_kappa(np.array([[3, 0], [0, 3], [3, 0]])) == pytest.approx(1.0)
    # Every subject split as evenly as possible between two categories by 2 raters: kappa = -1.
    assert fleiss_kappa(np.array([[1, 1], [1, 1]])) == pytest.approx(-1.0)
    assert np.isnan(fleiss_kappa(np.array([[2, 0], [2, 0]])))  # all in one category: undefined


@pytest.mark.parametrize("counts, message", [
    (np.array([[2, 0], [1, 0]]), "same number"),
    (np.array([[1, 0], [1, 0]]), r"same number \(>= 2\)"),
    (np.array([[2], [2]]), "at least 2 categories"),
    (np.array([[3, -1]]), "non-negative"),
])
def test_bad_tables(counts, message):
    with pytest.raises(ValueError, match=message):
        fleiss_kappa(counts)


def test_category_counts_checks_labels_and_shape():
    with pytest.raises(ValueError, match="'maybe' is not one of"):
        category_counts([["y", "maybe"]], ["y", "n"])
    with pytest.raises(ValueError, match="same subjects"):
        category_counts([["y"], ["y", "n"]], ["y", "n"])
