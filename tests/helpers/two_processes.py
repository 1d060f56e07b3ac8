"""Run a worker script as processes 0 and 1 of a two-host JAX run on this machine (gloo over localhost).

The worker is started as `python WORKER PROCESS_ID PORT *args(PROCESS_ID)` with this checkout on its path and
without the suite's XLA_FLAGS (each worker sets its own devices); it joins the run itself from its arguments.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HELPERS = Path(__file__).resolve().parent


def run_workers(worker: str, args: Callable[[int], Sequence[str]], timeout: float = 120) -> list[tuple[int | None, str, float]]:
    """Run `tests/helpers/WORKER` as both processes; each one's exit code (None: still running after `timeout` s,
    then killed), output and seconds from the start until it was seen to have ended."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    began = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(HELPERS / worker), str(i), port, *map(str, args(i))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = []
    try:
        for proc in procs:
            try:
                output, _ = proc.communicate(timeout=max(0.0, timeout - (time.monotonic() - began)))
                results.append((proc.returncode, output, time.monotonic() - began))
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                results.append((None, output, time.monotonic() - began))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def run_worker_pair(worker: str, args: Callable[[int], Sequence[str]], timeout: float = 120) -> list[str]:
    """Run `tests/helpers/WORKER` as both processes; each one's output. A process that exits non-zero fails the
    test with its output's tail; one still running after `timeout` s (waiting at a collective for the other) is
    killed and fails it too."""
    outputs = []
    for code, output, _ in run_workers(worker, args, timeout):
        assert code == 0, output[-3000:]
        outputs.append(output)
    return outputs
