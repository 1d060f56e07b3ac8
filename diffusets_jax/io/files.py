"""The one way this project writes a file: under a unique temporary name beside it, then renamed into place.

A reader never sees half a file, a crash leaves the previous version (or nothing), and two processes writing the
same path never share a temporary file (names carry the pid and a random part), so the last complete write wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it is renamed to `path`, on error removed.

    `suffix` ends the temporary name, for writers that insist on an extension (e.g. numpy's `.npz`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=suffix)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()  # only the temporary file this call created


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_bytes(payload)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """`payload` as JSON (UTF-8, a final newline) at `path`, atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is one line naming it and what to do."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist ({what})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text at byte {err.start}; is it the {what}?") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {err.lineno}: not valid JSON ({err.msg}); the {what} is damaged: "
                         "restore or rewrite it") from None
