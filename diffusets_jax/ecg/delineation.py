"""ECG intervals (PR, QRS, QT, QTc) and ST levels at J+60 ms, from NeuroKit2's wavelet delineator on a median beat.

How, and why so:
- the record is resampled to DELINEATION_RATE_HZ (250 Hz): at the model's 102.4 Hz one sample is ~10 ms, and
  NeuroKit's output points land on input samples (it analyses at 2000 Hz inside); high-passed at 0.5 Hz and
  notched at 50 and 60 Hz (POWERLINE_HZ): NeuroKit expects a cleaned ECG, and 0.05 mV of mains hum (it survives
  the 1024-sample time base at 50 Hz) moved QT by a median 36 ms and ST by 0.016 mV on the fixture records;
- the beats (`ecg.qrs.detect_beats`) cut the record into one-RR windows (40% of the median RR before each R peak),
  whose sample-wise median is the median beat of every lead: the way clinical carts measure intervals, robust to
  noise and to a few premature beats;
- NeuroKit2's `ecg_delineate(method="dwt")` (a maintained, published wavelet delineator) runs on lead II's median
  beat repeated to 4.1 s, a periodic signal it accepts (it needs 4 s), and the middle copy's points are read. One
  short signal instead of the whole record makes it ~8x faster (it spends its time per beat): ~0.14 s a record;
- PR = QRS onset - P onset; QRS = QRS offset - onset; QT = T offset - QRS onset; QTc = QT / sqrt(RR in s)
  (Bazett) with the median RR; values outside PLAUSIBLE_MS are not measurements (a delineator locking onto noise)
  and count as unmeasured, like a wave it did not find;
- ST at J+60: on every lead's median beat, the level 60 ms after the QRS offset (the J point) minus the PQ
  baseline (mean over 20-5 ms before the QRS onset), mV.

On the 40 real fixture records, the 500 Hz recording and its 1024-sample (102.4 Hz) version differ by a median
4 ms in PR, QRS and QT (90th percentile 34, 28, 24 ms); PR is measured on 35-36 records, QRS on 37-38, QT on
37. On synthetic beats a PR or QT change is followed to within ~5 ms, but a QRS widened from 90 to 130 ms by
stretching its Hann-shaped waves reads ~100 ms: NeuroKit's QRS offset is conservative, so read QRS-duration errors
as a lower bound.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import scipy.signal

from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.ecg.resample import resample_rate

DELINEATION_RATE_HZ = 250.0
DELINEATION_LEAD = STANDARD_LEADS.index("II")
CYCLE_PRE = 0.4  # fraction of the RR interval before the R peak in a median-beat window
MIN_BEATS = 3  # two whole RR windows make a median
MIN_TILED_S = 4.1  # NeuroKit2 segments beats only in a signal of at least 4 s
R_SEARCH_S = 0.04  # the R peak of the delineation lead lies within this of the multi-lead beat centre
ST_AFTER_J_S = 0.06
PQ_BASELINE_S = (0.02, 0.005)  # baseline window, seconds before the QRS onset
POWERLINE_HZ: tuple[float, ...] = (50.0, 60.0)  # mains frequencies notched out before delineating
POWERLINE_Q = 30.0  # notch quality: ~2 Hz wide, so the QRS spectrum beside it is kept
PLAUSIBLE_MS: dict[str, tuple[float, float]] = {"pr": (60.0, 400.0), "qrs": (40.0, 250.0), "qt": (200.0, 700.0)}


@dataclasses.dataclass(frozen=True)
class Delineation:
    """One record's measurements; NaN where not measured. `st_mv` `(12,)` is ST at J+60 per lead (mV)."""

    pr_ms: float
    qrs_ms: float
    qt_ms: float
    qtc_ms: float
    rr_ms: float
    st_mv: np.ndarray

    @staticmethod
    def unmeasured(n_leads: int) -> Delineation:
        nan = float("nan")
        return Delineation(nan, nan, nan, nan, nan, np.full(n_leads, np.nan))


def median_beat(ecg: np.ndarray, beats: np.ndarray) -> tuple[np.ndarray, int]:
    """Median of one-RR windows around `beats` of `ecg` `(samples, leads)` -> (`(rr, leads)` beat, samples before R).

    The window length is the median RR; windows that do not fit inside the record are left out.
    """
    rr = int(round(float(np.median(np.diff(beats)))))
    pre = int(round(CYCLE_PRE * rr))
    starts = [int(b) - pre for b in beats if int(b) - pre >= 0 and int(b) - pre + rr <= ecg.shape[0]]
    if len(starts) < MIN_BEATS - 1 or rr < 2:
        raise ValueError("beats: fewer than two whole RR windows inside the record")
    windows = np.stack([ecg[s:s + rr] for s in starts])
    return np.median(windows, axis=0), pre


def _plausible(name: str, value_ms: float) -> float:
    low, high = PLAUSIBLE_MS[name]
    return value_ms if low <= value_ms <= high else float("nan")


