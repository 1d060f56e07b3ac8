"""Heart-rate MAE on synthetic ECG-like signals of known rate at the model's 102.4 Hz."""

import numpy as np
import pytest

from diffusets_jax.metrics.heart_rate_mae import heart_rate_mae, measure_heart_rates

FS = 102.4
SAMPLES = 1024


def pulse_train(bpm: float, amplitude_per_lead: np.ndarray, seed: int = 0) -> np.ndarray:
    """(1024, leads) train of narrow Gaussian QRS-like pulses (sigma 15 ms) at `bpm`, with a small T wave and
    a little noise, so XQRS sees something ECG-like."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / FS
    period = 60.0 / bpm
    beats = np.arange(0.3 + rng.uniform(0, 0.2), t[-1], period)
    qrs = sum(np.exp(-0.5 * ((t - c) / 0.015) ** 2) for c in beats)
    t_wave = sum(0.25 * np.exp(-0.5 * ((t - c - 0.28) / 0.06) ** 2) for c in beats)
    trace = qrs + t_wave
    return trace[:, None] * amplitude_per_lead[None, :] + 0.01 * rng.normal(size=(SAMPLES, len(amplitude_per_lead)))


def test_known_rates_are_recovered():
    rates = np.array([50.0, 65.0, 80.0, 100.0, 120.0])
    amplitudes = np.linspace(0.8, 1.6, 12)
    ecgs = np.stack([pulse_train(bpm, amplitudes, seed=i) for i, bpm in enumerate(rates)])
    result = heart_rate_mae(ecgs, rates)
    assert result.n_failed == 0 and result.failure_rate == 0.0
    np.testing.assert_allclose(result.measured_bpm, rates, atol=3.0)
    np.testing.assert_array_equal(result.lead, -1)  # the consensus of all leads, not one lead
    published = heart_rate_mae(ecgs, rates, method="xqrs_first_lead")
    np.testing.assert_array_equal(published.lead, 0)  # the first lead already has >= 2 beats
    assert result.mae < 2.0
    # The conditioning rates enter the error as given: shift them and the MAE grows by the shift.
    shifted = heart_rate_mae(ecgs, rates + 10.0)
    assert shifted.mae == pytest.approx(np.mean(np.abs(result.measured_bpm - rates - 10.0)))
    assert shifted.mae > 8.0


def test_flat_lead_falls_back_and_flat_record_is_a_counted_failure():
    # The published first-lead method: a flat first lead passes the rate to the next one.
    consensus = heart_rate_mae(np.stack([pulse_train(75.0, np.ones(12), seed=1)] * 2), [75.0, 75.0])
    assert consensus.lead.tolist() == [-1, -1] and consensus.mae < 3.0
    amplitudes = np.ones(12)
    good = pulse_train(75.0, amplitudes, seed=1)
    first_lead_flat = good.copy()
    first_lead_flat[:, 0] = 0.0
    all_flat = np.zeros((SAMPLES, 12))
    non_finite = good.copy()
    non_finite[10, 5] = np.nan
    ecgs = np.stack([good, first_lead_flat, all_flat, non_finite])
    result = heart_rate_mae(ecgs, np.full(4, 75.0), method="xqrs_first_lead")
    assert result.n_records == 4 and result.n_failed == 2 and result.n_measured == 2
    np.testing.assert_array_equal(result.failed, [2, 3])
    assert result.failure_rate == 0.5
    assert result.lead.tolist() == [0, 1, -1, -1]
    assert np.isnan(result.measured_bpm[2]) and np.isnan(result.absolute_error[3])
    assert result.errors == {3: "non-finite samples"}
    # The MAE is over the two measured records only, and is small.
    assert result.mae == pytest.approx(np.mean(result.absolute_error[:2]))
    assert result.mae < 3.0


def test_nothing_measurable_gives_nan_mae_not_zero():
    result = heart_rate_mae(np.zeros((2, SAMPLES, 12)), [60.0, 70.0])
    assert np.isnan(result.mae) and result.n_failed == 2


def test_bad_inputs():
    with pytest.raises(ValueError, match="one per ECG"):
        heart_rate_mae(np.zeros((2, SAMPLES, 12)), [60.0])
    with pytest.raises(ValueError, match=r"\(batch, samples, leads\)"):
        measure_heart_rates(np.zeros((SAMPLES, 12)))
    # One record with its rate is a shape error, not "1 values for 1024 ECGs".
    with pytest.raises(ValueError, match=r"ecgs: expected shape \(batch, samples, leads\), got \(1024, 12\)"):
        heart_rate_mae(np.zeros((SAMPLES, 12)), [60.0])
    with pytest.raises(ValueError, match="method: unknown heart-rate method"):
        heart_rate_mae(np.zeros((2, SAMPLES, 12)), [60.0, 70.0], method="first")
    # A missing condition rate made the MAE NaN after every record was measured.
    with pytest.raises(ValueError, match=r"NaN or inf at 1 of 2 ECGs \(first at index 1\)"):
        heart_rate_mae(np.zeros((2, SAMPLES, 12)), [60.0, np.nan])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_worker_processes_give_the_same_answer():
    rates = np.array([55.0, 70.0, 90.0, 110.0])
    ecgs = np.stack([pulse_train(bpm, np.ones(12), seed=i) for i, bpm in enumerate(rates)])
    serial = measure_heart_rates(ecgs)
    parallel = measure_heart_rates(ecgs, workers=2)
    np.testing.assert_array_equal(serial[0], parallel[0])
    np.testing.assert_array_equal(serial[1], parallel[1])
