"""`prepare` (data/sources.py) on a few real Challenge records: what it keeps, restores and refuses.

Each build is three bundled PhysioNet/CinC 2021 records decoded in this process and embedded by a hash stand-in
for MiniLM, so a build takes seconds; the command line is run in-process, as a user runs it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusets_jax.data import sources
from diffusets_jax.data.builder import REPORT_FILENAME
from tests.helpers.cli import exit_code
from tests.helpers.hash_embedder import HashEmbedder

DEMO_DIR = Path(__file__).resolve().parents[1] / "diffusets_jax" / "demo_data" / "cinc2021"
NAMES = ("E07500", "E07501", "E07502")


@pytest.fixture(autouse=True)
def hash_embedder(monkeypatch):
    """`--config local` embeds with HashEmbedder; other embedders are made as usual (an OpenAI key is checked)."""
    from diffusets_jax.conditioning import embedders

    real = embedders.make_embedder
    monkeypatch.setattr(embedders, "make_embedder",
                        lambda name, **options: HashEmbedder() if name == "local" else real(name, **options))


def copy_records(folder: Path, names=NAMES) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        for extension in (".hea", ".mat"):
            shutil.copy2(DEMO_DIR / (name + extension), folder / (name + extension))
    return folder


def prepare(manual: Path, data: Path, *extra: str) -> int:
    return exit_code(["prepare", "physionet-challenge", "--manual-dir", str(manual), "--data-dir", str(data),
                      "--workers", "0", "--embedding-cache", str(data.parent / "emb.sqlite"), *extra])


def dataset_dir(data: Path) -> Path:
    return data / "physionet_challenge" / "local" / "1.0.0"


def snapshot(root: Path) -> dict[str, tuple[bytes, int] | str]:
    """Every path under `root` with its bytes and mtime (folders by name)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def ecgs(data: Path) -> dict[str, np.ndarray]:
    builder = sources.make_builder("physionet-challenge", str(data))
    return {example["record_path"].decode(): example["ecg"]
            for split in builder.info.splits
            for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("diffusets-jax prepare:")]


def test_overwrite_that_writes_no_example_puts_the_old_dataset_back(tmp_path, capsys):
    """The old complete dataset was deleted when the rebuild skipped every record, and an empty one (no split)
    took its place, with exit 1 and no line saying why: --overwrite replaces only after a run that succeeded."""
    data = tmp_path / "data"
    assert prepare(copy_records(tmp_path / "cinc"), data) == 0
    before = snapshot(dataset_dir(data))
    broken = copy_records(tmp_path / "broken")
    for name in NAMES:  # every signal file cut short: every record is skipped as truncated_signal_file
        mat = broken / (name + ".mat")
        mat.write_bytes(mat.read_bytes()[:100])
    capsys.readouterr()
    assert prepare(broken, data, "--overwrite") == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "no example" in errors[0] and "kept as it was" in errors[0], errors
    assert snapshot(dataset_dir(data)) == before
    assert sorted(p.name for p in dataset_dir(data).parent.iterdir()) == [".diffusets-prepare-1.0.0.lock", "1.0.0"]
    # Into a new data dir: nothing to keep, and still one line saying why the exit code is 1.
    assert prepare(broken, tmp_path / "new") == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "no example written" in errors[0] and "prepare_report.json" in errors[0], errors


def test_overwrite_is_refused_while_a_run_reads_the_dataset(tmp_path, capsys):
    """A training reads its dataset for days; `prepare --overwrite` moved the folder away under it, crashing it on
    its next epoch. Refused with one line before anything is moved or decoded, and the dataset is kept."""
    from diffusets_jax.io.run_dir import reading

    data = tmp_path / "data"
    assert prepare(copy_records(tmp_path / "cinc"), data) == 0
    before = snapshot(dataset_dir(data))
    other = copy_records(tmp_path / "other", NAMES[:2])
    capsys.readouterr()
    with reading(dataset_dir(data)):
        assert prepare(other, data, "--overwrite") == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--overwrite:" in errors[0] and "being read by a run now" in errors[0], errors
    assert snapshot(dataset_dir(data)) == before
    assert prepare(other, data, "--overwrite") == 0  # once the reader is done
    assert len(ecgs(data)) == 2


