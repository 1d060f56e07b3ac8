"""The multi-lead QRS detector on synthetic ECGs with known beats (tests/helpers/synthetic_ecg.py)."""

import numpy as np
import pytest

from diffusets_jax.ecg.qrs import detect_beats, usable_leads
from diffusets_jax.ecg.shapes import ECG_RATE_HZ
from tests.helpers.synthetic_ecg import SyntheticBeat, regular_beats, synthetic_ecg


@pytest.mark.parametrize("fs", [500.0, ECG_RATE_HZ])
@pytest.mark.parametrize("bpm", [35.0, 60.0, 100.0, 150.0, 200.0])
def test_known_beats_are_found_at_both_rates(bpm, fs):
    times = regular_beats(bpm)
    ecg = synthetic_ecg(times, fs=fs, noise_mv=0.03, seed=int(bpm))
    found = detect_beats(ecg, fs) / fs
    assert found.size == times.size
    np.testing.assert_allclose(found, times, atol=3.0 / fs + 0.004)  # 102.4 Hz: within 3 samples


def test_premature_beats_and_a_tall_t_wave_are_counted_right():
    # A beat 300 ms after the previous one (a premature beat) is a beat; a T wave as tall as the R is not.
    times = np.array([0.5, 1.4, 1.7, 2.9, 3.8, 4.7, 5.6, 6.5, 7.4, 8.3, 9.2])
    ecg = synthetic_ecg(times, SyntheticBeat(t_mv=1.0), fs=ECG_RATE_HZ, noise_mv=0.02)
    found = detect_beats(ecg, ECG_RATE_HZ) / ECG_RATE_HZ
    np.testing.assert_allclose(found, times, atol=3.0 / ECG_RATE_HZ)


def test_leads_vote_so_noisy_and_flat_leads_do_not_decide():
    times = regular_beats(75.0)
    ecg = synthetic_ecg(times, fs=500.0)
    rng = np.random.default_rng(1)
    ecg[:, 0] = 0.0  # disconnected lead I
    ecg[:, 6:9] += 0.5 * rng.standard_normal((ecg.shape[0], 3))  # three precordial leads drowned in noise
    assert usable_leads(ecg).tolist() == [False] + [True] * 11
    found = detect_beats(ecg, 500.0) / 500.0
    np.testing.assert_allclose(found, times, atol=0.01)


def test_no_beats_without_signal_and_bad_shapes():
    assert detect_beats(np.zeros((1024, 12)), ECG_RATE_HZ).size == 0
    assert detect_beats(np.full((1024, 12), np.nan), ECG_RATE_HZ).size == 0
    noise = 0.3 * np.random.default_rng(0).standard_normal((1024, 12))
    assert detect_beats(noise, ECG_RATE_HZ).size == 0
    with pytest.raises(ValueError, match=r"ecg: expected a \(samples, leads\) array"):
        detect_beats(np.zeros(1024), ECG_RATE_HZ)


def test_the_band_filter_is_designed_once_per_rate_and_is_the_fresh_design(monkeypatch):
    """Designing the QRS band-pass was about 0.5 of the 4 ms finding a 500 Hz record's beats took; it is made once
    per rate, the same sections a fresh design gives, and no caller can change them."""
    import scipy.signal

    from diffusets_jax.ecg import qrs

    qrs._qrs_band_filter.cache_clear()
    designs = []
    butter = scipy.signal.butter
    monkeypatch.setattr(scipy.signal, "butter", lambda *a, **k: designs.append(k.get("fs")) or butter(*a, **k))
    for fs in (500.0, 500.0, ECG_RATE_HZ, 500.0):
        assert detect_beats(synthetic_ecg(regular_beats(70.0), fs=fs, noise_mv=0.03, seed=1), fs).size > 5
    assert designs == [500.0, ECG_RATE_HZ]
    sos = qrs._qrs_band_filter(500.0)
    np.testing.assert_array_equal(sos, butter(2, qrs.QRS_BAND_HZ, btype="bandpass", fs=500.0, output="sos"))
    with pytest.raises(ValueError, match="read-only"):
        sos[0, 0] = 1.0


@pytest.mark.parametrize("fs", [500.0, ECG_RATE_HZ])
@pytest.mark.parametrize("bpm", [250.0, 280.0])
def test_tachycardia_near_the_refractory_limit_is_measured(bpm, fs):
    # Conditions go up to 300 bpm (HEART_RATE_RANGE) and REFRACTORY_S allows it, but at 250-300 bpm the 100 ms QRS
    # energy covers most of the record: the floor at 2.5x its median rose above the beats and no beat was found, so
    # evaluate's heart-rate MAE dropped every such ECG as unmeasurable.
    rr_ms = 60000.0 / bpm
    beat = SyntheticBeat(pr_ms=0.25 * rr_ms, p_ms=0.15 * rr_ms, qt_ms=0.55 * rr_ms, t_ms=0.25 * rr_ms)
    times = regular_beats(bpm, first_s=0.15)
    ecg = synthetic_ecg(times, beat, fs=fs, noise_mv=0.03, seed=int(bpm))
    found = detect_beats(ecg, fs) / fs
    assert found.size == times.size
    np.testing.assert_allclose(found, times, atol=3.0 / fs + 0.004)
