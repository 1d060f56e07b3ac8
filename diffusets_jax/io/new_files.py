"""Writing a new file atomically without ever replacing an existing one.

For files a person may have edited since a tool wrote them (a findings file an expert reviewed, a conditions
file): the text goes to a temporary file beside the target, which is then hard-linked to the target's name.
The link fails if the name exists, even when another process created it a moment ago, so nothing is
overwritten and no half-written file ever carries the name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to the new file `path`; FileExistsError if `path` exists. The folder must exist."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.link(temporary, path)
    finally:
        os.remove(temporary)  # this call's own temporary name; the content stays under `path`
    return path
