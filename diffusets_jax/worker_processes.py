"""Worker processes for the host's work that holds the GIL: PNG sheets (`io.plot_workers`), beat detection and
delineation of many records (`metrics.record_pool`), decoding records for `prepare` (`data.builder`).

Each worker is a fresh interpreter (`python -c "...serve()"`, with the parent's import path) that imports only what
its jobs name. Not `multiprocessing`'s: a fork would copy the parent's JAX or TensorFlow threads mid-flight, and its
spawn runs the parent's main script again in every worker, so a user's script without a `__main__` guard that
evaluated or drew through the Python API ran once more per worker (and then failed with a BrokenProcessPool
traceback). A job and its answer cross the worker's stdin and stdout as pickles, one job in flight per worker. A
worker ignores Ctrl-C and SIGTERM (the parent stops it, so an interrupt prints no traceback from each) and leaves
when its stdin closes, which happens however the parent ends (a SIGKILL, `os._exit`), where `multiprocessing`'s workers stayed,
waiting for jobs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from diffusets_jax.errors import RunFailed

# A worker's program: the parent's import path (as multiprocessing's spawn gives it), so that a job's function
# imports there as it did here.
_SERVE = "import sys; sys.path[:] = {path!r}; from diffusets_jax.worker_processes import serve; serve()"
_LENGTH = struct.Struct("<Q")  # each message's byte count, before its pickle


def usable_cores() -> int:
    """The cores this process may run on (a scheduler's allocation, not the machine's count where it can tell)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pickle(message: Any) -> bytes:  # noqa: ANN401
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _send(stream: IO[bytes], data: bytes) -> None:
    """One message: its byte count, then its pickle `data`."""
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> bytes:
    """The next message's pickle; EOFError when the other side has gone."""
    head = stream.read(_LENGTH.size)
    data = stream.read(_LENGTH.unpack(head)[0]) if len(head) == _LENGTH.size else b""
    if not head or len(data) < _LENGTH.unpack(head)[0]:
        raise EOFError
    return data


def serve() -> None:
    """A worker's loop: run each job `(fn, args, kwargs, keep)` read from stdin and write `(True, result)` (None
    unless `keep`) or `(False, exception)` to stdout, until stdin closes."""
    # The parent's Ctrl-C reaches its whole process group, as a scheduler's SIGTERM may: the parent stops its
    # workers (closing their stdin) and says why in one line, where a worker that died first made it "a worker died".
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    jobs, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a job's print must not land in the answers
    while True:
        try:
            job = _receive(jobs)
        except EOFError:
            return
        try:
            fn, args, kwargs, keep = pickle.loads(job)  # noqa: S301 - our parent's jobs, over its own pipe
            result = fn(*args, **kwargs)
            answer = (True, result if keep else None)
        except Exception as err:  # noqa: BLE001 - raised in the parent, where the run waits for the result
            answer = (False, err)
        _send(answers, _portable(answer))


def _portable(answer: tuple[bool, Any]) -> bytes:
    """`answer` pickled; an exception that would not come back whole (its class takes other arguments than its
    message, or does not pickle) goes as the nearest built-in class, so that a ValueError or OSError is still one
    to the parent (a record `plot` skips), with the class's name in the message."""
    ok, value = answer
    try:
        data = _pickle(answer)
        if not ok:
            pickle.loads(data)  # noqa: S301 - our own pickle: can the parent rebuild it?
        return data
    except Exception as err:  # noqa: BLE001 - what goes instead says what it was
        if ok:
            return _pickle((False, RuntimeError(f"a {type(value).__name__} result does not pickle: {err}")))
        message = f"{type(value).__name__}: {value}"
        builtin = next(cls for cls in type(value).__mro__ if cls.__module__ == "builtins")
        try:
            return _pickle((False, builtin(message)))
        except Exception:  # noqa: BLE001 - a built-in class that takes more than a message (UnicodeError's kin)
            return _pickle((False, RuntimeError(message)))


