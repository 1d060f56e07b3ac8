"""`RecordPool`: one set of worker processes for many measuring calls, records kept in order, small sets in-process."""

import os
import subprocess
import sys
import textwrap

import numpy as np

from diffusets_jax.metrics.clinical import measure_ecgs
from diffusets_jax.metrics.record_pool import RecordPool, record_pool


def _pid_and_row(chunk: np.ndarray, offset: float) -> list[tuple[int, float]]:
    """Runs in the workers (imported by name there): the process that measured each record, and the record."""
    return [(os.getpid(), float(row[0]) + offset) for row in chunk]


def test_one_pool_serves_every_call_in_order():
    records = np.arange(40, dtype=np.float64).reshape(20, 2)
    with RecordPool(2) as pool:
        first = pool.map(_pid_and_row, records, 0.5)
        second = pool.map(_pid_and_row, records[:8], 0.0)
    assert [value for _, value in first] == [float(x) + 0.5 for x in records[:, 0]]
    assert [value for _, value in second] == [float(x) for x in records[:8, 0]]
    workers = {pid for pid, _ in first}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    # The second call ran in the processes the first one started, not in new ones.
    assert {pid for pid, _ in second} <= workers


def test_small_sets_and_one_worker_stay_in_this_process():
    records = np.zeros((3, 2))
    with RecordPool(2) as pool:  # 3 records < 2 per worker
        assert {pid for pid, _ in pool.map(_pid_and_row, records, 0.0)} == {os.getpid()}
    with RecordPool(1) as pool:
        assert {pid for pid, _ in pool.map(_pid_and_row, np.zeros((50, 2)), 0.0)} == {os.getpid()}


def test_a_closed_pool_starts_again_and_record_pool_keeps_a_given_pool_open():
    records = np.arange(16, dtype=np.float64).reshape(8, 2)
    pool = RecordPool(2)
    with record_pool(pool) as same:
        assert same is pool
        before = {pid for pid, _ in same.map(_pid_and_row, records, 0.0)}
    assert {pid for pid, _ in pool.map(_pid_and_row, records, 0.0)} <= before  # still open after the block
    pool.close()
    after = {pid for pid, _ in pool.map(_pid_and_row, records, 0.0)}
    pool.close()
    assert os.getpid() not in after and not after & before


def test_measuring_through_a_shared_pool_equals_measuring_in_process():
    t = np.arange(1024) / 102.4
    rng = np.random.default_rng(0)
    rates = rng.uniform(0.9, 1.8, size=(10, 1, 1))
    # Narrow Gaussian "R waves" at each beat on every lead, scaled per lead, plus noise.
    phase = (t[None, :, None] * rates) % 1.0
    ecgs = np.exp(-((phase - 0.5) / 0.01) ** 2) * np.linspace(0.5, 1.5, 12) + 0.01 * rng.normal(size=(10, 1024, 12))
    alone = measure_ecgs(ecgs)
    with RecordPool(2) as pool:
        shared = measure_ecgs(ecgs, workers=pool)
    np.testing.assert_array_equal(shared.heart_rate_bpm, alone.heart_rate_bpm)
    np.testing.assert_array_equal(shared.qrs_ms, alone.qrs_ms)
    assert np.isfinite(alone.heart_rate_bpm).sum() >= 8


def test_a_users_script_without_a_main_guard_measures_once(tmp_path):
    """The workers were multiprocessing's spawned ones, which run the parent's main script again: a script that
    measured at its top level ran three times with two workers and ended in a BrokenProcessPool traceback."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        from diffusets_jax.metrics.record_pool import RecordPool
        with open({str(tmp_path / "runs")!r}, "a") as runs:
            runs.write("ran\\n")
        with RecordPool(2) as pool:
            print(pool.map(np.atleast_1d, np.arange(8.0)))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs").read_text() == "ran\n"
