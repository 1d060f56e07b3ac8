"""ECG signal conventions shared by data preparation, conversion, sampling and metrics.

The project works in the standard 12-lead order; the published DiffuSETS code (trained on MIMIC-IV-ECG)
uses the MIMIC order, which swaps aVL and aVF.
"""

from __future__ import annotations

STANDARD_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")

# REFERENCE_TO_STANDARD[i] = index in the reference (MIMIC) order of standard lead i, so that
# `standard = reference[..., REFERENCE_TO_STANDARD]`. The swap is its own inverse.
REFERENCE_TO_STANDARD: tuple[int, ...] = tuple(MIMIC_LEADS.index(lead) for lead in STANDARD_LEADS)
