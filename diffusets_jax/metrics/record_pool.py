"""Per-record measurement (beat detection, delineation) spread over worker processes, one pool per run.

A worker starts as a fresh interpreter (spawn) importing NumPy, SciPy and the detectors: seconds each. So a run
that measures several sets, or one generated batch after another, keeps one pool for all of them (`RecordPool`,
started on first use) instead of starting one per call; a set too small to share (fewer than two records per
worker) is measured in this process.

    with RecordPool(16) as pool:
        real = measure_ecgs(real_ecgs, workers=pool)
        generated = measure_ecgs(generated_ecgs, workers=pool)

Functions that take `workers: int | RecordPool` accept either: a number starts a pool for that call only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

# No JAX import here: worker processes import the modules of the functions they run, and should not load XLA.

CHUNKS_PER_WORKER = 4  # enough to even out records that take longer (noisy, fast rhythms)


class RecordPool:
    """Up to `workers` processes (`<= 1`: everything in this process), started on the first set big enough."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = int(workers)
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def map(self, fn: Callable[..., list], records: np.ndarray, *args: Any) -> list:
        """`fn(chunk, *args)` over chunks of `records` (split on the first axis), each returning one item per
        record; the items of all records, in order."""
        if self.workers <= 1 or len(records) < 2 * self.workers:
            return list(fn(records, *args))
        if self._executor is None:
            # spawn, not fork: the parent may have JAX's thread pools running, which fork does not survive safely.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"))
        chunks = np.array_split(records, self.workers * CHUNKS_PER_WORKER)
        per_chunk = self._executor.map(fn, chunks, *([arg] * len(chunks) for arg in args))
        return [item for chunk in per_chunk for item in chunk]

    def close(self) -> None:
        """Stop the workers (if any started); the pool can still be used, and starts them again."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

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
