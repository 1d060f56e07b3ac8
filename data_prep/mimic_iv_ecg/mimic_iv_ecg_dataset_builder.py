"""MIMIC-IV-ECG (PhysioNet, ~800k 10 s 12-lead ECGs) as DiffuSETS training examples.

Joins `record_list.csv` (record paths) with `machine_measurements.csv` (report_0..report_17, rr_interval)
on study_id and with MIMIC-IV `patients.csv` (anchor_age, gender) on subject_id, exactly as the reference
(spec sections 2-4): report lines in column order with empty cells dropped; heart rate 60000 / rr_interval
for 300-1500 ms, else QRS detection (the multi-lead consensus of `ecg.heart_rate.record_heart_rate`, not
the reference's first-lead XQRS); sex 'M' -> 1, 'F' -> 0, anything else unknown (skipped as `missing_sex`).
Records whose subject is absent from patients.csv are skipped as `missing_demographics`. The MIMIC lead order (aVF
before aVL) is reordered by name.
"""

from __future__ import annotations

import os

import pandas as pd

from diffusets_jax.conditioning.prompts import report_lines
from diffusets_jax.data.builder import EcgDatasetBuilder, embedder_configs
from diffusets_jax.data.records import RecordCandidate

REPORT_COLUMNS = tuple(f"report_{i}" for i in range(18))
PATIENTS_LOCATIONS = ("patients.csv", "patients.csv.gz", "hosp/patients.csv", "hosp/patients.csv.gz")


def find_patients_table(manual_dir: str) -> str:
    """Path of MIMIC-IV's patients table inside the manual dir (plain or gzipped, top level or hosp/)."""
    for relative in PATIENTS_LOCATIONS:
        path = os.path.join(manual_dir, relative)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"MIMIC-IV patients table not found in {manual_dir} (looked for {', '.join(PATIENTS_LOCATIONS)}); "
        "copy hosp/patients.csv.gz from MIMIC-IV into the manual dir"
    )


