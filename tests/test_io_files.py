"""io.files: the one atomic writer (umask permissions, nothing left behind), its never-overwrite variant, strict JSON,
file digests."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from diffusets_jax.io.files import (
    atomic_path,
    file_sha256,
    json_text,
    write_json_atomic,
    write_new_text,
    write_text_atomic,
)


def test_write_new_text_writes_a_new_file_and_never_replaces_one(tmp_path):
    path = write_new_text(tmp_path / "a.json", "caf\u00e9\n")
    assert path.read_bytes() == "caf\u00e9\n".encode()
    with pytest.raises(FileExistsError):
        write_new_text(path, "other")
    assert path.read_text(encoding="utf-8") == "caf\u00e9\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(FileNotFoundError):
        write_new_text(tmp_path / "missing" / "b.json", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_writes_replace_and_leave_nothing_on_error(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "one")
    write_json_atomic(path, {"two": 2})
    assert path.read_text() == '{\n  "two": 2\n}\n'
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == '{\n  "two": 2\n}\n' and [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_an_output_that_is_a_symbolic_link_is_written_where_it_points(tmp_path):
    """`embed --output link.npz`, the link pointing at a scratch disk: the rename replaced the link with a file in the
    link's folder, and the file it pointed to kept its old content."""
    scratch, home = tmp_path / "scratch", tmp_path / "home"
    scratch.mkdir()
    home.mkdir()
    write_text_atomic(scratch / "vectors.txt", "old")
    (home / "vectors.txt").symlink_to(scratch / "vectors.txt")
    write_text_atomic(home / "vectors.txt", "new")
    assert (home / "vectors.txt").is_symlink() and (scratch / "vectors.txt").read_text() == "new"
    assert sorted(p.name for p in scratch.iterdir()) == ["vectors.txt"]
    assert sorted(p.name for p in home.iterdir()) == ["vectors.txt"]


