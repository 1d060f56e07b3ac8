"""The PhysioNet/CinC Challenge builder's listing (data_prep/physionet_challenge): which records it finds, and
what an unusable header is counted as. No TFDS build: the listing and the decoder are called directly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusets_jax.data import records
from diffusets_jax.data.sources import make_builder

DEMO_DIR = Path(__file__).resolve().parents[1] / "diffusets_jax" / "demo_data" / "cinc2021"


def copy_record(name: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for extension in (".hea", ".mat"):
        shutil.copy2(DEMO_DIR / (name + extension), folder / (name + extension))


def listed(manual: Path, tmp_path: Path) -> list[records.RecordCandidate]:
    return make_builder("physionet-challenge", str(tmp_path / "data")).candidates(str(manual))


def test_records_in_linked_folders_are_listed_once_and_links_back_up_do_not_loop(tmp_path):
    """A folder linked into the download (one per source database, kept elsewhere) was silently left out."""
    manual = tmp_path / "training"
    copy_record("E07500", manual / "cpsc")
    copy_record("E07501", tmp_path / "elsewhere" / "georgia")
    os.symlink(tmp_path / "elsewhere" / "georgia", manual / "georgia")
    os.symlink(tmp_path / "elsewhere" / "georgia", manual / "georgia_again")  # two paths to one folder
    os.symlink(manual, manual / "cpsc" / "up")  # a link back up: a cycle
    assert [c.record_path for c in listed(manual, tmp_path)] == ["cpsc/E07500", "georgia/E07501"]


def test_an_empty_or_garbled_header_is_an_unreadable_header_not_a_missing_age(tmp_path):
    """The Challenge's age, sex and Dx are the header's own comment lines: a header that cannot be read has none,
    and was counted as missing_age ("no age for subject ..."), hiding the broken file."""
    manual = tmp_path / "training"
    for name in ("E07500", "E07501", "E07502"):
        copy_record(name, manual)
    (manual / "E07500.hea").write_bytes(b"")
    (manual / "E07501.hea").write_bytes(bytes(range(256)) * 3)
    header = (manual / "E07502.hea").read_text()
    (manual / "E07502.hea").write_text("\n".join(line for line in header.splitlines() if "Age" not in line) + "\n")
    candidates = listed(manual, tmp_path)
    result = records.decode_chunk(str(manual), candidates, records.DecodeOptions())
    reasons = dict(zip((c.record_path for c in candidates), result.skip_reason, strict=True))
    assert reasons == {"E07500": "unreadable_header", "E07501": "unreadable_header", "E07502": "missing_age"}