class WorkerProcesses:
    """`submit(fn, *args, **kwargs)`: a future of `fn(...)`, run by one of `workers` processes, or here at once when
    there are none (`workers=0`, or none could start); `run_for_effect` likewise for what `fn` writes (its future's
    result is None); `map` for results in order. `fn` (a module-level function) and its arguments must pickle.
    Leaving the block cancels the jobs not begun, waits for the ones being run and ends the workers. A worker that
    dies (killed, out of memory) fails its job and every later one with `RunFailed(died)`, one line saying what to
    do."""

    def __init__(self, workers: int, died: str):
        self.workers = workers
        self.died = died
        self._jobs: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._broken = threading.Event()

    def __enter__(self) -> WorkerProcesses:
        for _ in range(self.workers if sys.executable else 0):  # an embedded interpreter may have no executable
            try:
                process = subprocess.Popen([sys.executable, "-c", _SERVE.format(path=list(sys.path))],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            except OSError:  # a process limit reached: work with the workers started, or here without any
                break
            thread = threading.Thread(target=self._feed, args=(process,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        while True:  # the jobs no worker has begun
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _feed(self, process: subprocess.Popen) -> None:
        """One worker's jobs, one at a time, from the shared queue until its end (None)."""
        try:
            while (job := self._jobs.get()) is not None:
                future, message = job
                if not future.set_running_or_notify_cancel():
                    continue
                if self._broken.is_set():
                    future.set_exception(RunFailed(self.died))
                    continue
                try:
                    data = _pickle(message)
                except Exception as err:  # noqa: BLE001 - a job that does not pickle (a lambda): the caller's error
                    future.set_exception(err)
                    continue
                try:
                    _send(process.stdin, data)
                    answer = _receive(process.stdout)
                except (EOFError, OSError):  # the worker died (killed, out of memory): the run cannot finish
                    self._broken.set()
                    future.set_exception(RunFailed(self.died))
                    continue
                try:
                    ok, value = pickle.loads(answer)  # noqa: S301 - our worker's answer, over its own pipe
                except Exception as err:  # noqa: BLE001 - e.g. an exception class that cannot be rebuilt here
                    ok, value = False, RuntimeError(f"a worker process's answer could not be read: {err}")
                future.set_result(value) if ok else future.set_exception(value)
        finally:
            with contextlib.suppress(OSError):  # a worker that died leaves a broken pipe
                process.stdin.close()  # the worker's end: it leaves its loop
            process.wait()
            process.stdout.close()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:  # noqa: ANN401
        return self._run(fn, args, kwargs, keep=True)

    def run_for_effect(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:  # noqa: ANN401
        """`submit` for a function run for what it writes: its result (a plot's Figure) is dropped where it was
        made, as pickling it back took 36 ms a sheet, a fifth of drawing it."""
        return self._run(fn, args, kwargs, keep=False)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:  # noqa: ANN401
        """`fn(item, *args)` for each item, in order: every item handed to the workers at once, or, without workers,
        each computed here as its result is read (so a progress bar still moves). Read it inside the block."""
        if not self._threads:
            return (fn(item, *args) for item in items)
        futures = [self.submit(fn, item, *args) for item in items]
        return (future.result() for future in futures)

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], keep: bool
             ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._threads:
            self._jobs.put((future, (fn, args, kwargs, keep)))
            return future
        try:
            result = fn(*args, **kwargs)
            future.set_result(result if keep else None)
        except Exception as err:  # noqa: BLE001 - raised where the result is read, as from a worker
            future.set_exception(err)
        return future


def wait_for(futures: Iterable[concurrent.futures.Future]) -> None:
    """Wait for every job in `futures`; a worker's error is raised here as it was raised there (a full disk: an
    OSError), a dead worker as `RunFailed`."""
    for future in futures:
        future.result()
