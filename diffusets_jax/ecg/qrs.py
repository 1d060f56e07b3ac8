"""QRS detection on a whole 12-lead ECG: one multi-lead detector for data preparation and every metric.

Why not a single-lead detector: on real records a lead with low-amplitude or premature beats loses beats (a sinus
tachycardia read 124 bpm on lead I while 10 of 12 leads say 136), and wfdb's XQRS at the model's 102.4 Hz counts
T waves (a 57 bpm rhythm read as 115). A QRS complex is the one event that is steep on most leads at once, so the
detector looks for exactly that:

1. leads that are flat (span < FLAT_LEAD_MV, a disconnected electrode) or non-finite take no part;
2. each lead is band-passed to the QRS band (8-30 Hz, zero phase, so P and T waves and baseline wander drop out),
   and its absolute slope is averaged over 100 ms (about one QRS width): a per-lead QRS "energy";
3. each lead's energy is scaled by its own 99th percentile, so every lead has one vote whatever its amplitude,
   and the leads are averaged into one multi-lead energy;
4. peaks of that energy at least REFRACTORY_S apart (200 ms: the ventricles cannot fire faster) are beats when
   they reach REL_HEIGHT of the typical beat (median of the tallest third of the peaks, so a few giant
   artefacts or premature beats do not set the scale), stand PROMINENCE times above the record's baseline energy,
   its NOISE_PERCENTILE-th percentile (on noise the peaks stand <= 1.4x above it: noise yields no beats rather than
   300 bpm; a percentile below the median because at 250-300 bpm the 100 ms energy of each QRS covers most of the
   record, which lifted the median to within 2x of the beats and read every such tachycardia as unmeasurable),
   and are steep on at least half of the usable leads (LEAD_SUPPORT: the consensus across leads).

Everything is in seconds, so the same parameters work at 500 Hz (data preparation) and at 102.4 Hz (generated
ECGs); on the 40 real fixture records the beats found at both rates agree with a reference made from two other
detectors on all 12 leads (see tests/data/ecg/reference_rr.json). About 10 ms per 10 s record.

`detect_qrs_xqrs` wraps wfdb's XQRS for one lead: the published DiffuSETS method, kept to reproduce it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings

import numpy as np
import scipy.ndimage
import scipy.signal

FLAT_LEAD_MV = 0.01  # a connected lead of a 10 s ECG always spans far more than 10 microvolts
QRS_BAND_HZ: tuple[float, float] = (8.0, 30.0)  # where QRS slopes are and P/T waves and baseline are not
ENVELOPE_WINDOW_S = 0.1  # about one QRS width
REFRACTORY_S = 0.2  # no two ventricular depolarisations closer than this (300 bpm)
REL_HEIGHT = 0.35  # fraction of a typical beat's multi-lead energy a beat must reach
PROMINENCE = 2.5  # times the record's baseline (NOISE_PERCENTILE) multi-lead energy a beat must reach
NOISE_PERCENTILE = 20.0  # the baseline: below the QRS energy of every rate up to 300 bpm (step 4)
LEAD_SUPPORT = 0.5  # fraction of usable leads that must be steep at a beat
LEAD_STEEP = 0.3  # a lead is steep at a beat when its scaled energy is at least this
MIN_RATE_HZ = 64.0  # the QRS band must fit below Nyquist with room for the filter's roll-off


def usable_leads(ecg: np.ndarray) -> np.ndarray:
    """Boolean mask `(leads,)` of leads that are finite everywhere and span at least FLAT_LEAD_MV."""
    ecg = np.asarray(ecg, dtype=np.float64)
    finite = np.all(np.isfinite(ecg), axis=0)
    span = np.ptp(np.where(np.isfinite(ecg), ecg, 0.0), axis=0)
    return finite & (span >= FLAT_LEAD_MV)


@functools.lru_cache(maxsize=16)
def _qrs_band_filter(fs: float) -> np.ndarray:
    """The QRS band-pass filter at `fs` as second-order sections (read-only). Designed once per rate: designing it
    took about 0.5 of the 4 ms a 500 Hz record's beats took to find (`prepare`, `evaluate`), for the same few
    rates every time."""
    sos = scipy.signal.butter(2, QRS_BAND_HZ, btype="bandpass", fs=fs, output="sos")
    sos.setflags(write=False)
    return sos


def qrs_energy(ecg: np.ndarray, fs: float) -> np.ndarray:
    """Per-lead QRS energy `(samples, usable leads)`, each lead scaled to its 99th percentile (steps 1-3)."""
    x = np.asarray(ecg, dtype=np.float64)[:, usable_leads(ecg)]
    if x.shape[1] == 0:
        return np.zeros((x.shape[0], 0))
    band = scipy.signal.sosfiltfilt(_qrs_band_filter(float(fs)).copy(), x, axis=0)  # scipy takes writable arrays
    slope = np.abs(np.gradient(band, axis=0)) * fs
    window = max(1, int(round(ENVELOPE_WINDOW_S * fs)))
    energy = scipy.ndimage.uniform_filter1d(slope, window, axis=0, mode="nearest")
    scale = np.percentile(energy, 99, axis=0)
    scale[scale <= 0] = 1.0
    return energy / scale


def detect_beats(ecg: np.ndarray, fs: float) -> np.ndarray:
    """Sample indices `(beats,)` of the QRS complexes of `ecg` `(samples, leads)` in mV sampled at `fs` Hz.

    Each index is the centre of the complex (the peak of the multi-lead QRS energy), within a few ms of the R peak.
    An ECG with no usable lead, or with no beat standing out of the noise, has no beats. Any number of leads works
    (a single lead is its own consensus).
    """
    ecg = np.asarray(ecg, dtype=np.float64)
    if ecg.ndim != 2:
        raise ValueError(f"ecg: expected a (samples, leads) array, got shape {ecg.shape}")
    if not fs >= MIN_RATE_HZ:
        raise ValueError(f"fs: QRS detection needs at least {MIN_RATE_HZ:g} Hz, got {fs}; resample the ECG first")
    if ecg.shape[0] < 3 * max(1, int(round(REFRACTORY_S * fs))):
        return np.zeros((0,), dtype=np.int64)
    energy = qrs_energy(ecg, fs)
    if energy.shape[1] == 0:
        return np.zeros((0,), dtype=np.int64)
    combined = energy.mean(axis=1)
    peaks, _ = scipy.signal.find_peaks(combined, distance=max(1, int(round(REFRACTORY_S * fs))))
    if peaks.size == 0:
        return np.zeros((0,), dtype=np.int64)
    heights = combined[peaks]
    typical = float(np.median(np.sort(heights)[-max(1, heights.size // 3):]))
    floor = PROMINENCE * float(np.percentile(combined, NOISE_PERCENTILE))
    beats = peaks[(heights >= REL_HEIGHT * typical) & (heights >= floor)]
    support = (energy[beats] >= LEAD_STEEP).mean(axis=1)
    return beats[support >= LEAD_SUPPORT].astype(np.int64)


def detect_qrs_xqrs(lead_signal: np.ndarray, fs: float) -> np.ndarray:
    """Sample indices of the QRS complexes wfdb's XQRS finds in one lead `(n,)`, silently.

    The published DiffuSETS detector (one lead at a time). XQRS prints its progress and warns on flat input; a lead
    it cannot process yields no detections.
    """
    from wfdb.processing import XQRS

    values = np.nan_to_num(np.asarray(lead_signal, dtype=np.float64))
    if values.size < 2 or np.ptp(values) == 0.0:  # XQRS divides by the signal's spread
        return np.zeros((0,), dtype=np.int64)
    wfdb_logger = logging.getLogger("wfdb")
    previous_level = wfdb_logger.level
    wfdb_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            xqrs = XQRS(sig=values, fs=float(fs))
            xqrs.detect(verbose=False)
        return np.asarray(xqrs.qrs_inds, dtype=np.int64)
    except (ValueError, IndexError, ZeroDivisionError, FloatingPointError):
        return np.zeros((0,), dtype=np.int64)
    finally:
        wfdb_logger.setLevel(previous_level)
