"""Failures a command reports in one line (the CLI's single error path), beside the bad-input errors.

Bad input (a wrong flag, a missing or damaged file) raises ValueError / OSError / ImportError: one line and exit
code 2. `RunFailed` is for a run that started correctly but could not finish for a reason its message states,
with what to do (a non-finite loss, every checkpoint unreadable): one line and exit code 1.
"""

from __future__ import annotations


class RunFailed(RuntimeError):
    """The run could not finish; the message says why and what to do (exit code 1, no traceback)."""
