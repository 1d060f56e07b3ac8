"""PTB-XL (PhysioNet, 21,799 10 s 12-lead ECGs) as DiffuSETS examples: the paper's external validation set.

From `ptbxl_database.csv`: the 500 Hz record (`filename_hr`), `report` (one statement, as written),
`age` (300 marks a missing/anonymised age: such records are skipped as `missing_age`), `sex` (PTB-XL codes
0 = male, 1 = female; stored in our convention 1 = male), `patient_id`, `ecg_id` (study id) and `strat_fold`.
PTB-XL has no machine RR interval, so every heart rate comes from QRS detection on the 500 Hz signal (the
multi-lead consensus of `ecg.heart_rate.record_heart_rate`, source "qrs").

Time base: unlike the reference (125 Hz, centre crop of 8.19 s), every source here uses the MIMIC time base,
the whole 10 s resampled to 1024 samples, so models trained on MIMIC see PTB-XL at the same rate.
Splits default to PTB-XL's folds (1-8 train, 9 validation, 10 test = the reference's test set); the
`*_subject_hash` configs use the patient hash instead. Prompts default to the paper's PTB-XL template
"The report of the ECG is that {report}."; the `*_ordered` configs use the ordered prompt.
"""

from __future__ import annotations

import os

import pandas as pd

from diffusets_jax.data.builder import EcgDatasetBuilder, embedder_configs, stable_int_id
from diffusets_jax.data.records import RecordCandidate

MISSING_AGE = 300  # PTB-XL writes 300 where the age is not available (reference spec section 3)


class Builder(EcgDatasetBuilder):
    """PTB-XL v1.0.3 500 Hz records with report text, age, sex and QRS-detected heart rate."""

    BUILDER_CONFIGS = [
        *embedder_configs("PTB-XL, strat_fold splits, paper prompt template.",
                          split_by="strat_fold", prompt_style="free_text"),
        *embedder_configs("PTB-XL, patient-disjoint splits from a hash of patient_id, ordered prompt.",
                          name_suffix="_subject_hash_ordered", split_by="subject_hash", prompt_style="ordered"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download PTB-XL v1.0.3 (https://physionet.org/content/ptb-xl/1.0.3/; open access):
        wget -r -N -c -np https://physionet.org/files/ptb-xl/1.0.3/
    and pass the folder holding `ptbxl_database.csv` and `records500/` as the manual dir.
    """
    _description = __doc__
    _homepage = "https://physionet.org/content/ptb-xl/1.0.3/"
    _citation = """\
@article{wagner2020ptbxl,
  title={PTB-XL, a large publicly available electrocardiography dataset},
  author={Wagner, Patrick and Strodthoff, Nils and Bousseljot, Ralf-Dieter and Kreiseler, Dieter and
          Lunze, Fatima I and Samek, Wojciech and Schaeffter, Tobias},
  journal={Scientific Data}, volume={7}, number={1}, pages={154}, year={2020}
}"""

    def list_candidates(self, manual_dir: str) -> list[RecordCandidate]:
        path = os.path.join(manual_dir, "ptbxl_database.csv")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: is the manual dir the PTB-XL download?")
        # Unusable rows (not UTF-8, malformed, no integer ecg_id, no file name) are skipped and counted.
        table = self.read_table(path, what="PTB-XL database table", integers=("ecg_id",),
                                required=("ecg_id", "patient_id", "age", "sex", "report", "strat_fold", "filename_hr"))
        number = lambda value: pd.to_numeric(value, errors="coerce")  # an unreadable value counts as missing
        candidates = []
        # The line numbers travel beside the tuples: itertuples renames a column with a leading underscore (`_line`).
        for row, line in zip(table.itertuples(index=False), table["_line"], strict=True):
            ecg_id = int(row.ecg_id)
            if not isinstance(row.filename_hr, str) or not row.filename_hr.strip():
                self._skip_row(path, line, "no filename_hr")
                continue
            patient, age, sex, fold = (number(row.patient_id), number(row.age), number(row.sex),
                                       number(row.strat_fold))
            if self.builder_config.split_by == "strat_fold" and fold not in range(1, 11):
                # The split comes from the fold: without one the record belongs nowhere (the other configs split
                # by patient and keep it).
                self._skip_row(path, line, f"strat_fold {row.strat_fold!r} is not a fold number 1-10")
                continue
            subject_id = stable_int_id(f"ptbxl-ecg:{ecg_id}") if pd.isna(patient) else int(patient)
            age = None if pd.isna(age) or int(age) == MISSING_AGE else float(age)
            sex = None if pd.isna(sex) or sex not in (0, 1) else 1 - int(sex)  # PTB-XL 0 = male -> ours 1 = male
            report = "" if pd.isna(row.report) else str(row.report).strip().rstrip(".").strip()
            candidates.append(
                RecordCandidate(
                    record_path=row.filename_hr.strip(), subject_id=subject_id, study_id=ecg_id, age=age,
                    sex=sex, report_lines=(report,) if report else (), rr_ms=None,
                    strat_fold=None if pd.isna(fold) else int(fold),
                )
            )
        return candidates
