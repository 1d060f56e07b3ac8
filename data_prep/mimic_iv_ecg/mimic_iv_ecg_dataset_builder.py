"""MIMIC-IV-ECG (PhysioNet, ~800k 10 s 12-lead ECGs) as DiffuSETS training examples.

Joins `record_list.csv` (record paths) with `machine_measurements.csv` (report_0..report_17, rr_interval)
on study_id and with MIMIC-IV `patients.csv` (anchor_age, gender) on subject_id, exactly as the reference
(spec sections 2-4): report lines in column order with empty cells dropped; heart rate 60000 / rr_interval
for 300-1500 ms, else XQRS; sex 'M' -> 1, otherwise 0. Records whose subject is absent from patients.csv are
skipped as `missing_demographics`. The MIMIC lead order (aVF before aVL) is reordered by name.
"""

from __future__ import annotations

import os

import pandas as pd

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


def read_table(manual_dir: str, name: str, **kwargs) -> pd.DataFrame:  # noqa: ANN003
    """Read one of the source CSVs (plain or .gz) with a clear error naming the file if it is missing."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(manual_dir, candidate)
        if os.path.exists(path):
            return pd.read_csv(path, **kwargs)
    raise FileNotFoundError(f"{os.path.join(manual_dir, name)} not found: is the manual dir the MIMIC-IV-ECG download?")


def report_lines_of(row: pd.Series) -> tuple[str, ...]:
    """report_0..report_17 in order, empty / NaN cells dropped, surrounding spaces stripped."""
    lines = []
    for column in REPORT_COLUMNS:
        value = row.get(column)
        if isinstance(value, str) and value.strip():
            lines.append(value.strip())
    return tuple(lines)


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

    def list_candidates(self, manual_dir: str) -> list[RecordCandidate]:
        records = read_table(manual_dir, "record_list.csv", usecols=["subject_id", "study_id", "path"])
        measurements = read_table(
            manual_dir, "machine_measurements.csv", usecols=["study_id", *REPORT_COLUMNS, "rr_interval"], dtype={c: "string" for c in REPORT_COLUMNS}
        ).drop_duplicates("study_id").set_index("study_id")
        patients = pd.read_csv(find_patients_table(manual_dir), usecols=["subject_id", "gender", "anchor_age"])
        patients = patients.drop_duplicates("subject_id").set_index("subject_id")
        candidates = []
        for subject_id, study_id, path in records.itertuples(index=False):
            subject_id, study_id = int(subject_id), int(study_id)
            lines: tuple[str, ...] = ()
            rr_ms = None
            if study_id in measurements.index:
                row = measurements.loc[study_id]
                lines = report_lines_of(row)
                rr_ms = None if pd.isna(row["rr_interval"]) else float(row["rr_interval"])
            age = sex = None
            known = subject_id in patients.index
            if known:
                patient = patients.loc[subject_id]
                age = None if pd.isna(patient["anchor_age"]) else float(patient["anchor_age"])
                sex = None if pd.isna(patient["gender"]) else int(str(patient["gender"]).strip().upper() == "M")
            candidates.append(
                RecordCandidate(
                    record_path=str(path).strip().removesuffix(".hea"), subject_id=subject_id, study_id=study_id,
                    age=age, sex=sex, report_lines=lines, rr_ms=rr_ms, subject_known=known,
                )
            )
        return candidates
