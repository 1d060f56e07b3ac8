"""New files written atomically: temporary files beside the target, renamed or linked into place.

`write_new_text` never replaces an existing file, for files a person may have edited since a tool wrote them (a
findings file an expert reviewed, a conditions file): the text goes to a temporary file beside the target, which
is then hard-linked to the target's name. The link fails if the name exists, even when another process created
it a moment ago, so nothing is overwritten and no half-written file ever carries the name.

Temporary files are created with the permissions the umask gives an ordinary new file (tempfile.mkstemp's are
0600, which would leave outputs unreadable to colleagues once renamed into place).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def create_temporary(target: str | os.PathLike) -> tuple[int, Path]:
    """A new empty file beside `target`, named `.NAME.<random>.tmp`, opened for writing: (descriptor, path)."""
    target = Path(target)
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {str(target)!r}")


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to the new file `path`; FileExistsError if `path` exists. The folder must exist."""
    path = Path(path)
    handle, temporary = create_temporary(path)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.link(temporary, path)
    finally:
        os.remove(temporary)  # this call's own temporary name; the content stays under `path`
    return path
