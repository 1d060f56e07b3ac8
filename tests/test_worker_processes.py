"""Worker processes: the same results as in the run's process, a worker's error raised in the run, none left
behind, the user's script run once."""

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

from diffusets_jax import worker_processes
from diffusets_jax.errors import RunFailed
from diffusets_jax.io.plot import plot_ecg
from diffusets_jax.worker_processes import WorkerProcesses, wait_for
from tests.helpers.worker_jobs import raise_unrebuildable, return_unpicklable

DIED = "a worker died (killed?); rerun the same command to resume"


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_draw_the_sheets_this_process_draws(tmp_path, workers):
    ecgs = np.random.default_rng(0).normal(scale=0.3, size=(3, 1024, 12)).astype(np.float32)
    header = {"prompt": "Sinus rhythm", "sex": "F", "age": 40.0, "heart_rate": 60.0}
    for i, ecg in enumerate(ecgs):
        plot_ecg(ecg, conditions=header, path=tmp_path / f"here_{i}.png")
    with WorkerProcesses(workers, died=DIED) as pool:
        drawing = [pool.run_for_effect(plot_ecg, ecg, conditions=header, path=tmp_path / f"pool_{i}.png")
                   for i, ecg in enumerate(ecgs)]
        wait_for(drawing)
    # plot_ecg returns its Figure: pickling it back to the run took a fifth of a sheet's time
    assert [future.result() for future in drawing] == [None] * 3
    for i in range(3):
        assert (tmp_path / f"pool_{i}.png").read_bytes() == (tmp_path / f"here_{i}.png").read_bytes()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_workers_error_is_raised_where_the_run_waits_for_its_result(tmp_path, workers):
    """As a full disk's OSError, which the command reports in one line naming the file."""
    with WorkerProcesses(workers, died=DIED) as pool:
        future = pool.submit(os.remove, tmp_path / "a.png")
        with pytest.raises(FileNotFoundError, match=r"No such file or directory: '.*a\.png'"):
            wait_for([future])


def test_a_worker_that_dies_is_one_line():
    with WorkerProcesses(1, died=DIED) as pool, pytest.raises(RunFailed) as caught:
        wait_for([pool.submit(os._exit, 9), pool.submit(os.getpid)])  # the job that killed it, and the next one
    assert str(caught.value) == DIED


def test_workers_leave_ctrl_c_and_sigterm_to_the_run():
    """A scheduler's SIGTERM to the whole process group killed the workers too, so the run could stop with "a
    process drawing PNGs died" instead of its own SIGTERM line, whichever came first."""
    with WorkerProcesses(1, died=DIED) as pool:
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        assert pool.submit(signal.getsignal, signal.SIGTERM).result() == signal.SIG_IGN


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) has left
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_leave_when_their_run_is_killed(tmp_path):
    """A run ended by SIGKILL or `os._exit` (a host's watch stopping it) runs no cleanup: its workers notice that
    their parent has gone and exit, instead of waiting for jobs forever."""
    script = textwrap.dedent(f"""
        import os
        from diffusets_jax.worker_processes import WorkerProcesses
        pool = WorkerProcesses(2, died="died").__enter__()
        pids = {{pool.submit(os.getpid).result() for _ in range(20)}}
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
        from diffusets_jax.worker_processes import WorkerProcesses, wait_for
        with open({str(tmp_path / "runs")!r}, "a") as runs:
            runs.write("ran\\n")
        with WorkerProcesses(2, died="died") as pool:
            wait_for([pool.submit(os.getpid) for _ in range(8)])
    """))
    subprocess.run([sys.executable, str(script)], check=True, timeout=120, cwd=tmp_path)
    assert (tmp_path / "runs").read_text() == "ran\n"


def test_a_run_that_cannot_start_workers_does_the_work_itself(tmp_path, monkeypatch):
    """A process limit (or an interpreter with no executable) costs speed, not the run."""
    def refuse(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(worker_processes.subprocess, "Popen", refuse)
    with WorkerProcesses(2, died=DIED) as pool:
        future = pool.submit(os.getpid)
    assert future.result() == os.getpid()


def test_a_job_or_answer_that_does_not_pickle_fails_its_future_instead_of_hanging_the_run():
    with WorkerProcesses(1, died=DIED) as pool:
        unpicklable = pool.submit(lambda: 1)
        odd = pool.submit(raise_unrebuildable)
        unsendable = pool.submit(return_unpicklable)
        after = pool.submit(os.getpid)
        with pytest.raises((pickle.PicklingError, AttributeError)):
            unpicklable.result(timeout=60)
        with pytest.raises(ValueError, match=r"^Unrebuildable: a\.png: odd$"):  # still a ValueError: plot skips it
            odd.result(timeout=60)
        with pytest.raises(RuntimeError, match="a function result does not pickle"):
            unsendable.result(timeout=60)
        assert after.result(timeout=60) != os.getpid()  # the worker is still there


@pytest.mark.parametrize("workers", [0, 2])
def test_map_keeps_the_order(workers):
    with WorkerProcesses(workers, died=DIED) as pool:
        assert list(pool.map(divmod, [7, 9, 11], 4)) == [(1, 3), (2, 1), (2, 3)]


def test_map_without_workers_computes_each_result_as_it_is_read():
    """So that a progress bar over the results (prepare's decoding with --workers 0) moves as they come."""
    done = []

    def square(x, log):
        log.append(x)
        return x * x

    with WorkerProcesses(0, died=DIED) as pool:
        results = pool.map(square, [2, 3, 4], done)
        assert next(results) == 4 and done == [2]
        assert list(results) == [9, 16] and done == [2, 3, 4]


def test_usable_cores_are_the_ones_this_process_may_run_on(monkeypatch):
    """A scheduler's allocation (8 of a node's 128 cores), not the machine's count: one worker per machine core
    would oversubscribe the job sixteenfold."""
    from diffusets_jax.worker_processes import usable_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert usable_cores() == 3
