"""ECG signal conventions shared by data preparation, conversion, sampling and metrics.

The project works in the standard 12-lead order; the published DiffuSETS code (trained on MIMIC-IV-ECG)
uses the MIMIC order, which swaps aVL and aVF.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.signal

STANDARD_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")

# REFERENCE_TO_STANDARD[i] = index in the reference (MIMIC) order of standard lead i, so that
# `standard = reference[..., REFERENCE_TO_STANDARD]`. The swap is its own inverse.
REFERENCE_TO_STANDARD: tuple[int, ...] = tuple(MIMIC_LEADS.index(lead) for lead in STANDARD_LEADS)

ECG_SECONDS = 10.0  # every DiffuSETS record is a whole 10-second recording
ECG_LENGTH = 1024  # samples per record after resampling: the DiffuSETS time base
ECG_RATE_HZ = ECG_LENGTH / ECG_SECONDS  # 102.4 Hz, the effective sampling rate of a (1024, 12) record

# Canonical spelling of every lead name we accept, keyed by the upper-cased name. WFDB headers from
# different carts write "AVL", "aVL" or "avl"; PhysioNet Challenge files sometimes add spaces.
_LEAD_BY_KEY: dict[str, str] = {lead.upper(): lead for lead in STANDARD_LEADS}


class LeadNameError(ValueError):
    """A record's lead names cannot be mapped onto the requested lead order."""


class UnknownLeadError(LeadNameError):
    """A lead name is not one of the 12 standard leads (under any accepted spelling)."""


class MissingLeadError(LeadNameError):
    """A requested lead is absent from the record (e.g. a 2- or 6-lead recording)."""


def canonical_lead_name(name: str) -> str:
    """The standard spelling of a lead name: 'AVL', 'avl', ' aVL ' -> 'aVL'; 'v1' -> 'V1'.

    Raises UnknownLeadError for anything that is not one of the 12 standard leads.
    """
    key = "".join(str(name).split()).upper()
    if key.startswith("LEAD"):
        key = key[4:]
    if key not in _LEAD_BY_KEY:
        raise UnknownLeadError(f"unknown lead name {name!r}; expected one of {', '.join(STANDARD_LEADS)}")
    return _LEAD_BY_KEY[key]


def lead_permutation(
    lead_names: Sequence[str], target: Sequence[str] = STANDARD_LEADS, allow_extra: bool = False
) -> list[int]:
    """Column indices that take a record with columns `lead_names` to the `target` order.

    Unknown lead names raise UnknownLeadError unless `allow_extra` (then e.g. a 15-lead record's Frank leads
    vx, vy, vz are ignored as long as every target lead is present). A lead named twice is an error because
    we cannot tell which column is right.
    """
    canonical: list[str | None] = []
    for name in lead_names:
        try:
            canonical.append(canonical_lead_name(name))
        except UnknownLeadError:
            if not allow_extra:
                raise
            canonical.append(None)
    duplicates = sorted({lead for lead in canonical if lead is not None and canonical.count(lead) > 1})
    if duplicates:
        raise LeadNameError(f"lead(s) {', '.join(duplicates)} appear more than once in {list(lead_names)}")
    wanted = [canonical_lead_name(name) for name in target]
    missing = [lead for lead in wanted if lead not in canonical]
    if missing:
        raise MissingLeadError(f"record has leads {list(lead_names)}; missing {', '.join(missing)}")
    return [canonical.index(lead) for lead in wanted]


def reorder_leads(
    signal: np.ndarray, lead_names: Sequence[str], target: Sequence[str] = STANDARD_LEADS, allow_extra: bool = False
) -> np.ndarray:
    """Reorder the lead (last) axis of `signal` (..., n_leads) from `lead_names` to `target` by name.

    Works for any leading shape, e.g. (5000, 12) or (batch, 1024, 12). Accepts the usual spellings of lead
    names ("AVL"/"aVL"); raises MissingLeadError / UnknownLeadError (both ValueError) naming the leads.
    """
    signal = np.asarray(signal)
    if signal.shape[-1] != len(lead_names):
        raise LeadNameError(f"signal has {signal.shape[-1]} leads on its last axis but {len(lead_names)} names")
    return signal[..., lead_permutation(lead_names, target, allow_extra)]


