import numpy as np
import pytest
import scipy.signal

from diffusets_jax import signal as sig


def test_canonical_lead_names_accept_usual_spellings():
    assert sig.canonical_lead_name("AVL") == "aVL"
    assert sig.canonical_lead_name(" avf ") == "aVF"
    assert sig.canonical_lead_name("v1") == "V1"
    assert sig.canonical_lead_name("ii") == "II"
    with pytest.raises(sig.UnknownLeadError, match="vx"):
        sig.canonical_lead_name("vx")


def test_reorder_mimic_to_standard_matches_reference_index():
    rng = np.random.default_rng(0)
    mimic = rng.standard_normal((3, 16, 12))
    by_name = sig.reorder_leads(mimic, sig.MIMIC_LEADS)
    np.testing.assert_array_equal(by_name, mimic[..., list(sig.REFERENCE_TO_STANDARD)])
    np.testing.assert_array_equal(by_name[..., 4], mimic[..., 5])  # aVL came after aVF in the MIMIC order


def test_reorder_with_uppercase_names_and_shuffled_columns():
    rng = np.random.default_rng(1)
    standard = rng.standard_normal((10, 12))
    order = rng.permutation(12)
    names = [sig.STANDARD_LEADS[i].upper() for i in order]
    np.testing.assert_array_equal(sig.reorder_leads(standard[:, order], names), standard)


def test_reorder_errors_name_the_problem():
    with pytest.raises(sig.MissingLeadError, match="V6"):
        sig.reorder_leads(np.zeros((4, 11)), sig.STANDARD_LEADS[:11])
    with pytest.raises(sig.UnknownLeadError):
        sig.reorder_leads(np.zeros((4, 13)), [*sig.STANDARD_LEADS, "vx"])
    with pytest.raises(sig.LeadNameError, match="more than once"):
        sig.reorder_leads(np.zeros((4, 12)), [*sig.STANDARD_LEADS[:11], "I"])
    extra = sig.reorder_leads(np.arange(15.0)[None], [*sig.STANDARD_LEADS, "vx", "vy", "vz"], allow_extra=True)
    np.testing.assert_array_equal(extra, np.arange(12.0)[None])


def test_resample_to_length_is_scipy_fft_resampling_with_nan_to_zero():
    rng = np.random.default_rng(2)
    record = rng.standard_normal((5000, 12))
    record[100:120, 3] = np.nan
    out = sig.resample_to_length(record, 1024)
    expected = scipy.signal.resample(np.nan_to_num(record), 1024, axis=0)
    assert out.shape == (1024, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_resample_keeps_frequency_content_from_any_rate():
    for fs in (257.0, 500.0, 1000.0):
        t = np.arange(int(10 * fs)) / fs
        record = np.sin(2 * np.pi * 5.0 * t)[:, None] * np.ones((1, 12))
        out = sig.resample_to_length(record, 1024)
        spectrum = np.abs(np.fft.rfft(out[:, 0]))
        assert np.argmax(spectrum) == 50  # 5 Hz over 10 s = bin 50, whatever the source rate


def test_resample_rate_round_trip_102_4_to_500_hz():
    t = np.arange(1024) / sig.ECG_RATE_HZ
    ecg = (np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 7 * t))[:, None] * np.ones((1, 12))
    at_500 = sig.resample_rate(ecg, sig.ECG_RATE_HZ, 500.0)
    assert at_500.shape == (5000, 12)
    back = sig.resample_to_length(at_500, 1024)
    np.testing.assert_allclose(back, ecg, atol=1e-4)
    with pytest.raises(ValueError):
        sig.resample_rate(ecg, 0.0, 500.0)


def test_units_conversion_and_millivolt_check():
    microvolts = np.full((10, 2), 1500.0)
    np.testing.assert_allclose(sig.to_millivolts(microvolts, ["uV", "µV"]), 1.5)
    np.testing.assert_allclose(sig.to_millivolts(np.ones((3, 1)), ["mv"]), 1.0)
    with pytest.raises(ValueError, match="unit"):
        sig.to_millivolts(np.ones((3, 1)), ["furlong"])
    sig.check_millivolts(np.random.default_rng(3).standard_normal((1024, 12)) * 0.3)
    with pytest.raises(ValueError, match="millivolts"):
        sig.check_millivolts(np.random.default_rng(3).standard_normal((1024, 12)) * 300.0)