def table_path(manual_dir: str, name: str) -> str:
    """Path of one of the source CSVs (plain or .gz), with a clear error naming the file if it is missing."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(manual_dir, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{os.path.join(manual_dir, name)} not found: is the manual dir the MIMIC-IV-ECG download?")


class Builder(EcgDatasetBuilder):
    """MIMIC-IV-ECG v1.0 12-lead ECGs with machine reports, demographics and heart rate."""

    BUILDER_CONFIGS = embedder_configs("MIMIC-IV-ECG, patient-disjoint splits from a hash of subject_id.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download MIMIC-IV-ECG v1.0 (https://physionet.org/content/mimic-iv-ecg/1.0/; credentialed access) so that
    the manual dir holds `record_list.csv`, `machine_measurements.csv` and `files/p1000/...`:
        wget -r -N -c -np --user YOUR_USER --ask-password https://physionet.org/files/mimic-iv-ecg/1.0/
    then copy MIMIC-IV's `hosp/patients.csv.gz` (https://physionet.org/content/mimiciv/) into the same folder
    (top level or `hosp/`). Pass that folder as --manual_dir (tfds build) or --manual-dir (diffusets-jax prepare).
    """
    _description = __doc__
    _homepage = "https://physionet.org/content/mimic-iv-ecg/1.0/"
    _citation = """\
@article{gow2023mimic,
  title={MIMIC-IV-ECG: Diagnostic Electrocardiogram Matched Subset},
  author={Gow, Brian and Pollard, Tom and Nathanson, Larry A and Johnson, Alistair and Moody, Benjamin and
          Fernandes, Chrystinne and Greenbaum, Nathaniel and Waks, Jonathan W and Eslami, Parastou and
          Carbonati, Tanner and others},
  journal={PhysioNet},
  year={2023},
  doi={10.13026/4nqg-sb35}
}"""

    def _first_rows(self, table: pd.DataFrame, key: str, path: str) -> pd.DataFrame:
        """`table` with the first row of each `key`; each later one (a merged export, a table appended to twice) is
        skipped and counted as a bad table row: its report or demographics, maybe not the first's, were dropped
        without a word."""
        repeated = table[key].duplicated()
        for line, value in zip(table.loc[repeated, "_line"].tolist(), table.loc[repeated, key].tolist(), strict=True):
            self._skip_row(path, line, f"{key} {value} listed again; the first row is used")
        return table[~repeated]

    def list_candidates(self, manual_dir: str) -> list[RecordCandidate]:
        # Rows that cannot be used are skipped and counted by read_table; a table without the columns it needs
        # stops the build with one line. Report columns and rr_interval may be partly absent: what is there is used.
        records_path = table_path(manual_dir, "record_list.csv")
        records = self.read_table(records_path, what="MIMIC-IV-ECG record list",
                                  required=("subject_id", "study_id", "path"), integers=("subject_id", "study_id"))
        measurements_path = table_path(manual_dir, "machine_measurements.csv")
        measurements = self.read_table(measurements_path, what="MIMIC-IV-ECG machine measurements",
                                       required=("study_id",), optional=(*REPORT_COLUMNS, "rr_interval"),
                                       integers=("study_id",))
        if not any(column in measurements.columns for column in REPORT_COLUMNS):
            raise ValueError(f"{measurements_path}: no report columns (report_0 ... report_17): is it the MIMIC-IV-ECG "
                             "machine_measurements.csv?")
        measurements = self._first_rows(measurements, "study_id", measurements_path)
        # Each table is read into dicts once, column by column: pandas lookups per record (`.loc`) cost 0.2-0.3 ms,
        # three to four minutes of every prepare of MIMIC-IV-ECG's 800,000 records, even one that finds its dataset
        # complete.
        present = [column for column in REPORT_COLUMNS if column in measurements.columns]
        report_cells = zip(*(measurements[column].tolist() for column in present), strict=True)
        cells_of = dict(zip(measurements["study_id"].tolist(), report_cells, strict=True))
        rr_values = (pd.to_numeric(measurements["rr_interval"], errors="coerce").tolist()
                     if "rr_interval" in measurements.columns else [float("nan")] * len(measurements))
        rr_of = dict(zip(measurements["study_id"].tolist(), rr_values, strict=True))
        patients_path = find_patients_table(manual_dir)
        patients = self.read_table(patients_path, what="MIMIC-IV patients table",
                                   required=("subject_id", "gender", "anchor_age"), integers=("subject_id",))
        patients = self._first_rows(patients, "subject_id", patients_path)
        demographics = dict(zip(patients["subject_id"].tolist(), zip(
            pd.to_numeric(patients["anchor_age"], errors="coerce").tolist(),  # an unreadable age counts as missing
            patients["gender"].tolist(), strict=True), strict=True))
        candidates = []
        path_of_study: dict[int, str] = {}
        for subject_id, study_id, path, line in zip(records["subject_id"].tolist(), records["study_id"].tolist(),
                                                    records["path"].tolist(), records["_line"].tolist(), strict=True):
            if not isinstance(path, str) or not path.strip():
                self._skip_row(records_path, line, "no record path")
                continue
            record_path = str(path).strip().removesuffix(".hea")
            # A study is one ECG, and its report and RR interval are looked up by study: a second record listed
            # under it (a merged export) would be written with the first one's report.
            if path_of_study.setdefault(study_id, record_path) != record_path:
                self._skip_row(records_path, line, f"study_id {study_id} is already the study of record "
                                                   f"{path_of_study[study_id]}; the first is used")
                continue
            lines: tuple[str, ...] = ()
            rr_ms = None
            if study_id in cells_of:
                # report_0..report_17 in order, empty cells dropped, a cell holding line breaks one statement a line:
                # `report_lines`, as embed and sample read a report, so the statements stored are the prompt's.
                lines = tuple(report_lines(cells_of[study_id]))
                rr_ms = None if pd.isna(rr_of[study_id]) else float(rr_of[study_id])
            age = sex = None
            known = subject_id in demographics
            if known:
                anchor_age, gender = demographics[subject_id]
                age = None if pd.isna(anchor_age) else float(anchor_age)
                # MIMIC-IV writes M or F; anything else is unknown (missing_sex), not female.
                sex = {"M": 1, "F": 0}.get(str(gender).strip().upper()) if not pd.isna(gender) else None
            candidates.append(
                RecordCandidate(
                    record_path=record_path, subject_id=subject_id, study_id=study_id,
                    age=age, sex=sex, report_lines=lines, rr_ms=rr_ms, subject_known=known,
                )
            )
        return candidates
