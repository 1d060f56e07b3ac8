"""`io.names`: output names for inputs that share a name (used by plot and evaluate, tested there end to end)."""

import threading

import pytest

from diffusets_jax.io.names import distinct_names


def test_output_names_keep_each_paths_shortest_distinct_ending(tmp_path):
    assert distinct_names([tmp_path / "a" / "rec", tmp_path / "b" / "other"]) == ["rec", "other"]
    assert distinct_names([tmp_path / "a" / "x" / "m", tmp_path / "b" / "x" / "m", tmp_path / "c"]) == [
        "a-x-m", "b-x-m", "c"]
    with pytest.raises(ValueError, match="given twice"):
        distinct_names([tmp_path / "a", tmp_path / "b" / ".." / "a"])


def test_paths_whose_parts_join_to_one_name_get_distinct_names(tmp_path):
    # `a-b/c` and `a/b-c` join to the same `a-b-c` once the other records force both to their whole paths: the
    # names used to grow forever (a hang of `plot`), now the colliding ones get their path's hash.
    paths = [tmp_path / "a-b" / "c", tmp_path / "z" / "c", tmp_path / "a" / "b-c", tmp_path / "w" / "b-c"]
    found: list[list[str]] = []
    # In a daemon thread, so that the old endless loop fails this test instead of hanging the suite.
    worker = threading.Thread(target=lambda: found.append(distinct_names(paths)), daemon=True)
    worker.start()
    worker.join(60)
    assert found, "distinct_names did not return"
    names = found[0]
    assert len(set(names)) == len(names) == 4
    assert names[1:4:2] == ["z-c", "w-b-c"]
    assert names[0].startswith(f"{'-'.join(paths[0].resolve().parts[1:])}-")
