"""PNGs drawn in worker processes: the same sheets, a worker's error raised in the run, none left behind."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from diffusets_jax.errors import RunFailed
from diffusets_jax.io import plot_workers
from diffusets_jax.io.plot import plot_ecg
from diffusets_jax.io.plot_workers import PlotWorkers, wait_for, worker_count
from tests.helpers.plot_jobs import raise_unrebuildable


@pytest.mark.parametrize("cores", [1, 2, 64])
def test_a_few_sheets_are_drawn_here_and_many_by_one_worker_per_core_up_to_a_limit(monkeypatch, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert worker_count(0) == worker_count(plot_workers.MIN_SHEETS_FOR_WORKERS - 1) == 0
    assert worker_count(plot_workers.MIN_SHEETS_FOR_WORKERS) == min(cores, plot_workers.MAX_WORKERS)
    assert worker_count(10**6) == min(cores, plot_workers.MAX_WORKERS) == min(cores, 8)  # about 200 MB each


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_draw_the_sheets_this_process_draws(tmp_path, workers):
    ecgs = np.random.default_rng(0).normal(scale=0.3, size=(3, 1024, 12)).astype(np.float32)
    header = {"prompt": "Sinus rhythm", "sex": "F", "age": 40.0, "heart_rate": 60.0}
    for i, ecg in enumerate(ecgs):
        plot_ecg(ecg, conditions=header, path=tmp_path / f"here_{i}.png")
    with PlotWorkers(workers) as plots:
        drawing = [plots.draw(plot_ecg, ecg, conditions=header, path=tmp_path / f"pool_{i}.png")
                   for i, ecg in enumerate(ecgs)]
        wait_for(drawing)
    # plot_ecg returns its Figure: pickling it back to the run took a fifth of a sheet's time
    assert [future.result() for future in drawing] == [None] * 3
    for i in range(3):
        assert (tmp_path / f"pool_{i}.png").read_bytes() == (tmp_path / f"here_{i}.png").read_bytes()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_workers_error_is_raised_where_the_run_waits_for_its_sheet(tmp_path, workers):
    """As a full disk's OSError, which the command reports in one line naming the file."""
    with PlotWorkers(workers) as plots:
        future = plots.submit(os.remove, tmp_path / "a.png")
        with pytest.raises(FileNotFoundError, match=r"No such file or directory: '.*a\.png'"):
            wait_for([future])


def test_a_worker_that_dies_is_one_line():
    with PlotWorkers(1) as plots, pytest.raises(RunFailed, match="a process drawing PNGs died") as caught:
        wait_for([plots.submit(os._exit, 9)])
    assert "\n" not in str(caught.value) and "--formats npz,wfdb" in str(caught.value)


def test_workers_leave_ctrl_c_to_the_run():
    with PlotWorkers(1) as plots:
        assert plots.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) has left
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_leave_when_their_run_is_killed(tmp_path):
    """A run ended by SIGKILL or `os._exit` (a host's watch stopping it) runs no cleanup: its workers notice that
    their parent has gone and exit, instead of waiting for sheets forever."""
    script = textwrap.dedent(f"""
        import os
        from diffusets_jax.io.plot_workers import PlotWorkers
        plots = PlotWorkers(2).__enter__()
        pids = {{plots.submit(os.getpid).result() for _ in range(20)}}
        open({str(tmp_path / "pids")!r}, "w").write(" ".join(map(str, pids)))
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert pids and os.getpid() not in pids
    deadline = time.monotonic() + 15
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, pids)), f"workers {pids} outlived their run"


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """Workers start as fresh interpreters, not through multiprocessing's spawn, which runs the parent's main script
    again in each: a user's script that samples at its top level would sample once more per worker."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from diffusets_jax.io.plot_workers import PlotWorkers, wait_for
        with open({str(tmp_path / "runs")!r}, "a") as runs:
            runs.write("ran\\n")
        with PlotWorkers(2) as plots:
            wait_for([plots.submit(os.getpid) for _ in range(8)])
    """))
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, cwd=tmp_path)
    assert (tmp_path / "runs").read_text() == "ran\n"


def test_a_run_that_cannot_start_workers_draws_its_sheets_itself(tmp_path, monkeypatch):
    """A process limit (or an interpreter with no executable) costs speed, not the run."""
    def refuse(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(plot_workers.subprocess, "Popen", refuse)
    with PlotWorkers(2) as plots:
        future = plots.submit(os.getpid)
    assert future.result() == os.getpid()


def test_a_job_or_answer_that_does_not_pickle_fails_its_future_instead_of_hanging_the_run():
    with PlotWorkers(1) as plots:
        unpicklable = plots.submit(lambda: 1)
        odd = plots.submit(raise_unrebuildable)
        after = plots.submit(os.getpid)
        with pytest.raises((pickle.PicklingError, AttributeError)):
            unpicklable.result(timeout=60)
        with pytest.raises(ValueError, match=r"^Unrebuildable: a\.png: odd$"):  # still a ValueError: plot skips it
            odd.result(timeout=60)
        assert after.result(timeout=60) != os.getpid()  # the worker is still there
