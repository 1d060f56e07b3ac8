"""PhysioNet/Computing in Cardiology Challenge 2020-2021 12-lead ECGs as DiffuSETS examples.

Every `NAME.hea` + `NAME.mat` pair below the manual dir (any folder depth: the Challenge ships one folder per
source database). Header comments give `# Age:`, `# Sex:` and `# Dx:` (SNOMED CT codes). Dx codes become
report lines through `snomed_statements.csv` (shipped here; one machine-style statement per code of the
Challenge 2021 scored and unscored mapping tables, each marked `rhythm` or `finding`):

- rhythm statements first, then findings, each group in Dx order; codes without a statement are dropped
; a record with no statement is skipped as `missing_report`;
- a final overall line, as machine reports end: "Normal ECG" if the only statement is "Sinus rhythm",
  otherwise "Abnormal ECG".

The Challenge has no patient ids, so each record is its own subject (subject_id = study_id = a stable hash of
the record path). Records that are not 10 s long (St Petersburg's 30 min, many CPSC records) are skipped as
`wrong_duration`; any sampling rate is resampled from what the header says. No RR interval: heart rates
come from QRS detection (the multi-lead consensus of `ecg.heart_rate.record_heart_rate`, source "qrs").
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence

from diffusets_jax.data.builder import EcgDatasetBuilder, embedder_configs, stable_int_id
from diffusets_jax.data.records import RecordCandidate

STATEMENTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snomed_statements.csv")
NORMAL_ECG, ABNORMAL_ECG = "Normal ECG", "Abnormal ECG"
_MALE, _FEMALE = {"male", "m"}, {"female", "f"}


def load_statement_table(path: str = STATEMENTS_CSV) -> dict[str, tuple[str, str]]:
    """{SNOMED code: (statement, kind)} from the shipped table; kind is 'rhythm' or 'finding'."""
    with open(path, newline="") as handle:
        return {row["snomed_code"].strip(): (row["statement"].strip(), row["kind"].strip()) for row in csv.DictReader(handle)}


def report_lines_from_dx(codes: Sequence[str], table: Mapping[str, tuple[str, str]]) -> tuple[str, ...]:
    """Report lines for a record's Dx codes (rule in the module docstring); () if none has a statement."""
    rhythms, findings = [], []
    for code in codes:
        if code.strip() in table:
            statement, kind = table[code.strip()]
            group = rhythms if kind == "rhythm" else findings
            if statement not in group:
                group.append(statement)
    statements = rhythms + findings
    if not statements:
        return ()
    return (*statements, NORMAL_ECG if statements == ["Sinus rhythm"] else ABNORMAL_ECG)


def parse_header_comments(header_path: str) -> dict[str, str]:
    """{'age': ..., 'sex': ..., 'dx': ...} from a Challenge header's `# Key: value` comment lines."""
    fields: dict[str, str] = {}
    with open(header_path, errors="replace") as handle:
        for line in handle:
            if line.startswith("#") and ":" in line:
                key, value = line.lstrip("#").split(":", 1)
                fields.setdefault(key.strip().lower(), value.strip())
    return fields


def parse_age(text: str | None) -> float | None:
    """Age in years, or None for the Challenge's missing markers (NaN, Unknown, negative)."""
    try:
        age = float(text) if text is not None else float("nan")
    except ValueError:
        return None
    return age if age == age and age >= 0 else None


def parse_sex(text: str | None) -> int | None:
    """1 = male, 0 = female, None when unknown."""
    value = (text or "").strip().lower()
    return 1 if value in _MALE else 0 if value in _FEMALE else None


def walk_each_folder_once(top: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of `top` and every folder below it, following symbolic links (a download assembled
    from linked folders, one per source database, is a usual layout) and entering each real folder once: a link
    back up would loop, and two paths to one folder would list its records twice. Folders are entered in name
    order, so which path names a folder reached twice does not depend on the file system."""
    seen: set[str] = set()
    for directory, folders, files in os.walk(top, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            folders[:] = []  # nothing below it either: already walked (or being walked) by its first path
            continue
        seen.add(real)
        folders.sort()
        yield directory, files


class Builder(EcgDatasetBuilder):
    """PhysioNet/CinC Challenge 2020-2021 12-lead ECGs with Dx-derived reports and QRS-detected heart rate."""

    BUILDER_CONFIGS = embedder_configs("PhysioNet/CinC Challenge 2020-2021, splits from a hash of the record.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the Challenge 2021 training data (https://physionet.org/content/challenge-2021/1.0.3/; open access):
        wget -r -N -c -np https://physionet.org/files/challenge-2021/1.0.3/training/
    and pass the `training/` folder (or any folder of `.hea` + `.mat` pairs, at any depth) as the manual dir.
    The 2020 Challenge layout works the same way.
    """
    _description = __doc__
    _homepage = "https://physionet.org/content/challenge-2021/1.0.3/"
    _citation = """\
@inproceedings{reyna2021will,
  title={Will Two Do? Varying Dimensions in Electrocardiography: The PhysioNet/Computing in Cardiology Challenge 2021},
  author={Reyna, Matthew A and Sadr, Nadi and Perez Alday, Erick A and Gu, Annie and Shah, Amit J and Robichaux, Chad
          and Rad, Ali Bahrami and Elola, Andoni and Seyedi, Salman and Ansari, Sardar and others},
  booktitle={2021 Computing in Cardiology (CinC)}, volume={48}, pages={1--4}, year={2021}
}"""

    def list_candidates(self, manual_dir: str) -> list[RecordCandidate]:
        table = load_statement_table()
        candidates = []
        for directory, files in sorted(walk_each_folder_once(manual_dir)):
            for name in sorted(files):
                if not name.endswith(".hea"):
                    continue
                header_path = os.path.join(directory, name)
                record_path = os.path.relpath(header_path, manual_dir)[: -len(".hea")]
                try:
                    fields = parse_header_comments(header_path)
                except OSError:
                    fields = {}  # decode reports the unreadable header
                codes = [code for code in fields.get("dx", "").split(",") if code.strip()]
                record_id = stable_int_id(f"physionet-challenge:{record_path}")
                candidates.append(
                    RecordCandidate(
                        record_path=record_path, subject_id=record_id, study_id=record_id,
                        age=parse_age(fields.get("age")), sex=parse_sex(fields.get("sex")),
                        report_lines=report_lines_from_dx(codes, table), metadata_in_header=True,
                    )
                )
        return candidates