def _wave_points(lead_beat: np.ndarray, pre: int, fs: float) -> dict[str, float]:
    """P onset, QRS onset/offset, T offset (samples from the median beat's start, NaN if not found)."""
    import neurokit2 as nk

    rr = lead_beat.shape[0]
    copies = max(5, int(math.ceil(MIN_TILED_S * fs / rr)))  # two whole copies on each side of the middle one
    tiled = np.tile(lead_beat, copies)
    r_peaks = pre + rr * np.arange(copies)
    middle = int(r_peaks[copies // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NeuroKit warns about waves it cannot find; those are NaN below
        _, waves = nk.ecg_delineate(tiled, rpeaks=r_peaks, sampling_rate=int(round(fs)), method="dwt")

    def nearest(key: str, after_s: float, before_s: float, last: bool) -> float:
        found = np.asarray(waves.get(key, []), dtype=np.float64)
        found = found[np.isfinite(found)]
        found = found[(found > middle + after_s * fs) & (found < middle + before_s * fs)]
        if found.size == 0:
            return float("nan")
        return float(found.max() if last else found.min()) - middle + pre

    return {
        "p_on": nearest("ECG_P_Onsets", -0.45, -0.03, last=True),
        "qrs_on": nearest("ECG_R_Onsets", -0.15, 0.001, last=True),
        "qrs_off": nearest("ECG_R_Offsets", -0.001, 0.2, last=False),
        "t_off": nearest("ECG_T_Offsets", 0.1, 0.75, last=False),
    }


def delineate(ecg: np.ndarray, fs: float, beats: np.ndarray) -> Delineation:
    """PR, QRS, QT, QTc (ms), median RR (ms) and ST at J+60 per lead (mV) of `ecg` `(samples, 12)` at `fs` Hz.

    `beats` `(k,)` are QRS sample indices at `fs` (from `ecg.qrs.detect_beats`). Fewer than three beats, or waves
    the delineator does not find, give NaN for what depends on them.
    """
    ecg = np.asarray(ecg, dtype=np.float64)
    if ecg.ndim != 2 or ecg.shape[1] != len(STANDARD_LEADS):
        raise ValueError(f"ecg: expected a (samples, 12) array in standard lead order, got shape {ecg.shape}")
    beats = np.asarray(beats, dtype=np.float64)
    if beats.size < MIN_BEATS or not np.all(np.isfinite(ecg)):
        return Delineation.unmeasured(ecg.shape[1])
    x = ecg if fs == DELINEATION_RATE_HZ else resample_rate(ecg, fs, DELINEATION_RATE_HZ, dtype=np.float64)
    fs_d = DELINEATION_RATE_HZ
    x = scipy.signal.sosfiltfilt(scipy.signal.butter(2, 0.5, "highpass", fs=fs_d, output="sos"), x, axis=0)
    for mains_hz in POWERLINE_HZ:
        x = scipy.signal.filtfilt(*scipy.signal.iirnotch(mains_hz, POWERLINE_Q, fs=fs_d), x, axis=0)
    # Move each beat centre onto the delineation lead's R peak (its largest deflection nearby).
    half = int(round(R_SEARCH_S * fs_d))
    lead = np.abs(x[:, DELINEATION_LEAD])
    centres = np.round(beats * fs_d / fs).astype(np.int64)
    r_peaks = []
    for centre in centres:
        low, high = max(int(centre) - half, 0), min(int(centre) + half + 1, lead.shape[0])
        r_peaks.append(low + int(np.argmax(lead[low:high])) if high > low else int(centre))
    try:
        beat, pre = median_beat(x, np.asarray(r_peaks))
    except ValueError:
        return Delineation.unmeasured(ecg.shape[1])
    rr_ms = beat.shape[0] / fs_d * 1000.0
    try:
        points = _wave_points(beat[:, DELINEATION_LEAD], pre, fs_d)
    except Exception:  # noqa: BLE001 -- NeuroKit raises assorted errors on beats it cannot segment: unmeasured
        return dataclasses.replace(Delineation.unmeasured(ecg.shape[1]), rr_ms=rr_ms)
    ms = 1000.0 / fs_d
    pr = _plausible("pr", (points["qrs_on"] - points["p_on"]) * ms)
    qrs = _plausible("qrs", (points["qrs_off"] - points["qrs_on"]) * ms)
    qt = _plausible("qt", (points["t_off"] - points["qrs_on"]) * ms)
    qtc = qt / math.sqrt(rr_ms / 1000.0)
    st = np.full(ecg.shape[1], np.nan)
    if np.isfinite(qrs):
        # The median beat is one period of a periodic signal: indices past either end wrap around.
        j60 = int(round(points["qrs_off"] + ST_AFTER_J_S * fs_d))
        base = np.arange(int(round(points["qrs_on"] - PQ_BASELINE_S[0] * fs_d)),
                         int(round(points["qrs_on"] - PQ_BASELINE_S[1] * fs_d)) + 1)
        st = np.take(beat, j60, axis=0, mode="wrap") - np.take(beat, base, axis=0, mode="wrap").mean(axis=0)
    return Delineation(pr_ms=pr, qrs_ms=qrs, qt_ms=qt, qtc_ms=qtc, rr_ms=rr_ms, st_mv=st)
