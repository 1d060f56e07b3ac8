"""write_new_text: atomic, never replaces an existing file, leaves no temporary file."""

from __future__ import annotations

import os
import stat

import pytest

from diffusets_jax.io.new_files import write_new_text


def test_writes_a_new_file_and_never_replaces_one(tmp_path):
    path = write_new_text(tmp_path / "a.json", "caf\u00e9\n")
    assert path.read_bytes() == "caf\u00e9\n".encode()
    with pytest.raises(FileExistsError):
        write_new_text(path, "other")
    assert path.read_text(encoding="utf-8") == "caf\u00e9\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(FileNotFoundError):
        write_new_text(tmp_path / "missing" / "b.json", "x")


def test_new_files_get_the_umasks_permissions_not_0600(tmp_path):
    from diffusets_jax.io.plot import plot_heart_rate_scatter, save_png

    previous = os.umask(0o022)
    try:
        text = write_new_text(tmp_path / "a.json", "{}")
        png = save_png(plot_heart_rate_scatter([60.0], [61.0]), tmp_path / "a.png", dpi=20)
        os.umask(0o027)
        strict = write_new_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(text.stat().st_mode) == 0o644
    assert stat.S_IMODE(os.stat(png).st_mode) == 0o644
    assert stat.S_IMODE(strict.stat().st_mode) == 0o640
