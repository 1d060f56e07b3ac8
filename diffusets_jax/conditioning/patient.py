"""Patient features: parse and validate sex, age and heart rate, and turn them into the U-Net's inputs.

Conventions (diffusets-reference.md section 3):
- sex: 1 = male, 0 = female (the reference maps MIMIC's 'M' to 1). PTB-XL codes 0 = male, 1 = female:
  parse its column with `parse_sex(value, male_code=0)`.
- age in years; PTB-XL writes 300 for a missing age. Missing values (None, NaN, '', 300) raise
  `MissingPatientValue`, a ValueError subclass, so batch jobs can count "missing" apart from "invalid".
- heart rate in beats per minute.
- The U-Net receives (sex, age, heart rate) in that order. `faithful` passes the raw numbers, as the
  published model was trained; `normalised` scales age and heart rate by 1/100 so all three are O(1), for
  new models; `none` passes zeros (an ablation without patient information). A checkpoint must be used with
  the mode it was trained with (the model directory records it).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

AGE_RANGE = (0.0, 120.0)  # years, inclusive
HEART_RATE_RANGE = (20.0, 300.0)  # bpm, inclusive: beyond these a 10-second ECG is not a heart rhythm
PTBXL_MISSING_AGE = 300
PATIENT_FEATURES = ("sex", "age", "heart_rate")  # the U-Net's order
FeatureMode = Literal["faithful", "normalised", "none"]
# "none": the ablation without patient information (the paper's Fig. 2A): the U-Net's patient inputs are zeros in
# training and sampling, so it cannot use them, with the published architecture and checkpoint format unchanged.
FEATURE_SCALES: dict[str, tuple[float, float, float]] = {
    "faithful": (1.0, 1.0, 1.0), "normalised": (1.0, 0.01, 0.01), "none": (0.0, 0.0, 0.0)}

_SEX_WORDS = {"m": 1, "male": 1, "f": 0, "female": 0}


class MissingPatientValue(ValueError):
    """A patient field is absent (empty, NaN, or a source's missing-value sentinel such as PTB-XL's age 300)."""


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == "" or value.strip().lower() in ("nan", "na", "none", "null")
    return isinstance(value, float | np.floating) and math.isnan(value)


def _as_number(value: object, field: str, allowed: str) -> float:
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{field}: {value!r} is a boolean, expected a number ({allowed})")
    try:
        number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{field}: cannot parse {_shown(value)} as a number ({allowed})") from None
    except OverflowError:  # an int beyond a float's range (a 400-digit age in a JSON file)
        raise ValueError(f"{field}: {_shown(value)} is out of range (allowed: {allowed})") from None
    if not math.isfinite(number):
        raise ValueError(f"{field}: {_shown(value)} is not a finite number ({allowed})")
    return number


def _shown(value: object, limit: int = 40) -> str:
    """`value` as a message shows it: its repr, cut short, so one wrong cell stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_sex(value: object, *, male_code: int = 1, field: str = "sex") -> int:
    """'M'/'male'/'F'/'female' (any case) or a numeric code -> 1 (male) or 0 (female).

    Numeric codes follow `male_code`: 1 (default, this project's and MIMIC-derived convention) or 0 (PTB-XL).
    """
    allowed = f"M, F, male, female, or {male_code} = male / {1 - male_code} = female"
    if male_code not in (0, 1):
        raise ValueError(f"male_code must be 0 or 1, got {male_code!r}")
    if _is_missing(value):
        raise MissingPatientValue(f"{field} is missing (allowed: {allowed})")
    if isinstance(value, str) and value.strip().lower() in _SEX_WORDS:
        return _SEX_WORDS[value.strip().lower()]
    try:
        number = _as_number(value, field, allowed)
    except ValueError:
        raise ValueError(f"{field}: cannot parse {_shown(value)} (allowed: {allowed})") from None
    if number not in (0.0, 1.0):
        raise ValueError(f"{field}: {_shown(value)} is not a sex code (allowed: {allowed})")
    return int(number == male_code)


def parse_age(value: object, *, field: str = "age") -> float:
    """Age in years, within AGE_RANGE. None/NaN/'' and PTB-XL's 300 raise MissingPatientValue."""
    allowed = f"{AGE_RANGE[0]:g} to {AGE_RANGE[1]:g} years"
    if _is_missing(value):
        raise MissingPatientValue(f"{field} is missing (allowed: {allowed})")
    age = _as_number(value, field, allowed)
    if age == PTBXL_MISSING_AGE:
        raise MissingPatientValue(f"{field} is {PTBXL_MISSING_AGE}, PTB-XL's code for a missing age")
    if not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
        raise ValueError(f"{field}: {_shown(value)} is out of range (allowed: {allowed})")
    return age


def parse_heart_rate(value: object, *, field: str = "heart_rate") -> float:
    """Heart rate in beats per minute, within HEART_RATE_RANGE."""
    allowed = f"{HEART_RATE_RANGE[0]:g} to {HEART_RATE_RANGE[1]:g} bpm"
    if _is_missing(value):
        raise MissingPatientValue(f"{field} is missing (allowed: {allowed})")
    rate = _as_number(value, field, allowed)
    if not HEART_RATE_RANGE[0] <= rate <= HEART_RATE_RANGE[1]:
        raise ValueError(f"{field}: {_shown(value)} is out of range (allowed: {allowed})")
    return rate


def patient_features(sex: object, age: object, heart_rate: object, mode: FeatureMode = "faithful") -> np.ndarray:
    """Arrays (batch,) of sex (0/1), age (years), heart rate (bpm) -> the U-Net's patient inputs (batch, 3) float32.

    Columns are (sex, age, heart rate). `faithful`: raw values as the published model was trained;
    `normalised`: (sex, age / 100, heart rate / 100); `none`: zeros (the values are still validated). Values are validated against the same ranges as the
    parsers; the error names the field and the first offending index.
    """
    if mode not in FEATURE_SCALES:
        raise ValueError(f"mode must be one of {sorted(FEATURE_SCALES)}, got {mode!r}")
    columns = []
    for field, values in zip(PATIENT_FEATURES, (sex, age, heart_rate), strict=True):
        array = np.asarray(values, dtype=np.float64)
        if array.ndim > 1:
            raise ValueError(f"{field}: expected a scalar or a (batch,) array, got shape {array.shape}")
        columns.append(np.atleast_1d(array))
    sizes = {len(c) for c in columns}
    if len(sizes) != 1:
        raise ValueError(f"sex, age and heart_rate must have the same length, got {[len(c) for c in columns]}")
    checks = {
        "sex": (lambda a: (a == 0) | (a == 1), "0 (female) or 1 (male)"),
        "age": (lambda a: (a >= AGE_RANGE[0]) & (a <= AGE_RANGE[1]), f"{AGE_RANGE[0]:g} to {AGE_RANGE[1]:g} years"),
        "heart_rate": (
            lambda a: (a >= HEART_RATE_RANGE[0]) & (a <= HEART_RATE_RANGE[1]),
            f"{HEART_RATE_RANGE[0]:g} to {HEART_RATE_RANGE[1]:g} bpm",
        ),
    }
    for field, column in zip(PATIENT_FEATURES, columns, strict=True):
        valid, allowed = checks[field]
        bad = np.flatnonzero(~valid(column))  # NaN fails every comparison, so it is caught here too
        if bad.size:
            raise ValueError(f"{field}[{bad[0]}] = {float(column[bad[0]])} is out of range (allowed: {allowed}); {bad.size} bad")
    features = np.stack(columns, axis=-1) * np.asarray(FEATURE_SCALES[mode])
    return features.astype(np.float32)
