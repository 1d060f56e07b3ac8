"""How many worker processes draw a run's PNGs: none for a few, one per core, at most eight."""

from __future__ import annotations

import pytest

from diffusets_jax.io import plot_workers
from diffusets_jax.io.plot_workers import worker_count


@pytest.mark.parametrize("cores", [1, 2, 64])
def test_a_few_sheets_are_drawn_here_and_many_by_one_worker_per_core_up_to_a_limit(monkeypatch, cores):
    monkeypatch.setattr(plot_workers, "usable_cores", lambda: cores)
    assert worker_count(0) == worker_count(plot_workers.MIN_SHEETS_FOR_WORKERS - 1) == 0
    assert worker_count(plot_workers.MIN_SHEETS_FOR_WORKERS) == min(cores, plot_workers.MAX_WORKERS)
    assert worker_count(10**6) == min(cores, plot_workers.MAX_WORKERS) == min(cores, 8)  # about 200 MB each


def test_a_dead_drawing_worker_says_how_to_go_on():
    pool = plot_workers.plot_workers(10**6)  # not started
    assert pool.workers == worker_count(10**6) and "--formats npz,wfdb" in pool.died and "\n" not in pool.died
