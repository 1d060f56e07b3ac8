"""Failed Orbax restores as one line, without tensorstore's aftermath.

When Orbax fails to read a damaged checkpoint (a truncated or missing data file, a mangled manifest), the
tensorstore reads still in flight finish after the error has been raised: each then logs "Future exception was
never retrieved" through the `asyncio` logger, or tries to wake an event loop that is already closed, which
Python prints as an unraisable "Event loop is closed" traceback. Those are echoes of the error we already report
in one line, so `absorb_restore_noise(path)` drops exactly them: asyncio records whose exception names `path`,
and "Event loop is closed" once a restore has failed.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_paths: set[str] = set()
_installed = False


class _EchoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None and record.args and isinstance(record.args, dict):
            error = record.args.get("exception")
        text = f"{record.getMessage()} {error}"
        return not any(path in text for path in _paths)


def _unraisable_hook(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return  # a tensorstore read of the failed restore finishing after its event loop closed
        previous(unraisable)

    return hook


def absorb_restore_noise(path: str | os.PathLike) -> None:
    """Silence the aftermath of a failed restore of the checkpoint at `path` (see the module docstring)."""
    global _installed
    _paths.add(os.path.abspath(os.fspath(path)))
    _paths.add(os.fspath(path))
    if not _installed:
        logging.getLogger("asyncio").addFilter(_EchoFilter())
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
        _installed = True


def restore_error_reason(error: BaseException, limit: int = 200) -> str:
    """The first line of a restore error, shortened: what a one-line message can carry."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
