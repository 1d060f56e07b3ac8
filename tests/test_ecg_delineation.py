"""Median-beat delineation on synthetic ECGs whose waves start and end at known times."""

import numpy as np
import pytest

from diffusets_jax.ecg.delineation import Delineation, delineate, median_beat
from diffusets_jax.ecg.qrs import detect_beats
from diffusets_jax.ecg.shapes import ECG_RATE_HZ
from tests.helpers.synthetic_ecg import SyntheticBeat, regular_beats, synthetic_ecg


def measure(beat: SyntheticBeat, fs: float, bpm: float = 70.0) -> Delineation:
    ecg = synthetic_ecg(regular_beats(bpm), beat, fs=fs)
    return delineate(ecg, fs, detect_beats(ecg, fs))


def test_median_beat_of_identical_windows_is_that_window():
    x = np.tile(np.arange(100.0)[:, None], (5, 2))  # period 100
    beat, pre = median_beat(x, np.array([40, 140, 240, 340, 440]))
    assert pre == 40 and beat.shape == (100, 2)
    np.testing.assert_array_equal(beat[:, 0], np.arange(100.0))  # each window starts 40 before its beat


@pytest.mark.parametrize("fs", [500.0, ECG_RATE_HZ])
def test_intervals_of_a_known_beat(fs):
    truth = SyntheticBeat()  # PR 160, QRS 90, QT 380 ms
    found = measure(truth, fs)
    assert found.pr_ms == pytest.approx(truth.pr_ms, abs=20)
    assert found.qrs_ms == pytest.approx(truth.qrs_ms, abs=20)
    assert found.qt_ms == pytest.approx(truth.qt_ms, abs=20)
    assert found.rr_ms == pytest.approx(60000 / 70, abs=12)
    assert found.qtc_ms == pytest.approx(found.qt_ms / np.sqrt(found.rr_ms / 1000), rel=1e-9)
    np.testing.assert_allclose(found.st_mv, 0.0, atol=0.02)


@pytest.mark.parametrize("fs", [500.0, ECG_RATE_HZ])
def test_interval_changes_are_measured(fs):
    # What the metrics compare is a difference between two records: it must follow the true difference.
    base = measure(SyntheticBeat(), fs)
    assert measure(SyntheticBeat(pr_ms=220.0), fs).pr_ms - base.pr_ms == pytest.approx(60, abs=12)
    assert measure(SyntheticBeat(qt_ms=460.0), fs).qt_ms - base.qt_ms == pytest.approx(80, abs=12)


@pytest.mark.parametrize("fs", [500.0, ECG_RATE_HZ])
def test_st_elevation_at_j_plus_60(fs):
    found = measure(SyntheticBeat(st_mv=0.2), fs)
    assert found.st_mv[1] == pytest.approx(0.2, abs=0.02)  # lead II
    assert found.st_mv[0] == pytest.approx(0.1, abs=0.02)  # lead I carries half
    assert found.st_mv[2] == pytest.approx(0.1, abs=0.02)  # III = II - I


def test_unmeasurable_records_give_nan():
    ecg = synthetic_ecg(regular_beats(70.0))
    assert np.isnan(delineate(ecg, ECG_RATE_HZ, np.array([100, 200])).pr_ms)  # two beats: no median beat
    nan_ecg = ecg.copy()
    nan_ecg[5, 3] = np.nan
    assert np.isnan(delineate(nan_ecg, ECG_RATE_HZ, detect_beats(ecg, ECG_RATE_HZ)).qt_ms)
    with pytest.raises(ValueError, match=r"ecg: expected a \(samples, 12\) array"):
        delineate(ecg[:, :3], ECG_RATE_HZ, np.array([100, 200, 300]))


@pytest.mark.parametrize(("fs", "mains_hz"), [(ECG_RATE_HZ, 50.0), (500.0, 50.0), (500.0, 60.0)])
def test_mains_hum_does_not_move_the_intervals(fs, mains_hz):
    # 0.05 mV of mains hum, common on real records (and 50 Hz survives the 102.4 Hz time base), moved the T offset
    # the wavelet delineator finds by tens of ms and ST by as much as the hum's amplitude.
    ecg = synthetic_ecg(regular_beats(70.0), SyntheticBeat(), fs=fs)
    hum = 0.05 * np.sin(2 * np.pi * mains_hz * np.arange(ecg.shape[0]) / fs + 0.3)[:, None]
    clean = delineate(ecg, fs, detect_beats(ecg, fs))
    noisy = delineate(ecg + hum, fs, detect_beats(ecg + hum, fs))
    for name in ("pr_ms", "qrs_ms", "qt_ms"):
        assert getattr(noisy, name) == pytest.approx(getattr(clean, name), abs=8), name
    np.testing.assert_allclose(noisy.st_mv, clean.st_mv, atol=0.01)
