"""Exact resume (kill -9 mid-run, restart) and a two-process run over localhost with gloo collectives."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CHILD = Path(__file__).parent / "helpers" / "train_child.py"
N = 4


def _env(devices: int, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def _run(args, env, timeout=300):
    proc = subprocess.run([sys.executable, str(CHILD), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _leaves(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_9_and_resume_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run([straight, 2 * N, tmp_path / "straight.npz"], _env(8))

    # Run to 2N but hang when batch N+1 is requested: step N is checkpointed, step N+1 is done but unsaved.
    args = [resumed, 2 * N, tmp_path / "unused.npz", "--block-at", N + 1]
    proc = subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    checkpoint = resumed / "checkpoints" / str(N)
    while not ((resumed / "blocked").exists() and (checkpoint / "commit_success.txt").exists()):
        assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
        assert time.time() < deadline, "the child never reached the checkpoint"
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "unused.npz").exists()

    _run([resumed, 2 * N, tmp_path / "resumed.npz"], _env(8))
    a, b = _leaves(tmp_path / "straight.npz"), _leaves(tmp_path / "resumed.npz")
    assert len(a) == len(b) > 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit: params, optimiser state, step, key
    assert int(b[[i for i, x in enumerate(b) if x.shape == () and x.dtype == np.int32][0]]) == 2 * N


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_with_gloo_train_and_checkpoint(tmp_path):
    port = _free_port()
    workdir = tmp_path / "two"
    procs = [
        subprocess.Popen(
            [sys.executable, str(CHILD), *map(str, [workdir, N, tmp_path / "two.npz", "--checkpoint-every", 2])],
            env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert (workdir / "checkpoints" / str(N) / "commit_success.txt").exists()
    assert (workdir / "checkpoints" / "2").is_dir()

    # The same 4 global devices in one process give the same parameters (up to reduction order).
    _run([tmp_path / "one", N, tmp_path / "one.npz", "--checkpoint-every", 2], _env(4))
    for x, y in zip(_leaves(tmp_path / "one.npz"), _leaves(tmp_path / "two.npz"), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
