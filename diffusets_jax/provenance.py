"""What produced an artifact: the code's version and commit and the time, stamped into every card and index."""

from __future__ import annotations

import datetime
import functools
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "diffusets-jax"


@functools.cache
def code_version() -> dict[str, Any]:
    """`{"package_version", "git_commit", "git_dirty"}`; the commit only when running from a git checkout."""
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    commit, dirty = None, None
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip() or None
            status = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"package_version": version, "git_commit": commit, "git_dirty": dirty}


def stamp() -> dict[str, Any]:
    """`{"created": ISO-8601 UTC time, "code": code_version()}`."""
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return {"created": created, "code": dict(code_version())}
