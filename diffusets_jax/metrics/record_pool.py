"""Per-record measurement (beat detection, delineation) spread over worker processes, one pool per run.

A worker starts as a fresh interpreter (`worker_processes`) importing NumPy, SciPy and the detectors: seconds
each. So a run that measures several sets, or one generated batch after another, keeps one pool for all of them
(`RecordPool`, started on first use) instead of starting one per call; a set too small to share (fewer than two
records per worker) is measured in this process.

    with RecordPool(16) as pool:
        real = measure_ecgs(real_ecgs, workers=pool)
        generated = measure_ecgs(generated_ecgs, workers=pool)

Functions that take `workers: int | RecordPool` accept either: a number starts a pool for that call only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from diffusets_jax.worker_processes import WorkerProcesses

# No JAX import here: worker processes import the modules of the functions they run, and should not load XLA.

CHUNKS_PER_WORKER = 4  # enough to even out records that take longer (noisy, fast rhythms)
_DIED = ("a process measuring records died (killed, or out of memory?); rerun the same command, with fewer --workers "
         "if memory ran out")


class RecordPool:
    """Up to `workers` processes (`<= 1`: everything in this process), started on the first set big enough."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = int(workers)
        self._processes: WorkerProcesses | None = None

    def map(self, fn: Callable[..., list], records: np.ndarray, *args: Any) -> list:
        """`fn(chunk, *args)` over chunks of `records` (split on the first axis), each returning one item per
        record; the items of all records, in order."""
        if self.workers <= 1 or len(records) < 2 * self.workers:
            return list(fn(records, *args))
        if self._processes is None:
            self._processes = WorkerProcesses(self.workers, died=_DIED).__enter__()
        per_chunk = self._processes.map(fn, np.array_split(records, self.workers * CHUNKS_PER_WORKER), *args)
        return [item for chunk in per_chunk for item in chunk]

    def close(self) -> None:
        """Stop the workers (if any started); the pool can still be used, and starts them again."""
        if self._processes is not None:
            self._processes.__exit__(None, None, None)
            self._processes = None

    def __enter__(self) -> RecordPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def record_pool(workers: int | RecordPool) -> Iterator[RecordPool]:
    """`workers` itself when it is a `RecordPool` (its owner closes it), else a pool of that many processes for
    the `with` block."""
    if isinstance(workers, RecordPool):
        yield workers
        return
    with RecordPool(workers) as pool:
        yield pool