def _strict(text: str):
    """json.loads that refuses the NaN/Infinity tokens, as jq, JavaScript and RFC 8259 do."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_non_finite_values_are_null(tmp_path):
    """A diverged model's statistic or a metric that could not be measured is NaN in memory; on disk and on stdout
    it must be null, or the report cannot be read by jq or a browser."""
    payload = {"nan": float("nan"), "inf": -np.inf, "f32": np.float32(0.5), "i64": np.int64(3),
               "array": np.array([[1.0, np.nan], [np.inf, 2.0]]), "nested": [{"x": (float("nan"), 1)}],
               "text": "NaN", "flag": True, "none": None}
    expected = {"nan": None, "inf": None, "f32": 0.5, "i64": 3, "array": [[1.0, None], [None, 2.0]],
                "nested": [{"x": [None, 1]}], "text": "NaN", "flag": True, "none": None}
    path = write_json_atomic(tmp_path / "report.json", payload)
    assert _strict(path.read_text()) == expected
    assert _strict(json_text(payload)) == expected
    assert payload["array"][0, 1] != payload["array"][0, 1]  # the caller's arrays are not changed


def test_written_files_get_the_umasks_permissions_not_0600(tmp_path):
    from diffusets_jax.io.plot import plot_heart_rate_scatter, save_png

    previous = os.umask(0o022)
    try:
        new = write_new_text(tmp_path / "a.json", "{}")
        replaced = write_text_atomic(tmp_path / "b.txt", "x")
        png = save_png(plot_heart_rate_scatter([60.0], [61.0]), tmp_path / "a.png", dpi=20)
        os.umask(0o027)
        strict = write_new_text(tmp_path / "c.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o644
    assert stat.S_IMODE(os.stat(png).st_mode) == 0o644
    assert stat.S_IMODE(strict.stat().st_mode) == 0o640


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path):
    import hashlib

    payload = bytes(range(256)) * 20_000  # more than one 4 MiB block
    (tmp_path / "f.bin").write_bytes(payload)
    assert file_sha256(tmp_path / "f.bin") == hashlib.sha256(payload).hexdigest()


def test_replace_folder_swaps_whole_folders_and_leaves_nothing_hidden(tmp_path):
    from diffusets_jax.io.files import replace_folder

    new, target = tmp_path / ".new", tmp_path / "out"
    new.mkdir()
    (new / "a.txt").write_text("first")
    replace_folder(new, target)  # nothing there yet: a plain rename
    newer = tmp_path / ".newer"
    newer.mkdir()
    (newer / "b.txt").write_text("second")
    replace_folder(newer, target)
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(target)) == ["b.txt"]


def test_replace_folder_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    from diffusets_jax.io import files

    target, new = tmp_path / "out", tmp_path / ".new"
    target.mkdir()
    (target / "users.txt").write_text("keep me")
    new.mkdir()
    real_replace = os.replace

    def replace(src, dst):  # the old folder moves aside, then the new one fails to take its name
        if os.fspath(src) == os.fspath(new):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        files.replace_folder(new, target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [".new", "out"]  # the old folder back under its name, none hidden
    assert (target / "users.txt").read_text() == "keep me"


def test_replace_folder_leaves_nothing_behind_when_the_old_folder_cannot_move(tmp_path, monkeypatch):
    from diffusets_jax.io import files

    target, new = tmp_path / "out", tmp_path / ".new"
    target.mkdir()
    (target / "users.txt").write_text("keep me")
    new.mkdir()

    def replace(src, dst):  # moving the old folder aside fails (a busy mount, a permission)
        raise PermissionError(13, "Permission denied", os.fspath(src))

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(PermissionError):
        files.replace_folder(new, target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [".new", "out"]  # no empty .out.old-* left by the attempt
    assert (target / "users.txt").read_text() == "keep me"


def test_the_temporaries_of_chosen_targets_are_removed_in_one_listing_and_no_other_is(tmp_path, monkeypatch):
    """A corpus removes a killed run's temporaries of its shards and counts, never one another process may be
    writing beside them (process 0's metadata, card, run record), and it scanned the folder once per target: two
    thousand scans for a 1,000-shard corpus."""
    from diffusets_jax.io.files import remove_temporaries_in, temporaries_in

    targets = ["c-00000", "c-00001", "a[1]", "w.tmp-z"]  # glob's brackets and a name with `.tmp-` in it
    ours = [".c-00000.tmp-11-0a1b2c", ".c-00000.tmp-12-0a1b2c.npz", ".a[1].tmp-13-aa", ".w.tmp-z.tmp-14-bb"]
    others = [".dataset_info.json.tmp-15-cc", ".c-00000.extra.tmp-16-dd", ".c-0000.tmp-17-ee", ".a1.tmp-18-ff",
              ".diffusets-run.json.tmp-19-ab"]
    for name in [*ours, *others, "c-00000", ".hidden"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".c-00001.tmp-20-staging").mkdir()  # a staging folder of a target is its temporary too
    (tmp_path / ".c-00001.tmp-20-staging" / "half.dat").write_bytes(b"x")
    ours.append(".c-00001.tmp-20-staging")
    assert [p.name for p in temporaries_in(tmp_path, targets)] == sorted(ours)
    assert [p.name for p in temporaries_in(tmp_path)] == sorted([*ours, *others])  # every one, without targets

    listings = []
    for name in ("listdir", "scandir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path=".", real=real: listings.append(path) or real(path))
    remove_temporaries_in(tmp_path, targets)
    monkeypatch.undo()
    assert [path for path in listings if not isinstance(path, int) and Path(path) == tmp_path] == [tmp_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "c-00000", ".hidden"])
    remove_temporaries_in(tmp_path / "missing", targets)  # a folder not there holds none


def test_a_full_disk_while_writing_names_the_file(tmp_path):
    """A write to an open file that fails for a full disk carries no path: the one line said "[Errno 28] No space
    left on device" and not which file (the multi-host hunt, with a file-size limit on one host)."""
    import errno

    target = tmp_path / "shard.tfrecord"
    with pytest.raises(OSError, match=r"No space left on device: '.*shard\.tfrecord'") as raised:
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # the temporary is removed as before
    with pytest.raises(PermissionError):  # other errors pass through as they are
        with atomic_path(target):
            raise PermissionError(errno.EACCES, "Permission denied", "elsewhere")
