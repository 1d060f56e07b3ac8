"""Reference recordings (io/reference.py): real WFDB files in any lead order, subset and rate, to (1024, 12)."""

from pathlib import Path

import numpy as np
import pytest
import wfdb

from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.ecg.resample import resample_to_length
from diffusets_jax.io.reference import read_reference, reference_from_array

DEMO_RECORD = Path(__file__).resolve().parents[1] / "diffusets_jax" / "demo_data" / "cinc2021" / "E07500"


def _write(directory, name, signal, fs, names):
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(names), sig_name=list(names), p_signal=np.asarray(signal, np.float64),
                fmt=["16"] * len(names), adc_gain=[1000.0] * len(names), baseline=[0] * len(names),
                write_dir=str(directory))
    return directory / name


def _beats(seconds, fs, leads, rate_hz=1.2):
    t = np.arange(int(round(seconds * fs))) / fs
    return np.stack([(0.3 + 0.1 * i) * np.sin(2 * np.pi * rate_hz * t + i) for i in range(leads)], axis=1)


def test_a_twelve_lead_record_matches_the_training_preprocessing():
    reference = read_reference(str(DEMO_RECORD) + ".hea")  # an extension is accepted
    record = wfdb.rdrecord(str(DEMO_RECORD))
    expected = resample_to_length(record.p_signal, 1024)[:, [record.sig_name.index(lead) for lead in STANDARD_LEADS]]
    assert reference.ecg.shape == (1024, 12) and reference.ecg.dtype == np.float32
    np.testing.assert_allclose(reference.ecg, expected, atol=1e-6)
    assert reference.leads == STANDARD_LEADS and reference.excluded == {} and reference.fs == 500.0


def test_a_two_lead_record_in_any_order_fills_only_its_leads(tmp_path):
    signal = _beats(10.0, 250, 2)
    path = _write(tmp_path, "watch", signal, 250, ["AVL", "I"])  # cart spelling, non-standard order
    reference = read_reference(path)
    assert reference.leads == ("I", "aVL")
    assert reference.excluded == {lead: "absent" for lead in STANDARD_LEADS if lead not in ("I", "aVL")}
    np.testing.assert_allclose(reference.ecg[:, 0], resample_to_length(signal[:, 1], 1024), atol=2e-3)
    np.testing.assert_allclose(reference.ecg[:, 4], resample_to_length(signal[:, 0], 1024), atol=2e-3)
    assert not reference.ecg[:, [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]].any()


def test_flat_and_unrecorded_leads_are_left_out():
    signal = _beats(10.0, 500, 3)
    signal[:, 1] = 0.0  # a disconnected electrode
    signal[:, 2] = np.nan  # a lead with no sample
    reference = reference_from_array(signal, 500.0, ["I", "II", "V1"])
    assert reference.leads == ("I",)
    assert reference.excluded["II"] == "flat" and reference.excluded["V1"] == "missing samples"
    assert not reference.ecg[:, 1].any() and not reference.ecg[:, 6].any()


def test_a_dropout_leaves_out_its_samples_not_its_lead():
    """One missing sample (a dropout, a sample clipped at the ADC's limit) left the whole lead out, so `sample
    --reference --observe V1` was refused and `--observe all` silently reconstructed V1 as if never recorded. The lead
    is kept; only the time-base samples near the gap are marked missing, and the rest match the gapless record."""
    signal = _beats(10.0, 500, 3)
    whole = reference_from_array(signal, 500.0, ["I", "II", "V1"])
    signal[1000:1020, 2] = np.nan  # 40 ms missing at 2.0 s
    reference = reference_from_array(signal, 500.0, ["I", "II", "V1"])
    assert reference.leads == ("I", "II", "V1") and reference.excluded == {
        lead: "absent" for lead in STANDARD_LEADS if lead not in ("I", "II", "V1")}
    v1 = STANDARD_LEADS.index("V1")
    gap = np.flatnonzero(reference.missing[:, v1])
    assert reference.missing.sum() == len(gap) and 4 <= len(gap) <= 8  # 40 ms is 4 samples at 102.4 Hz, + 1 each side
    assert gap.min() <= 2.0 * 102.4 <= gap.max() and gap.max() - gap.min() == len(gap) - 1
    np.testing.assert_allclose(reference.ecg[:, v1][~reference.missing[:, v1]],
                               whole.ecg[:, v1][~reference.missing[:, v1]], atol=0.02)
    assert np.isnan(reference.recorded()[gap, v1]).all() and np.isfinite(reference.ecg).all()