def test_a_record_file_fixed_since_the_build_is_decoded_again(tmp_path, capsys, monkeypatch):
    """A header's gain corrected after a build: the rerun found the same records (paths and metadata), called the
    dataset complete, and --overwrite reused the chunk decoded from the wrong gain.

    Each run hashes its record list once: prepare's check and the card it writes each hashed it (and an --overwrite
    hashed the legacy form twice), a pass over every record, tens of seconds at MIMIC-IV-ECG's 800k."""
    from diffusets_jax.data import records

    calls = {"chunk_fingerprint": 0, "legacy_chunk_fingerprint": 0}
    def counting(name):
        real = getattr(records, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return counted

    for name in calls:
        monkeypatch.setattr(records, name, counting(name))

    def passes() -> dict[str, int]:  # the records' hashes beyond one per decode chunk, since the last call
        chunks = json.loads((dataset_dir(data) / REPORT_FILENAME).read_text())["decode_chunks"]["total"]
        found = {"records": calls["chunk_fingerprint"] - chunks, "legacy": calls["legacy_chunk_fingerprint"]}
        calls.update(chunk_fingerprint=0, legacy_chunk_fingerprint=0)
        return found

    manual = copy_records(tmp_path / "cinc")
    data = tmp_path / "data"
    assert prepare(manual, data) == 0
    assert passes() == {"records": 1, "legacy": 0}
    first = ecgs(data)
    header = manual / "E07502.hea"
    header.write_text(header.read_text().replace("1000.0(0)/mV", "500.0(0)/mV"))  # twice the amplitude
    capsys.readouterr()
    assert prepare(manual, data) == 2  # another build's records now: refused without --overwrite
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "modification time" in errors[0], errors
    calls.update(chunk_fingerprint=0, legacy_chunk_fingerprint=0)
    assert prepare(manual, data, "--overwrite") == 0
    assert passes() == {"records": 1, "legacy": 1}
    report = json.loads((dataset_dir(data) / REPORT_FILENAME).read_text())
    assert report["decode_chunks"]["decoded"] >= 1
    second = ecgs(data)
    np.testing.assert_allclose(second["E07502"], 2 * first["E07502"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(second["E07500"], first["E07500"])


def test_a_dataset_prepared_before_file_stamps_is_still_complete(tmp_path, capsys):
    """Cards written before record files were stamped hold the fingerprint of paths and metadata only: such a
    dataset is recognised as complete (with a note), not refused as built from other records."""
    from diffusets_jax.data.card import CARD_FILE

    manual, data = copy_records(tmp_path / "cinc"), tmp_path / "data"
    assert prepare(manual, data) == 0
    card_path = dataset_dir(data) / CARD_FILE
    card = json.loads(card_path.read_text())
    builder = sources.make_builder("physionet-challenge", str(data))
    card["derived_from"]["records_fingerprint"] = builder.legacy_records_fingerprint(str(manual))
    card_path.write_text(json.dumps(card))  # what the card of a dataset prepared before says
    before = snapshot(dataset_dir(data))
    capsys.readouterr()
    assert prepare(manual, data) == 0
    assert "was prepared before diffusets-jax recorded its record files' sizes and times" in capsys.readouterr().err
    assert snapshot(dataset_dir(data)) == before
    card["derived_from"]["records_fingerprint"] = "0" * 24  # any other fingerprint: other records, refused
    card_path.write_text(json.dumps(card))
    assert prepare(manual, data) == 2


def test_an_empty_manual_dir_is_one_line_and_creates_nothing(tmp_path, capsys):
    """An empty --manual-dir ended in TFDS's traceback (AssertionError: Manual directory ... is empty)."""
    (tmp_path / "empty").mkdir()
    assert prepare(tmp_path / "empty", tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1 and "no records listed" in err, err
    assert "is empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("case", ["openai-without-key", "cache-not-sqlite"])
def test_bad_embedding_inputs_are_refused_before_anything_is_created(case, tmp_path, capsys, monkeypatch):
    """A missing OpenAI key or an embedding cache that is no SQLite database was refused (exit 2) only after
    DATA_DIR/downloads and DATA_DIR/physionet_challenge had been made; the key's message named `--embedder local`
    and the Python argument `api_key`, which prepare does not have."""
    manual = copy_records(tmp_path / "cinc", NAMES[:1])
    data = tmp_path / "data"
    extra: list[str] = []
    if case == "openai-without-key":
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        extra = ["--config", "openai"]
    else:
        (tmp_path / "emb.sqlite").write_bytes(b"not a database, someone's file" * 10)
    before = snapshot(tmp_path)
    assert prepare(manual, data, *extra) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1, err
    if case == "openai-without-key":
        assert "OPENAI_API_KEY" in err and "--config local" in err and "--embedder" not in err
        assert "api_key" not in err
    else:
        assert "not a usable SQLite database" in err
    assert snapshot(tmp_path) == before


def kill_during_overwrite(data: Path) -> Path:
    """The state a `prepare --overwrite` killed (kill -9) during its rebuild leaves: the old dataset moved aside
    into a `.1.0.0.replaced-*` folder, the new one not yet in place."""
    dataset = dataset_dir(data)
    retired = dataset.parent / ".1.0.0.replaced-k1ll9x"
    retired.mkdir()
    os.replace(dataset, retired / dataset.name)
    return retired


def test_a_dataset_a_killed_overwrite_moved_aside_is_restored_or_named(tmp_path, capsys):
    """A killed `prepare --overwrite` left the old dataset in `.1.0.0.replaced-*`, never restored and never
    mentioned: the next prepare built it again from scratch (or another one) beside it."""
    manual = copy_records(tmp_path / "cinc")
    data = tmp_path / "data"
    assert prepare(manual, data) == 0
    complete = snapshot(dataset_dir(data))
    retired = kill_during_overwrite(data)
    capsys.readouterr()
    # No complete dataset in place: the old one is put back, and found complete (nothing decoded again).
    assert prepare(manual, data) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "replaced" in line]
    assert len(notes) == 1 and "restored" in notes[0] and str(retired) in notes[0], notes
    assert snapshot(dataset_dir(data)) == complete and not retired.exists()

    # A complete dataset in place (the kill came after the swap): the old one is named, never deleted.
    retired = kill_during_overwrite(data)
    shutil.copytree(retired / "1.0.0", dataset_dir(data))
    kept = snapshot(retired)
    capsys.readouterr()
    assert prepare(manual, data) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "replaced" in line]
    assert len(notes) == 1 and str(retired / "1.0.0") in notes[0] and "remove it" in notes[0], notes
    assert snapshot(retired) == kept


def test_a_source_table_naming_a_column_twice_is_one_line_before_anything_is_created(tmp_path, capsys):
    """pandas read a second "report" column as "report.1", so prepare took the first silently (here the empty
    one: every record a missing_report)."""
    manual = tmp_path / "ptbxl"
    manual.mkdir()
    source = (Path(__file__).parent / "data" / "ecg" / "ptbxl" / "ptbxl_database.csv").read_text().splitlines()
    header = source[0].split(",")
    at = header.index("report")
    rows = [[*header[:at], "report", *header[at:]]]  # an empty "report" before the real one
    for line in source[1:4]:
        fields = next(csv.reader([line]))
        rows.append([*fields[:at], "", *fields[at:]])
    with open(manual / "ptbxl_database.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    data = tmp_path / "data"
    before = snapshot(tmp_path)
    code = exit_code(["prepare", "ptbxl", "--manual-dir", str(manual), "--data-dir", str(data), "--workers", "0",
                      "--embedding-cache", str(tmp_path / "emb.sqlite")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(error_lines(err)) == 1, err
    assert f"{manual / 'ptbxl_database.csv'} line 1: the header names column 'report' twice; keep one" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("theirs", ["data_prep.py", "data_prep/__init__.py"])
def test_a_data_prep_of_the_users_folder_hiding_the_builders_is_named(tmp_path, monkeypatch, theirs):
    # `python -m diffusets_jax` or a notebook puts the current folder first on sys.path: a project's own
    # data_prep.py or data_prep/ package then hides ours, which a checkout or a reinstall would not fix.
    import importlib
    import sys

    path = tmp_path / theirs
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# the user's own data preparation\n")
    for name in [m for m in sys.modules if m == "data_prep" or m.startswith("data_prep.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    # An editable install (`make install`) adds a finder that maps every data_prep.* name to the checkout whatever
    # sys.path says; an installed wheel has none, and that is the case tested.
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if not getattr(f, "__module__", "").startswith("__editable__")])
    importlib.invalidate_caches()
    with pytest.raises(ModuleNotFoundError, match="Python found another `data_prep`") as err:
        sources.builder_class("ptbxl")
    assert str(path if theirs == "data_prep.py" else path.parent) in str(err.value)
    assert "\n" not in str(err.value)
