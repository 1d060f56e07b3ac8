"""The Apache Beam path of the builders (DirectRunner) gives the same examples as local worker processes.

apache-beam comes with the `tfds-cli` extra (`pip install -e '.[tfds-cli]'`, which `make install` uses); this test
is skipped where it is not installed.
"""

import csv
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

pytest.importorskip("apache_beam")

from diffusets_jax.data import sources  # noqa: E402

pytestmark = pytest.mark.slow

PTBXL = os.path.join(os.path.dirname(__file__), "data", "ecg", "ptbxl")


def small_ptbxl(target) -> None:
    """Four PTB-XL records from folds 1, 2, 9 and 10 (train, train, validation, test)."""
    with open(os.path.join(PTBXL, "ptbxl_database.csv"), newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, [r for r in reader if r["ecg_id"] in ("1", "2", "9", "10")]
    for row in rows:
        os.makedirs(target / os.path.dirname(row["filename_hr"]), exist_ok=True)
        for ext in (".hea", ".dat"):
            shutil.copy(os.path.join(PTBXL, row["filename_hr"] + ext), target / (row["filename_hr"] + ext))
    with open(target / "ptbxl_database.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_beam_direct_runner_matches_local_build(tmp_path, monkeypatch):
    # Beam makes a `beam-temp*` folder in the temporary directory and leaves it there, empty, even when the process
    # exits normally: keep it in this test's folder rather than one more in /tmp per suite run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    manual = tmp_path / "manual"
    small_ptbxl(manual)
    cache = str(tmp_path / "embeddings.sqlite")
    local = sources.prepare("ptbxl", str(manual), str(tmp_path / "local"), workers=0, embedding_cache_path=cache)
    beam = sources.prepare(
        "ptbxl", str(manual), str(tmp_path / "beam"), embedding_cache_path=cache,
        beam_pipeline_options="runner=DirectRunner,direct_num_workers=1",
    )
    assert beam["examples_per_split"] == local["examples_per_split"] == {"train": 2, "validation": 1, "test": 1}
    assert beam["heart_rate_sources"] == local["heart_rate_sources"]
    for split in ("train", "validation", "test"):
        read = {}
        for name in ("local", "beam"):
            builder = sources.make_builder("ptbxl", str(tmp_path / name))
            read[name] = {int(e["study_id"]): e for e in tfds.as_numpy(builder.as_dataset(split=split))}
        assert read["local"].keys() == read["beam"].keys()
        for study, example in read["local"].items():
            np.testing.assert_array_equal(read["beam"][study]["ecg"], example["ecg"])
            np.testing.assert_array_equal(read["beam"][study]["text_embedding"], example["text_embedding"])
            assert read["beam"][study]["heart_rate"] == example["heart_rate"]
