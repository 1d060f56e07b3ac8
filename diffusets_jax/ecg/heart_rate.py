"""Heart rate of a 12-lead ECG: from the machine's RR interval, else from QRS detection (reference spec 3).

One implementation for data preparation and the metrics. The published rule, kept for preparation: HR = 60000 / RR
for a machine RR interval of 300-1500 ms; otherwise (MIMIC-IV-ECG writes 0 and 65535 as sentinels) detect QRS
complexes and take HR = 60 / mean RR (s). Records with neither are dropped.

Detection methods (`method`):
- "consensus" (default): `ecg.qrs.detect_beats`, one multi-lead detector that agrees across leads and works at
  500 Hz and at the model's 102.4 Hz alike;
- "xqrs_first_lead": the published code's detector, wfdb's XQRS lead by lead in the published (MIMIC) lead
  order, the first lead with at least two detections. It is kept to reproduce the paper's protocol; on real
  records it reads a missed premature beat on the first lead, or T waves at 102.4 Hz, as the rate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from diffusets_jax.ecg.leads import REFERENCE_TO_STANDARD
from diffusets_jax.ecg.qrs import ENVELOPE_WINDOW_S, REFRACTORY_S, detect_beats, detect_qrs_xqrs

RR_RANGE_MS: tuple[float, float] = (300.0, 1500.0)  # 40-200 bpm: the range a machine RR value is trusted in
MIN_DETECTIONS = 2  # two QRS complexes make one RR interval

HEART_RATE_FROM_RR = "rr"  # the machine's RR interval
HEART_RATE_FROM_QRS = "qrs"  # multi-lead consensus QRS detection
HEART_RATE_FROM_XQRS = "xqrs"  # the published first-lead XQRS detection

CONSENSUS = "consensus"
XQRS_FIRST_LEAD = "xqrs_first_lead"
DETECTION_METHODS: tuple[str, ...] = (CONSENSUS, XQRS_FIRST_LEAD)
_SOURCE_OF_METHOD = {CONSENSUS: HEART_RATE_FROM_QRS, XQRS_FIRST_LEAD: HEART_RATE_FROM_XQRS}

ALL_LEADS = -1  # the `lead` of a rate that no single lead gave (consensus) or that came from the RR interval


class HeartRate(NamedTuple):
    """A record's heart rate: `bpm`, where it came from (`source`, a HEART_RATE_FROM_* value) and the lead index
    that gave it (only for "xqrs_first_lead"; ALL_LEADS otherwise)."""

    bpm: float
    source: str
    lead: int


def heart_rate_from_rr(rr_ms: float | None) -> float | None:
    """60000 / RR (bpm) if `rr_ms` lies in [300, 1500] ms, else None (missing, NaN, 0/65535 sentinels)."""
    if rr_ms is None:
        return None
    try:
        rr = float(rr_ms)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(rr) or not RR_RANGE_MS[0] <= rr <= RR_RANGE_MS[1]:
        return None
    return 60000.0 / rr


def heart_rate_from_beats(beats: np.ndarray, fs: float) -> float | None:
    """60 / mean RR (s) from beat sample indices `(beats,)` at `fs` Hz; None with fewer than two beats."""
    beats = np.asarray(beats, dtype=np.float64)
    if beats.size < MIN_DETECTIONS:
        return None
    mean_rr_s = float(np.mean(np.diff(beats))) / float(fs)
    return 60.0 / mean_rr_s if mean_rr_s > 0 else None


def heart_rate_from_xqrs(signal: np.ndarray, fs: float) -> tuple[float, int] | None:
    """(bpm, lead index) from XQRS on `signal` `(n, leads)` sampled at `fs` Hz, or None (the published method).

    The first lead with at least two detections gives HR = 60 / mean RR (s). A 12-lead `signal` is in the
    standard order, and its leads are tried in the published code's order, the MIMIC one (aVF before aVL: its
    signals never left that order); the index returned is the standard one. Other widths go in column order.
    """
    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise ValueError(f"signal: expected a (samples, leads) array, got shape {signal.shape}")
    order = REFERENCE_TO_STANDARD if signal.shape[1] == len(REFERENCE_TO_STANDARD) else range(signal.shape[1])
    for lead in order:
        bpm = heart_rate_from_beats(detect_qrs_xqrs(signal[:, lead], fs), fs)
        if bpm is not None:
            return bpm, lead
    return None


def detected_heart_rate(signal: np.ndarray, fs: float, method: str = CONSENSUS) -> HeartRate | None:
    """Heart rate of `signal` `(samples, leads)` (mV) at `fs` Hz from QRS detection, or None below two beats."""
    if method not in DETECTION_METHODS:
        raise ValueError(f"method: unknown heart-rate method {method!r}; use one of {', '.join(DETECTION_METHODS)}")
    signal = np.asarray(signal)
    if signal.ndim != 2:
        raise ValueError(f"signal: expected a (samples, leads) array, got shape {signal.shape}")
    if method == XQRS_FIRST_LEAD:
        found = heart_rate_from_xqrs(signal, fs)
        return None if found is None else HeartRate(found[0], HEART_RATE_FROM_XQRS, found[1])
    bpm = heart_rate_from_beats(detect_beats(signal, fs), fs)
    return None if bpm is None else HeartRate(bpm, HEART_RATE_FROM_QRS, ALL_LEADS)


def _bridge_missing(signal: np.ndarray) -> np.ndarray:
    """`signal` `(samples, leads)` with each lead's non-finite samples interpolated linearly between its finite
    neighbours (held flat beyond its first and last one); a lead with no finite sample is zero (flat, ignored)."""
    bridged = np.zeros_like(signal)
    positions = np.arange(signal.shape[0])
    for lead in range(signal.shape[1]):
        finite = np.isfinite(signal[:, lead])
        if finite.any():
            bridged[:, lead] = np.interp(positions, positions[finite], signal[finite, lead])
    return bridged


def record_heart_rate(
    rr_ms: float | None, signal: np.ndarray, fs: float = 500.0, method: str = CONSENSUS
) -> HeartRate | None:
    """A record's heart rate: the machine RR interval if usable (source "rr"), else QRS detection, else None.

    `signal` `(n, leads)` is the record at its native rate (500 Hz for MIMIC-IV-ECG), as in the reference; the
    consensus detector gives the same rate on the 1024-sample training signal.
    """
    if method not in DETECTION_METHODS:
        raise ValueError(f"method: unknown heart-rate method {method!r}; use one of {', '.join(DETECTION_METHODS)}")
    bpm = heart_rate_from_rr(rr_ms)
    if bpm is not None:
        return HeartRate(bpm, HEART_RATE_FROM_RR, ALL_LEADS)
    values = np.asarray(signal, dtype=np.float64)
    if method != CONSENSUS or values.ndim != 2 or np.isfinite(values).all():
        return detected_heart_rate(np.nan_to_num(values), fs, method)
    # Where no lead has a sample for a QRS width or more (a dropout of the whole recording), beats can hide: an RR
    # interval across such a gap spans them, and a 1.2 s gap read a 57 bpm record as 43. The rate is the mean of the
    # intervals clear of such gaps (with REFRACTORY_S around them); shorter runs, down to single missing samples,
    # hide no beat and are only bridged. Missing samples are bridged linearly for detection only: filled with 0, a
    # lead off its baseline stepped at the gap's edges, steeper than any QRS, and those steps set the scale its beats
    # were measured against (a 113 bpm record 3 mV off baseline read as 37).
    missing = ~np.isfinite(values).any(axis=1)
    qrs_width = max(1, int(round(ENVELOPE_WINDOW_S * fs)))
    gap = scipy.ndimage.binary_opening(missing, structure=np.ones(qrs_width, bool))  # runs of >= qrs_width samples
    beats = detect_beats(_bridge_missing(values), fs)
    if not gap.any():
        bpm = heart_rate_from_beats(beats, fs)
        return None if bpm is None else HeartRate(bpm, HEART_RATE_FROM_QRS, ALL_LEADS)
    margin = int(round(REFRACTORY_S * fs))
    near_gap = scipy.ndimage.binary_dilation(gap, iterations=margin) if margin else gap
    seen = [int(b - a) for a, b in zip(beats[:-1], beats[1:], strict=True) if not near_gap[a:b + 1].any()]
    if not seen:
        return None
    return HeartRate(60.0 * float(fs) / float(np.mean(seen)), HEART_RATE_FROM_QRS, ALL_LEADS)
