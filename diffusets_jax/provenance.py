"""What produced an artifact: the code's version and commit and the time, stamped into every card and index."""

from __future__ import annotations

import datetime
import functools
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "diffusets-jax"


def _checkout() -> Path:
    """The folder above the package: a git checkout's root when running from one."""
    return Path(__file__).resolve().parent.parent


@functools.cache
def code_version() -> dict[str, Any]:
    """`{"package_version", "git_commit", "git_dirty"}`; the commit when running from a git checkout, or when the
    package was installed from git (`pip install git+URL`)."""
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    checkout = _checkout()
    commit, dirty = _checkout_commit(checkout) if (checkout / ".git").exists() else _installed_commit()
    return {"package_version": version, "git_commit": commit, "git_dirty": dirty}


def _checkout_commit(checkout: Path) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
        status = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def _direct_url() -> str | None:
    return metadata.distribution(PACKAGE).read_text("direct_url.json")


def _installed_commit() -> tuple[str | None, bool | None]:
    """The commit pip installed from git, as it records it in the distribution's `direct_url.json` (PEP 610):
    an installed copy has no checkout to ask, and its artifacts recorded no commit to cite. (None, None) otherwise
    (a wheel, `pip install .`, no metadata)."""
    try:
        text = _direct_url()
        vcs = (json.loads(text) if text else {}).get("vcs_info") or {}
    except (metadata.PackageNotFoundError, OSError, ValueError, AttributeError):
        return None, None
    commit = vcs.get("commit_id") if vcs.get("vcs") == "git" else None
    return (str(commit), False) if commit else (None, None)  # installed from a commit: nothing uncommitted


def stamp() -> dict[str, Any]:
    """`{"created": ISO-8601 UTC time, "code": code_version()}`."""
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return {"created": created, "code": dict(code_version())}
