"""Failures a command reports in one line (the CLI's single error path), beside the bad-input errors.

Bad input (a wrong flag, a missing or damaged file) raises ValueError / OSError / ImportError: one line and exit
code 2. `RunFailed` is for a run that started correctly but could not finish for a reason its message states,
with what to do (a non-finite loss, every checkpoint unreadable): one line and exit code 1. `Preempted` is a
command whose training saved a checkpoint and stopped on SIGTERM before the command's end: one line and exit code
75, so a scheduler requeues it and the rerun resumes. `Terminated` is a SIGTERM anywhere else: exit code 143.
"""

from __future__ import annotations


class Terminated(BaseException):
    """SIGTERM outside a training loop (`kill`, a scheduler's cancel, `timeout`): raised in the main thread by the
    CLI's handler, so that the run unwinds as it does on Ctrl-C (its temporary files removed, a run that wrote
    nothing leaves no folder) and prints one line (exit code 143). A BaseException, as KeyboardInterrupt: the batch
    jobs that skip and count a record failing with an Exception must not count it as a bad record."""


class RunFailed(RuntimeError):
    """The run could not finish; the message says why and what to do (exit code 1, no traceback)."""


class Preempted(Exception):
    """SIGTERM stopped a training inside a longer command after saving its checkpoint: rerun the same command to
    resume (exit code 75). The message names the step and the checkpoint folder."""
