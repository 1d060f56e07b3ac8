"""write_new_text: atomic, never replaces an existing file, leaves no temporary file."""

from __future__ import annotations

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
