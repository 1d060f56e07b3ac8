"""Failed Orbax restores as one line, without tensorstore's aftermath.

When Orbax fails to read a damaged checkpoint (a truncated or missing data file, a mangled manifest), the
tensorstore reads still in flight finish after the error has been raised: each then logs "Future exception was
never retrieved" through the `asyncio` logger, or tries to wake an event loop that is already closed, which
Python prints as an unraisable "Event loop is closed" traceback. Those are echoes of the error we already report
in one line, so `absorb_restore_noise(path)` drops exactly them: asyncio records whose exception names `path`,
and "Event loop is closed" raised where native code (not Python) called `call_soon_threadsafe` on a closed loop.

Call it *before* the restore: the first echoes come from tensorstore's threads the moment Orbax's loop closes,
which is before the restore's exception reaches any `except` clause. Before a restore that succeeds it changes
nothing, since then no read is left in flight.
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


def _is_late_native_wakeup(unraisable: Any) -> bool:
    """Whether `unraisable` is a native thread (tensorstore's) waking an event loop that has already closed."""
    error = unraisable.exc_value
    if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed" or unraisable.object is not None:
        return False
    tb = unraisable.exc_traceback
    # The outermost frame is call_soon_threadsafe itself: no Python code called it, a native library did.
    return tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"


def _unraisable_hook(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if not _is_late_native_wakeup(unraisable):
            previous(unraisable)

    return hook


def absorb_restore_noise(path: str | os.PathLike) -> None:
    """Silence the aftermath, should it fail, of the restore of the checkpoint at `path` that comes next.

    See the module docstring; call it before the restore.
    """
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
