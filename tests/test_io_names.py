"""`io.names`: output names for inputs that share a name (used by plot and evaluate, tested there end to end)."""

import pytest

from diffusets_jax.io.names import distinct_names


def test_output_names_keep_each_paths_shortest_distinct_ending(tmp_path):
    assert distinct_names([tmp_path / "a" / "rec", tmp_path / "b" / "other"]) == ["rec", "other"]
    assert distinct_names([tmp_path / "a" / "x" / "m", tmp_path / "b" / "x" / "m", tmp_path / "c"]) == [
        "a-x-m", "b-x-m", "c"]
    with pytest.raises(ValueError, match="given twice"):
        distinct_names([tmp_path / "a", tmp_path / "b" / ".." / "a"])