def resample_to_length(
    signal: np.ndarray, length: int = ECG_LENGTH, axis: int = 0, dtype: np.dtype = np.float32
) -> np.ndarray:
    """FFT-resample a whole record to `length` samples along `axis`, NaN -> 0 first (the DiffuSETS rule).

    `scipy.signal.resample` over the whole record, exactly as the reference preprocessing: a 10 s record at
    any sampling rate becomes (1024, 12) at an effective 102.4 Hz. Computed in float64, returned as `dtype`.
    """
    values = np.nan_to_num(np.asarray(signal, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.shape[axis] == length:
        return values.astype(dtype)
    return scipy.signal.resample(values, length, axis=axis).astype(dtype)


def resample_rate(
    signal: np.ndarray, fs_in: float, fs_out: float, axis: int = 0, dtype: np.dtype = np.float32
) -> np.ndarray:
    """FFT-resample from `fs_in` to `fs_out` Hz, keeping the duration: n samples -> round(n * fs_out / fs_in).

    The inverse of `resample_to_length` for writing records at a clinical rate, e.g. a generated (1024, 12)
    record at 102.4 Hz -> (5000, 12) at 500 Hz for WFDB output. NaN -> 0 as in `resample_to_length`.
    """
    if fs_in <= 0 or fs_out <= 0:
        raise ValueError(f"sampling rates must be positive, got fs_in={fs_in}, fs_out={fs_out}")
    n_out = int(round(np.asarray(signal).shape[axis] * float(fs_out) / float(fs_in)))
    return resample_to_length(signal, n_out, axis=axis, dtype=dtype)


# Physical units a WFDB header may declare, as a factor to millivolts. Headers write 'mV', 'mv', 'uV', 'µV'.
_MILLIVOLTS_PER_UNIT: dict[str, float] = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}


def millivolt_factor(unit: str) -> float:
    """Multiplier taking values in `unit` ('mV', 'uV', 'V', ...) to millivolts; ValueError if unknown."""
    key = str(unit).strip().lower()
    if key not in _MILLIVOLTS_PER_UNIT:
        raise ValueError(f"unknown signal unit {unit!r}; expected one of mV, uV, V")
    return _MILLIVOLTS_PER_UNIT[key]


def to_millivolts(signal: np.ndarray, units: Sequence[str]) -> np.ndarray:
    """Scale each lead (last axis) of `signal` (..., n_leads) from its declared unit to millivolts."""
    signal = np.asarray(signal)
    if signal.shape[-1] != len(units):
        raise ValueError(f"signal has {signal.shape[-1]} leads but {len(units)} units")
    factors = np.array([millivolt_factor(unit) for unit in units])
    return signal if np.all(factors == 1.0) else signal * factors


# A real surface ECG in millivolts stays within a few mV; a record whose typical amplitude is hundreds is
# almost surely in microvolts (or raw ADC units) and would silently poison training.
MAX_PLAUSIBLE_MV = 30.0


def check_millivolts(ecg: np.ndarray, what: str = "ECG", max_abs_mv: float = MAX_PLAUSIBLE_MV) -> None:
    """Raise ValueError if `ecg` (..., n_leads) does not look like millivolts (e.g. microvolts or ADC counts).

    Uses the 99th percentile of |value| so a few spikes do not trip it; NaNs are ignored.
    """
    values = np.abs(np.asarray(ecg, dtype=np.float64))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(f"{what} has no finite values")
    level = float(np.percentile(finite, 99))
    if level > max_abs_mv:
        raise ValueError(
            f"{what} does not look like millivolts: 99th percentile |value| = {level:.3g} > {max_abs_mv} "
            "(microvolts or ADC counts?); convert with to_millivolts or check the header's units/gain"
        )
