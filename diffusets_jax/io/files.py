"""The one way this project writes a file: under a unique temporary name beside it, then renamed into place.

A reader never sees half a file, a crash leaves the previous version (or nothing), and two processes writing the
same path never share a temporary file (names carry the pid and a random part), so the last complete write wins.

Temporary files get the permissions the umask gives any new file (tempfile.mkstemp's 0600 would follow them
into place and leave outputs, such as the PNG sheets sent to raters, unreadable to colleagues).

`write_new_text` is the never-overwrite variant, for files a person may have edited since a tool wrote them (a
findings file an expert reviewed, a conditions file): the temporary file is hard-linked to the target's name,
which fails if the name exists, even when another process created it a moment ago.

`replace_folder` is the same rename for a whole folder written beside its target (a model, a run's output).

Every JSON this project writes, to a file or to stdout, is strict JSON (`json_text`): a value that could not be
measured, or a diverged model's statistic, is NaN or inf in memory and `null` on disk, because Python's default
`NaN` token is refused by jq, JavaScript and most JSON readers a researcher would point at a report.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _create_beside(target: Path, tail: Callable[[], str], make: Callable[[Path], Any], what: str) -> Path:
    """A new `.NAME.tmp-{tail()}` beside `target`, made by `make` (which raises FileExistsError when it is taken)."""
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.tmp-{tail()}")
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary {what} beside {target}")


def _create_temporary(target: Path, suffix: str) -> Path:
    """A new empty file beside `target`, `.NAME.tmp-PID-RANDOM{suffix}`, with the umask's permissions."""
    return _create_beside(target, lambda: f"{os.getpid()}-{secrets.token_hex(6)}{suffix}",
                          lambda path: os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)), "file")


def make_temporary_folder(target: str | os.PathLike) -> str:
    """A new empty folder beside `target`, `.NAME.tmp-RANDOM`, with the umask's permissions (tempfile.mkdtemp's
    0700 would follow it into place, as mkstemp's 0600 would a file's)."""
    return os.fspath(_create_beside(Path(target), lambda: secrets.token_hex(6), os.mkdir, "folder"))


def temporaries_in(folder: str | os.PathLike, targets: Iterable[str] | None = None) -> list[Path]:
    """Every temporary left in `folder` by `atomic_path` or a staging folder of ours (`.NAME.tmp-*`): what processes
    killed while writing there leave behind. Only ours in a folder a command claimed (`io.run_dir`); never call it
    on a user's.

    `targets`: only the temporaries of these names in `folder` (`.TARGET.tmp-*`, as `atomic_path` names them), for
    a process that may remove those but not what another process is writing beside them right now. One listing of
    the folder either way, where a glob per target would scan it once per file (twice per shard of a corpus).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if targets is None else set(targets)
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name
                  and (wanted is None or _temporary_of_one(p.name, wanted)))


def _temporary_of_one(name: str, targets: set[str]) -> bool:
    """Whether `name` is `.TARGET.tmp-...` for a TARGET in `targets`; every `.tmp-` in it is tried, since a
    target's own name may hold one."""
    at = name.find(".tmp-", 1)
    while at != -1:
        if name[1:at] in targets:
            return True
        at = name.find(".tmp-", at + 1)
    return False


def remove_temporaries_in(folder: str | os.PathLike, targets: Iterable[str] | None = None) -> None:
    """Remove `temporaries_in(folder, targets)`; one already gone (another host sharing the disk) is fine."""
    for leftover in temporaries_in(folder, targets):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file-size limit, a quota


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it is renamed to `path`, on error removed.

    `suffix` ends the temporary name, for writers that insist on an extension (e.g. numpy's `.npz`). A `path` that is
    a symbolic link (an output kept on a scratch disk, linked from home) is written where it points, as `open` would:
    renamed over, the link itself became a file on the link's disk and the file it pointed to kept its old content.
    """
    target = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(target, suffix)
    try:
        yield temporary
        os.replace(temporary, target)
    except OSError as err:
        if err.filename is None and err.errno in _DISK_FULL:
            # A write to an open file fails without a path ("[Errno 28] No space left on device"): name the file,
            # so the one line says which disk is full.
            raise OSError(err.errno, err.strerror, str(target)) from err
        raise
    finally:
        if temporary.exists():
            temporary.unlink()  # only the temporary file this call created


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished folder `new` to `target` (same file system), replacing a folder there as a whole.

    The old folder moves to a hidden sibling first and is removed only once `new` holds the name; if that
    rename fails (or is interrupted), the old folder goes back under its name, never left hidden.
    """
    target = Path(target)
    if not target.exists():
        os.replace(new, target)
        return target
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, retired / target.name)
    except BaseException:
        retired.rmdir()  # our own empty folder; the old one never moved
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(retired / target.name, target)
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)  # the folder the caller asked to replace
    return target


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_bytes(payload)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to the new file `path`, atomically; FileExistsError if `path` exists (nothing is
    replaced). The folder must exist."""
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"the folder of {target} does not exist")
    if not create_new(target, lambda temporary: temporary.write_bytes(text.encode("utf-8"))):
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
    return target


def create_new(path: str | os.PathLike, fill: Callable[[Path], Any]) -> bool:
    """Create the file `path` whole: `fill(temporary)` writes it under a temporary name beside it, which is then
    hard-linked to `path`. Returns False, changing nothing, when `path` exists (another process made it a moment
    ago, say); no process ever sees it partly written. The folder must exist."""
    target = Path(path)
    temporary = _create_temporary(target, "")
    try:
        fill(temporary)
        try:
            os.link(temporary, target)
        except FileExistsError:
            return False
    finally:
        temporary.unlink()  # this call's own temporary name; the content stays under `path`
    return True


def json_safe(value: Any) -> Any:
    """`value` with every NaN/inf float made None, numpy scalars made Python ones and arrays made (nested) lists,
    through dicts, lists and tuples; anything else is returned as it is."""
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def json_text(payload: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """`payload` as strict JSON text (no NaN/Infinity tokens: see the module docstring), without a final newline."""
    return json.dumps(json_safe(payload), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """`payload` as strict JSON (UTF-8, a final newline) at `path`, atomically."""
    return write_text_atomic(path, json_text(payload, indent=indent, sort_keys=sort_keys) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks: how inputs are identified in records."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """Refuse at once an input that is missing, a directory, or unreadable: one line naming it and what to do.

    `what` names the input as the user knows it, e.g. "--input" or "reports file"."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory: give the file itself")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {path}: cannot read it (permission denied)")
    return path


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
