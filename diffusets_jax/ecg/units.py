"""Physical units: WFDB header units to millivolts, and checks that a record is a usable signal in millivolts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def finite_ecgs(ecgs: np.ndarray) -> np.ndarray:
    """Which ECGs of `ecgs` (n, samples, 12) have only finite samples: `(n,)` bool. The others (a diverged network,
    an overflow in low precision, a damaged record) are skipped and counted by whoever reads them."""
    return np.isfinite(np.asarray(ecgs)).all(axis=(1, 2))


NON_FINITE_SUFFIX = "non-finite samples (NaN/inf)"  # ends every `non_finite_reason`, so a recorded reason is known


def non_finite_reason(ecg: np.ndarray) -> str | None:
    """Why `ecg` (samples, 12) cannot be kept, if it has NaN or infinite samples (a diverged network or an
    overflow in low precision gives these); None for a finite one. Writers skip such an ECG and record the reason."""
    bad = int(np.size(ecg) - np.count_nonzero(np.isfinite(ecg)))
    return f"the ECG has {bad} {NON_FINITE_SUFFIX}" if bad else None
