"""WFDB writer: records written here must read back with wfdb.rdrecord exactly as documented."""

import os

import numpy as np
import pytest
import scipy.signal
import wfdb

from diffusets_jax.ecg.leads import MIMIC_LEADS, STANDARD_LEADS
from diffusets_jax.io.wfdb_out import (
    ADC_GAIN,
    MAX_OUTPUT_FS_HZ,
    check_output_fs,
    format_conditions,
    parse_conditions,
    read_record,
    write_record,
    write_records,
)

CONDITIONS = {
    "prompt": "Most importantly, the 1st diagnosis is sinus rhythm.\nAs a supplementary condition, the 2nd ...",
    "sex": 1,
    "age": 63,
    "heart_rate": 72.5,
    "seed": 11,
    "sampler": "ddpm 1000 steps",
}


def synthetic_ecg(samples: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / samples * 10.0
    beats = sum(np.exp(-0.5 * ((t - c) / 0.02) ** 2) for c in np.arange(0.4, 10.0, 0.8))
    gains = rng.uniform(-1.5, 1.5, size=12)
    return beats[:, None] * gains[None, :] + 0.05 * rng.normal(size=(samples, 12))


def test_round_trip_through_rdrecord(tmp_path):
    ecg = synthetic_ecg()
    header = write_record(tmp_path / "sample_000001", ecg, conditions=CONDITIONS)
    assert header == os.path.join(tmp_path, "sample_000001.hea")
    record = wfdb.rdrecord(str(tmp_path / "sample_000001"))
    assert record.sig_name == list(STANDARD_LEADS)
    assert record.fs == pytest.approx(102.4)
    assert record.sig_len == 1024
    assert record.units == ["mV"] * 12
    assert record.fmt == ["16"] * 12
    assert record.adc_gain == [ADC_GAIN] * 12
    np.testing.assert_allclose(record.p_signal, ecg, atol=0.5 / ADC_GAIN + 1e-9)
    comments = record.comments
    assert comments[0].startswith("generator: diffusets-jax")
    assert "sex: M" in comments and "age: 63" in comments and "heart_rate: 72.5" in comments
    assert "seed: 11" in comments and "sampler: ddpm 1000 steps" in comments
    assert any(c.startswith("prompt: Most importantly") and " | As a supplementary" in c for c in comments)
    # Nothing else left in the folder: no staging directory, no stray files.
    assert sorted(os.listdir(tmp_path)) == ["sample_000001.dat", "sample_000001.hea"]


def test_resampled_to_500_hz_on_request(tmp_path):
    ecg = synthetic_ecg()
    write_record(tmp_path / "r500", ecg, output_fs=500)
    record = wfdb.rdrecord(str(tmp_path / "r500"))
    assert record.fs == 500 and record.sig_len == 5000
    expected = scipy.signal.resample(ecg, 5000, axis=0)
    np.testing.assert_allclose(record.p_signal, expected, atol=0.5 / ADC_GAIN + 1e-9)


def test_read_record_returns_standard_order_and_conditions(tmp_path):
    ecg = synthetic_ecg(seed=3)
    write_record(tmp_path / "mine", ecg, conditions=CONDITIONS)
    back = read_record(tmp_path / "mine.hea")
    assert back.fs == pytest.approx(102.4)
    np.testing.assert_allclose(back.signal, ecg, atol=0.5 / ADC_GAIN + 1e-9)
    assert back.conditions["sex"] == "M" and back.conditions["heart_rate"] == "72.5"
    # A MIMIC-ordered record (aVF before aVL, 200 adu/mV) comes back in standard order.
    mimic = ecg[:, [STANDARD_LEADS.index(lead) for lead in MIMIC_LEADS]]
    wfdb.wrsamp("mimic", fs=500, units=["mV"] * 12, sig_name=list(MIMIC_LEADS), p_signal=mimic,
                fmt=["16"] * 12, adc_gain=[200.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
    np.testing.assert_allclose(read_record(tmp_path / "mimic").signal, ecg, atol=0.5 / 200 + 1e-9)


def test_read_record_scales_units_and_says_what_is_wrong_with_a_record(tmp_path):
    """The reader behind `plot` and `evaluate --generated` is the one `prepare` uses: units other than mV are
    scaled or refused (volts were read as millivolts before, 1000x off), and damaged files are named."""
    ecg = synthetic_ecg(seed=4)

    def write(name, units, signal, leads=STANDARD_LEADS):
        wfdb.wrsamp(name, fs=500, units=[units] * len(leads), sig_name=list(leads), p_signal=signal,
                    fmt=["16"] * len(leads), adc_gain=[1000.0 / {"mV": 1, "V": 1e-3, "uV": 1e3, "NU": 1}[units]]
                    * len(leads), baseline=[0] * len(leads), write_dir=str(tmp_path))

    write("volts", "V", ecg / 1000.0)
    np.testing.assert_allclose(read_record(tmp_path / "volts").signal, ecg, atol=1e-3)
    write("microvolts", "uV", ecg * 1000.0)
    np.testing.assert_allclose(read_record(tmp_path / "microvolts").signal, ecg, atol=1e-3)
    write("counts", "NU", ecg)
    with pytest.raises(ValueError, match=r"counts: unknown signal unit 'NU'"):
        read_record(tmp_path / "counts")
    write("three", "mV", ecg[:, :3], leads=STANDARD_LEADS[:3])
    with pytest.raises(ValueError, match=r"three: .*aVR"):
        read_record(tmp_path / "three")
    write("short", "mV", ecg)
    dat = tmp_path / "short.dat"
    dat.write_bytes(dat.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"short.dat has 1000 bytes, header implies 24576"):
        read_record(tmp_path / "short")


def test_overwrite_replaces_the_record(tmp_path):
    write_record(tmp_path / "same", synthetic_ecg(seed=1))
    second = synthetic_ecg(seed=2)
    write_record(tmp_path / "same", second)
    np.testing.assert_allclose(read_record(tmp_path / "same").signal, second, atol=1e-3)
    assert sorted(os.listdir(tmp_path)) == ["same.dat", "same.hea"]


def test_batch_skips_and_counts_bad_records(tmp_path):
    ecgs = np.stack([synthetic_ecg(seed=i) for i in range(4)])
    ecgs[1, 100, 3] = np.nan
    ecgs[2] *= 100.0  # beyond the 16-bit range at 1000 adu/mV: wrong units upstream
    summary = write_records(tmp_path, ecgs, [f"s{i}" for i in range(4)], [CONDITIONS] * 4)
    assert [os.path.basename(p) for p in summary.written] == ["s0.hea", "s3.hea"]
    assert set(summary.skipped) == {"s1", "s2"}
    assert "non-finite" in summary.skipped["s1"] and "mV" in summary.skipped["s2"]
    assert sorted(os.listdir(tmp_path)) == ["s0.dat", "s0.hea", "s3.dat", "s3.hea"]


@pytest.mark.parametrize("output_fs", [0.0, -500.0, float("nan"), 500_000.0, 0.05, 0.2, 99.9])
def test_a_bad_output_rate_is_refused_for_the_batch_not_skipped_per_record(tmp_path, output_fs):
    """The rate is the caller's choice, not a property of one record: the whole call fails, and writes nothing.
    500000 is the typo for 500 that would write 5 million samples per lead; 0.05 crashed (ZeroDivisionError) and
    0.2 wrote 2-sample "ECGs"."""
    with pytest.raises(ValueError, match="--wfdb-fs must be a rate in Hz from 100 to 10000"):
        write_records(tmp_path, np.stack([synthetic_ecg()]), ["a"], output_fs=output_fs)
    assert os.listdir(tmp_path) == []
    assert check_output_fs(None) is None and check_output_fs(500.0) == 500.0
    assert check_output_fs(MAX_OUTPUT_FS_HZ) == MAX_OUTPUT_FS_HZ and check_output_fs(100.0) == 100.0


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="transposing"):
        write_record(tmp_path / "x", synthetic_ecg().T)
    with pytest.raises(ValueError, match="record name"):
        write_record(tmp_path / "bad name", synthetic_ecg())
    with pytest.raises(ValueError, match="as many names"):
        write_records(tmp_path, np.stack([synthetic_ecg()]), ["a", "b"])
    with pytest.raises(ValueError, match="condition name"):
        format_conditions({"bad key": 1})
    assert os.listdir(tmp_path) == []


def test_conditions_format_and_parse_are_inverse():
    lines = format_conditions({"sex": 0, "age": 41.0, "heart_rate": 58.123456789, "prompt": "a: b"})
    assert lines == ["sex: F", "age: 41", "heart_rate: 58.1235", "prompt: a: b"]
    assert parse_conditions(lines + ["free text without a key"]) == {
        "sex": "F", "age": "41", "heart_rate": "58.1235", "prompt": "a: b"
    }


def test_conditions_beyond_ascii_survive_the_header_round_trip(tmp_path):
    """wfdb reads a header as ASCII and drops the rest: "QTc ≥ 500 ms|Ischémie antérieure" came back as
    "QTc  500 ms|Ischmie antrieure", and `evaluate --generated` scored against prompts that were never given."""
    prompt = "Most importantly, the 1st diagnosis is {QTc ≥ 500 ms}.{Ischémie antérieure} 🫀 C:\\u2265\\\\"
    write_record(tmp_path / "r", synthetic_ecg(), conditions={"prompt": prompt, "sex": 0, "note": "plain ASCII"})
    assert read_record(tmp_path / "r").conditions["prompt"] == prompt
    comments = wfdb.rdrecord(str(tmp_path / "r")).comments
    assert "prompt: Most importantly, the 1st diagnosis is {QTc \\u2265 500 ms}.{Isch\\u00e9mie ant\\u00e9rieure} " \
           "\\U0001fac0 C:\\\\u2265\\\\\\\\" in comments
    assert "note: plain ASCII" in comments and "sex: F" in comments  # ASCII text reads as written


@pytest.mark.parametrize("output_fs", [None, 500.0, 333.3333333, 1000.0, 100.000000001])
def test_records_are_the_bytes_wfdb_wrsamp_writes(tmp_path, output_fs):
    """The writer writes format-16 records itself (wfdb.wrsamp spent 37 ms a record looking up its field rules):
    byte for byte what wrsamp writes for the same signal, rate and comments, including samples that round half to
    even, the full range, a rate written without decimals and one with."""
    from diffusets_jax.io.wfdb_out import prepare_signal

    ecg = synthetic_ecg(seed=3)
    ecg[:4, 0] = 0.0005, 0.0015, -0.0025, 32.766  # x 1000 adu/mV: .5s round to even; the last near the limit
    ecg[:2, 1] = -32.766, -0.0
    conditions = {**CONDITIONS, "prompt": "QTc \u2265 500 ms\\ | x"}
    ours = write_record(tmp_path / "ours" / "r1", ecg, conditions=conditions, output_fs=output_fs)
    signal, fs = prepare_signal(ecg, output_fs=output_fs)
    comments = open(ours).read().split("\n# ", 1)[1].rstrip("\n").split("\n# ")
    (tmp_path / "wfdb").mkdir()
    wfdb.wrsamp("r1", fs=fs, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=signal, fmt=["16"] * 12,
                adc_gain=[ADC_GAIN] * 12, baseline=[0] * 12, comments=comments, write_dir=str(tmp_path / "wfdb"))
    for suffix in (".hea", ".dat"):
        assert (tmp_path / "ours" / f"r1{suffix}").read_bytes() == (tmp_path / "wfdb" / f"r1{suffix}").read_bytes()
