import numpy as np
import pytest
import scipy.signal

from diffusets_jax.ecg.leads import (
    MIMIC_LEADS,
    REFERENCE_TO_STANDARD,
    STANDARD_LEADS,
    LeadNameError,
    MissingLeadError,
    UnknownLeadError,
    canonical_lead_name,
    reorder_leads,
)
from diffusets_jax.ecg.resample import resample_rate, resample_to_length
from diffusets_jax.ecg.shapes import ECG_RATE_HZ
from diffusets_jax.ecg.units import check_millivolts, to_millivolts


def test_canonical_lead_names_accept_usual_spellings():
    assert canonical_lead_name("AVL") == "aVL"
    assert canonical_lead_name(" avf ") == "aVF"
    assert canonical_lead_name("v1") == "V1"
    assert canonical_lead_name("ii") == "II"
    with pytest.raises(UnknownLeadError, match="vx"):
        canonical_lead_name("vx")


@pytest.mark.parametrize("name, leads", [("I II", "I, II"), ("I I", "I, I"), ("II I", "II, I"), ("avr  AVL", "aVR, aVL")])
def test_leads_listed_with_spaces_are_not_read_as_one_lead(name, leads):
    """Spaces were dropped from a name, so "I II" was lead III and "I I" lead II: `--observe "I II"` observed
    lead III alone. Names that are each a lead are refused as a list; a name with spaces inside is still read."""
    with pytest.raises(UnknownLeadError, match=rf"is several leads \({leads}\); separate lead names with commas"):
        canonical_lead_name(name)
    assert canonical_lead_name("Lead I") == "I" and canonical_lead_name("V 1") == "V1"


def test_observing_leads_listed_with_spaces_is_refused_not_read_as_another_lead():
    from diffusets_jax.diffusion.observations import lead_mask

    with pytest.raises(ValueError, match=r"^--observe: lead name 'I II' is several leads \(I, II\)"):
        lead_mask("I II", what="--observe")
    assert lead_mask("I, II").tolist() == [True, True] + [False] * 10


def test_reorder_mimic_to_standard_matches_reference_index():
    rng = np.random.default_rng(0)
    mimic = rng.standard_normal((3, 16, 12))
    by_name = reorder_leads(mimic, MIMIC_LEADS)
    np.testing.assert_array_equal(by_name, mimic[..., list(REFERENCE_TO_STANDARD)])
    np.testing.assert_array_equal(by_name[..., 4], mimic[..., 5])  # aVL came after aVF in the MIMIC order


def test_reorder_with_uppercase_names_and_shuffled_columns():
    rng = np.random.default_rng(1)
    standard = rng.standard_normal((10, 12))
    order = rng.permutation(12)
    names = [STANDARD_LEADS[i].upper() for i in order]
    np.testing.assert_array_equal(reorder_leads(standard[:, order], names), standard)


def test_reorder_errors_name_the_problem():
    with pytest.raises(MissingLeadError, match="V6"):
        reorder_leads(np.zeros((4, 11)), STANDARD_LEADS[:11])
    with pytest.raises(UnknownLeadError):
        reorder_leads(np.zeros((4, 13)), [*STANDARD_LEADS, "vx"])
    with pytest.raises(LeadNameError, match="more than once"):
        reorder_leads(np.zeros((4, 12)), [*STANDARD_LEADS[:11], "I"])
    extra = reorder_leads(np.arange(15.0)[None], [*STANDARD_LEADS, "vx", "vy", "vz"], allow_extra=True)
    np.testing.assert_array_equal(extra, np.arange(12.0)[None])


def test_resample_to_length_is_scipy_fft_resampling_with_nan_to_zero():
    rng = np.random.default_rng(2)
    record = rng.standard_normal((5000, 12))
    record[100:120, 3] = np.nan
    out = resample_to_length(record, 1024)
    expected = scipy.signal.resample(np.nan_to_num(record), 1024, axis=0)
    assert out.shape == (1024, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_resample_keeps_frequency_content_from_any_rate():
    for fs in (257.0, 500.0, 1000.0):
        t = np.arange(int(10 * fs)) / fs
        record = np.sin(2 * np.pi * 5.0 * t)[:, None] * np.ones((1, 12))
        out = resample_to_length(record, 1024)
        spectrum = np.abs(np.fft.rfft(out[:, 0]))
        assert np.argmax(spectrum) == 50  # 5 Hz over 10 s = bin 50, whatever the source rate


def test_resample_rate_round_trip_102_4_to_500_hz():
    t = np.arange(1024) / ECG_RATE_HZ
    ecg = (np.sin(2 * np.pi * 1.2 * t) + 0.3 * np.sin(2 * np.pi * 7 * t))[:, None] * np.ones((1, 12))
    at_500 = resample_rate(ecg, ECG_RATE_HZ, 500.0)
    assert at_500.shape == (5000, 12)
    back = resample_to_length(at_500, 1024)
    np.testing.assert_allclose(back, ecg, atol=1e-4)
    with pytest.raises(ValueError):
        resample_rate(ecg, 0.0, 500.0)


def test_units_conversion_and_millivolt_check():
    microvolts = np.full((10, 2), 1500.0)
    np.testing.assert_allclose(to_millivolts(microvolts, ["uV", "µV"]), 1.5)
    np.testing.assert_allclose(to_millivolts(np.ones((3, 1)), ["mv"]), 1.0)
    with pytest.raises(ValueError, match="unit"):
        to_millivolts(np.ones((3, 1)), ["furlong"])
    check_millivolts(np.random.default_rng(3).standard_normal((1024, 12)) * 0.3)
    with pytest.raises(ValueError, match="millivolts"):
        check_millivolts(np.random.default_rng(3).standard_normal((1024, 12)) * 300.0)


def test_finite_ecgs_and_the_reason_for_one_that_is_not():
    from diffusets_jax.ecg.units import finite_ecgs, non_finite_reason

    ecgs = np.zeros((3, 1024, 12), np.float32)
    ecgs[1, 5, 2], ecgs[2, 0, 0], ecgs[2, 9, 11] = np.nan, np.inf, -np.inf
    assert finite_ecgs(ecgs).tolist() == [True, False, False]
    assert non_finite_reason(ecgs[0]) is None
    assert non_finite_reason(ecgs[2]) == "the ECG has 2 non-finite samples (NaN/inf)"