def test_a_window_of_a_longer_record(tmp_path):
    signal = _beats(20.0, 500, 12)
    reference = read_reference(_write(tmp_path, "long", signal, 500, STANDARD_LEADS), start_s=5.0)
    np.testing.assert_allclose(reference.ecg, resample_to_length(signal[2500:7500], 1024), atol=2e-3)


@pytest.mark.parametrize("seconds, fs, names, start_s, message", [
    (10.0, 500, ["I", "foo"], None, r"unknown lead name 'foo'; expected one of I, II, .*; rename the signal"),
    (8.0, 500, ["I", "II"], None, r"4000 samples at 500 Hz last 8.00 s; the model needs a 10 s recording"),
    (10.0, 50, ["I", "II"], None, r"sampling rate 50 Hz is below 100 Hz"),
    (12.0, 500, ["I", "II"], 4.0, r"start_s=4 leaves less than 10 s of the 12.00 s record; use 0 <= start_s <= 2.00"),
])
def test_bad_references_get_one_line_naming_the_record(tmp_path, seconds, fs, names, start_s, message):
    path = _write(tmp_path, "bad", _beats(seconds, fs, len(names)), fs, names)
    with pytest.raises(ValueError, match=message) as err:
        read_reference(path, start_s=start_s)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_missing_duplicated_and_unusable_records(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.hea does not exist"):
        read_reference(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"^ref: lead\(s\) I appear more than once"):  # wfdb cannot write these
        reference_from_array(_beats(10.0, 500, 2), 500.0, ["I", "i"], source="ref")
    with pytest.raises(ValueError, match=r"^ref: no usable lead \(II: flat\)"):
        reference_from_array(np.zeros((1000, 1)), 100.0, ["II"], source="ref")
    with pytest.raises(ValueError, match=r"does not look like millivolts"):
        reference_from_array(_beats(10.0, 500, 1) * 1000.0, 500.0, ["II"], source="ref")


def test_a_fifteen_lead_record_gives_its_twelve_standard_leads(tmp_path):
    """PTB's 15-lead records add the Frank leads vx, vy, vz: the whole record was refused ("unknown lead name 'vx';
    rename the signal"), though `plot` and data preparation read such records. The extra leads are passed by."""
    signal = _beats(20.0, 1000, 15)
    names = [lead.lower() for lead in STANDARD_LEADS] + ["vx", "vy", "VZ"]
    reference = read_reference(_write(tmp_path, "s0010_re", signal, 1000, names), start_s=5.0)
    assert reference.leads == STANDARD_LEADS and reference.excluded == {}
    np.testing.assert_allclose(reference.ecg, resample_to_length(signal[5000:15000, :12], 1024), atol=2e-3)
    # The extra leads and a subset of the 12, in any order.
    reference = reference_from_array(signal[:10000, [12, 1, 13, 0]], 1000.0, ["vx", "II", "V7", "I"], source="ref")
    assert reference.leads == ("I", "II")
    np.testing.assert_allclose(reference.ecg[:, 1], resample_to_length(signal[:10000, 1], 1024), atol=2e-3)
    with pytest.raises(ValueError, match=r"^ref: none of its leads \(vx, vy, vz\) is one of the standard 12"):
        reference_from_array(signal[:10000, 12:], 1000.0, ["vx", "vy", "vz"], source="ref")
