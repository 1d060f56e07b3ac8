"""Synthetic 12-lead ECGs with known beats, intervals and ST levels, for testing detectors and clinical metrics.

Each wave is a raised-cosine (Hann) bump with a hard start and end, so its onset and offset are exact: P from
`p_onset` to `p_onset + p_ms`, the QRS as a small Q, a tall R and an S filling `qrs_ms` exactly, T ending exactly
`qt_ms` after the QRS onset, and an optional ST shift (a plateau from the J point to the T peak). Two "heart vector"
components a(t) (lead I) and b(t) (lead II) make the limb leads by Einthoven's and Goldberger's laws exactly, so
their identity residual is zero; the precordial leads are fixed mixtures of a and b.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.ecg.shapes import ECG_LENGTH, ECG_SECONDS

# Precordial leads V1..V6 as (weight of a, weight of b): V1 mostly negative, growing positive towards V5/V6.
PRECORDIAL_MIX = ((-0.6, -0.3), (-0.2, 0.1), (0.3, 0.4), (0.6, 0.7), (0.9, 0.5), (0.8, 0.3))


@dataclasses.dataclass(frozen=True)
class SyntheticBeat:
    """Intervals (ms) and amplitudes (mV, lead II) of every beat."""

    pr_ms: float = 160.0
    qrs_ms: float = 90.0
    qt_ms: float = 380.0
    p_ms: float = 100.0
    t_ms: float = 160.0
    r_mv: float = 1.2
    p_mv: float = 0.15
    t_mv: float = 0.3
    st_mv: float = 0.0  # ST shift from the J point to the T peak (lead II; lead I gets half)


def _bump(t: np.ndarray, start: float, width: float) -> np.ndarray:
    """Hann bump equal to 0 outside [start, start + width] and 1 at its middle."""
    phase = (t - start) / width
    inside = (phase >= 0.0) & (phase <= 1.0)
    return np.where(inside, 0.5 - 0.5 * np.cos(2.0 * np.pi * np.clip(phase, 0.0, 1.0)), 0.0)


def beat_waveform(t: np.ndarray, r_time: float, beat: SyntheticBeat) -> np.ndarray:
    """Lead-II waveform of one beat whose QRS is centred on the R peak at `r_time` (s), on times `t` (s)."""
    qrs = beat.qrs_ms / 1000.0
    qrs_on = r_time - 0.5 * qrs
    p_on = qrs_on - beat.pr_ms / 1000.0
    t_end = qrs_on + beat.qt_ms / 1000.0
    t_on = t_end - beat.t_ms / 1000.0
    wave = beat.p_mv * _bump(t, p_on, beat.p_ms / 1000.0)
    wave += -0.15 * beat.r_mv * _bump(t, qrs_on, 0.2 * qrs)  # Q
    wave += beat.r_mv * _bump(t, qrs_on + 0.2 * qrs, 0.6 * qrs)  # R, peak at r_time
    wave += -0.25 * beat.r_mv * _bump(t, qrs_on + 0.8 * qrs, 0.2 * qrs)  # S, ends at the J point
    wave += beat.t_mv * _bump(t, t_on, beat.t_ms / 1000.0)
    if beat.st_mv:
        j = qrs_on + qrs
        t_peak = t_on + 0.5 * beat.t_ms / 1000.0
        plateau = (t >= j) & (t < t_peak)
        wave += np.where(plateau, beat.st_mv, 0.0)
        # The shift returns to baseline over the T wave's second half, so the record stays continuous.
        tail = (t >= t_peak) & (t <= t_end)
        wave += np.where(tail, beat.st_mv * (t_end - t) / max(t_end - t_peak, 1e-9), 0.0)
    return wave


def synthetic_ecg(
    beat_times_s: np.ndarray | list[float],
    beat: SyntheticBeat = SyntheticBeat(),
    fs: float = ECG_LENGTH / ECG_SECONDS,
    seconds: float = ECG_SECONDS,
    noise_mv: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """`(samples, 12)` ECG in mV, standard lead order, with R peaks exactly at `beat_times_s`.

    `noise_mv`: standard deviation of white noise added to every lead (numpy Generator seeded with `seed`).
    """
    n = int(round(seconds * fs))
    t = np.arange(n) / fs
    lead_ii = sum((beat_waveform(t, float(r), beat) for r in beat_times_s), np.zeros(n))
    # Lead I: the same beat at 0.6 of the amplitude (and half the ST shift), so a and b are not proportional.
    smaller = dataclasses.replace(beat, r_mv=0.6 * beat.r_mv, p_mv=0.5 * beat.p_mv, t_mv=0.7 * beat.t_mv,
                                  st_mv=0.5 * beat.st_mv)
    lead_i = sum((beat_waveform(t, float(r), smaller) for r in beat_times_s), np.zeros(n))
    a, b = lead_i, lead_ii
    limb = {"I": a, "II": b, "III": b - a, "aVR": -(a + b) / 2, "aVL": a - b / 2, "aVF": b - a / 2}
    precordial = {f"V{i + 1}": wa * a + wb * b for i, (wa, wb) in enumerate(PRECORDIAL_MIX)}
    ecg = np.stack([{**limb, **precordial}[lead] for lead in STANDARD_LEADS], axis=1)
    if noise_mv:
        ecg = ecg + noise_mv * np.random.default_rng(seed).standard_normal(ecg.shape)
    return ecg


def regular_beats(bpm: float, first_s: float = 0.4, seconds: float = ECG_SECONDS) -> np.ndarray:
    """R-peak times (s) of a regular rhythm at `bpm` from `first_s`, keeping whole beats inside the record."""
    return np.arange(first_s, seconds - 0.45, 60.0 / bpm)
