"""Record decoding and its skip reasons, on real fixture records and corrupted copies made here."""

import dataclasses
import os
import shutil

import numpy as np
import pytest
import wfdb

from diffusets_jax.data import records as rec
from diffusets_jax.ecg.leads import MIMIC_LEADS, STANDARD_LEADS
from diffusets_jax.ecg.resample import resample_to_length

ECG_DATA = os.path.join(os.path.dirname(__file__), "data", "ecg")
MIMIC_DIR = os.path.join(ECG_DATA, "mimic_iv_ecg")
E07500 = "files/p1900/p19000001/s40000000/40000000"  # MIMIC layout, MIMIC lead order, 200 adu/mV
PTBXL_E07500 = os.path.join(ECG_DATA, "ptbxl", "records500", "00000", "00001_hr")  # the same ECG, standard order


def candidate(path: str = E07500, **changes) -> rec.RecordCandidate:
    base = rec.RecordCandidate(path, 19000001, 40000000, 78.0, 1, ("Sinus bradycardia", "Abnormal ECG"), 1050.0)
    return dataclasses.replace(base, **changes)


def standard_signal() -> np.ndarray:
    return wfdb.rdrecord(PTBXL_E07500).p_signal


def write_record(directory, name, signal, fs=500.0, names=STANDARD_LEADS, units="mV", gain=1000.0, fmt="16") -> str:
    wfdb.wrsamp(
        name, fs=fs, units=[units] * signal.shape[1], sig_name=list(names), p_signal=signal, fmt=[fmt] * signal.shape[1],
        adc_gain=[gain] * signal.shape[1], baseline=[0] * signal.shape[1], write_dir=str(directory),
    )
    return name


@pytest.fixture()
def mimic_copy(tmp_path):
    source = os.path.join(MIMIC_DIR, E07500)
    target = tmp_path / os.path.dirname(E07500)
    target.mkdir(parents=True)
    for ext in (".hea", ".dat"):
        shutil.copy(source + ext, target)
    return tmp_path


def reason_of(manual_dir, cand, options=None) -> str:
    with pytest.raises(rec.BadRecord) as bad:
        rec.decode_record(str(manual_dir), cand, options or rec.DecodeOptions())
    return bad.value.reason


def test_decodes_mimic_order_into_standard_order():
    decoded = rec.decode_record(MIMIC_DIR, candidate())
    expected = resample_to_length(standard_signal(), 1024)
    assert decoded.ecg.shape == (1024, 12) and decoded.ecg.dtype == np.float32
    np.testing.assert_allclose(decoded.ecg, expected, atol=0.006)  # 200 vs 1000 adu/mV quantisation
    assert (decoded.heart_rate, decoded.heart_rate_source, decoded.heart_rate_lead) == (pytest.approx(60000 / 1050), "rr", -1)
    lead = {name: decoded.ecg[:, i] for i, name in enumerate(STANDARD_LEADS)}
    assert np.abs(lead["II"] - lead["I"] - lead["III"]).max() < 0.02
    assert np.abs(lead["aVR"] + lead["aVL"] + lead["aVF"]).max() < 0.02


def test_metadata_reasons_come_first():
    assert reason_of(MIMIC_DIR, candidate(subject_known=False, age=None, sex=None)) == "missing_demographics"
    assert reason_of(MIMIC_DIR, candidate(age=None)) == "missing_age"
    assert reason_of(MIMIC_DIR, candidate(age=-4.0)) == "implausible_age"  # a typo, not a newborn
    assert reason_of(MIMIC_DIR, candidate(age=121.0)) == "implausible_age"
    assert reason_of(MIMIC_DIR, candidate(sex=None)) == "missing_sex"
    assert reason_of(MIMIC_DIR, candidate(report_lines=())) == "missing_report"


def test_file_level_defects(mimic_copy):
    dat = mimic_copy / (E07500 + ".dat")
    hea = mimic_copy / (E07500 + ".hea")
    data, header = dat.read_bytes(), hea.read_text()
    dat.write_bytes(data[: len(data) // 2])
    assert reason_of(mimic_copy, candidate()) == "truncated_signal_file"
    dat.unlink()
    assert reason_of(mimic_copy, candidate()) == "missing_signal_file"
    dat.write_bytes(data)
    hea.write_text("this is not a header\n\x00\x01")
    assert reason_of(mimic_copy, candidate()) == "unreadable_header"
    hea.unlink()
    assert reason_of(mimic_copy, candidate()) == "missing_header"
    lines = header.splitlines(keepends=True)
    hea.write_text("".join(lines[:2] + lines[3:]))  # 12 signals declared, 11 described: wfdb's bare IndexError
    assert reason_of(mimic_copy, candidate()) == "unreadable_header"
    with pytest.raises(rec.BadRecord, match=r"declares 12 signals on its record line but describes 11"):
        rec.read_record_mv(str(mimic_copy / E07500))
    hea.write_text(header.replace(" aVL", " XYZ"))
    assert reason_of(mimic_copy, candidate()) == "unknown_lead_names"
    hea.write_text(header.replace("200.0(0)/mV", "200.0(0)/furlong"))
    assert reason_of(mimic_copy, candidate()) == "unknown_units"


def test_signal_level_defects(tmp_path):
    signal = standard_signal()
    write_record(tmp_path, "eight", signal[:, :8], names=STANDARD_LEADS[:8])
    assert reason_of(tmp_path, candidate("eight")) == "too_few_leads"
    with_nan = signal.copy()
    with_nan[:, 4] = np.nan
    write_record(tmp_path, "nanlead", with_nan)
    assert reason_of(tmp_path, candidate("nanlead")) == "nan_lead"
    write_record(tmp_path, "short", signal[:4000])
    assert reason_of(tmp_path, candidate("short")) == "wrong_duration"
    write_record(tmp_path, "quiet", 0.02 * np.random.default_rng(0).standard_normal((5000, 12)))
    assert reason_of(tmp_path, candidate("quiet", rr_ms=65535)) == "no_heart_rate"
    write_record(tmp_path, "flat", np.zeros((5000, 12)))
    assert reason_of(tmp_path, candidate("flat")) == "flat_lead"
    write_record(tmp_path, "gain", signal * 1000.0, gain=1.0)  # ADC counts written as if mV
    assert reason_of(tmp_path, candidate("gain")) == "implausible_amplitude"


def test_flat_leads_are_kept_or_skipped_by_option(tmp_path):
    signal = standard_signal()
    signal[:, [7, 9]] = 0.0  # as in Chapman-Shaoxing's JS20004: zero precordial leads
    write_record(tmp_path, "zeros", signal)
    kept = rec.decode_record(str(tmp_path), candidate("zeros"))
    assert kept.flat_leads == ("V2", "V4")
    assert reason_of(tmp_path, candidate("zeros"), rec.DecodeOptions(flat_leads="skip")) == "flat_lead"


def test_other_rates_units_and_lead_spellings(tmp_path):
    signal = standard_signal()
    reference = rec.decode_record(str(ECG_DATA + "/ptbxl"), candidate("records500/00000/00001_hr"))
    # 250 Hz, microvolts, upper-case names in MIMIC order: the same ECG after decoding.
    at_250 = signal[::2][:, [STANDARD_LEADS.index(n) for n in MIMIC_LEADS]] * 1000.0
    write_record(tmp_path, "uv250", at_250, fs=250.0, names=[n.upper() for n in MIMIC_LEADS], units="uV", gain=1.0)
    decoded = rec.decode_record(str(tmp_path), candidate("uv250"))
    correlation = np.corrcoef(decoded.ecg.ravel(), reference.ecg.ravel())[0, 1]
    assert correlation > 0.99


@pytest.mark.parametrize("fmt", ["16", "212"])  # read directly, and by wfdb
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_header_writing_microvolts_as_the_micro_sign_is_read_in_microvolts(tmp_path, fmt, encoding):
    """wfdb reads a header dropping its non-ASCII bytes, so 'µV' (as exporters, and wfdb.wrsamp itself, write it) was
    read as 'V': a signal a million times too large, skipped as `implausible_amplitude` by prepare and refused as a
    reference with a message blaming the header's gain."""
    signal = standard_signal()
    reference = rec.decode_record(str(ECG_DATA + "/ptbxl"), candidate("records500/00000/00001_hr"))
    gain = 1.0 if fmt == "16" else 0.5  # format 212's 12 bits hold +-2 mV in 2 uV steps
    write_record(tmp_path, "micro", signal * 1000.0, units="uV", gain=gain, fmt=fmt)
    header = tmp_path / "micro.hea"
    header.write_bytes(header.read_text().replace("/uV", "/\u00b5V").encode(encoding))
    signal_mv, _, _ = rec.read_record_mv(str(tmp_path / "micro"))
    np.testing.assert_allclose(signal_mv, signal, atol=1e-3 / gain)
    decoded = rec.decode_record(str(tmp_path), candidate("micro"))
    np.testing.assert_allclose(decoded.ecg, reference.ecg, atol=2e-3 / gain)


def test_an_inverted_lead_is_read_upright(tmp_path):
    """Cabrera-order exports write the inverted aVR as '-aVR': prepare skipped such a record as `unknown_lead_names`,
    and a reference was refused asking to rename the lead aVR, which would have read it upside down."""
    from diffusets_jax.io.reference import read_reference

    signal = standard_signal()
    reference = rec.decode_record(str(ECG_DATA + "/ptbxl"), candidate("records500/00000/00001_hr"))
    avr = STANDARD_LEADS.index("aVR")
    cabrera = signal.copy()
    cabrera[:, avr] = -cabrera[:, avr]
    names = [("-aVR" if lead == "aVR" else lead) for lead in STANDARD_LEADS]
    write_record(tmp_path, "cabrera", cabrera, names=names)
    write_record(tmp_path, "both", np.concatenate([signal, cabrera[:, avr:avr + 1]], axis=1),
                 names=[*STANDARD_LEADS, "-aVR"], fmt="212", gain=200.0)  # read by wfdb; its -aVR adds nothing
    np.testing.assert_allclose(rec.decode_record(str(tmp_path), candidate("cabrera")).ecg, reference.ecg, atol=1e-6)
    np.testing.assert_allclose(rec.decode_record(str(tmp_path), candidate("both")).ecg, reference.ecg, atol=5e-3)
    upright = read_reference(tmp_path / "cabrera")
    assert upright.leads == STANDARD_LEADS
    np.testing.assert_allclose(upright.ecg, reference.ecg, atol=1e-6)


def test_chunk_cache_is_reused_and_validated(tmp_path):
    cands = [candidate(), candidate(age=None), candidate(subject_known=False)]
    options = rec.DecodeOptions()
    stamps = rec.file_stamps(MIMIC_DIR, cands)
    path = str(tmp_path / f"chunk-{rec.chunk_fingerprint(cands, options, stamps)}.npz")
    first = rec.decode_chunk_cached(MIMIC_DIR, cands, options, path)
    assert not first.reused and list(first.skip_reason) == ["", "missing_age", "missing_demographics"]
    again = rec.decode_chunk_cached(MIMIC_DIR, cands, options, path)
    assert again.reused
    np.testing.assert_array_equal(again.ecg, first.ecg)
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []
    open(path, "wb").write(b"damaged")  # a damaged cache file is decoded again, not trusted
    assert not rec.decode_chunk_cached(MIMIC_DIR, cands, options, path).reused
    assert rec.chunk_fingerprint(cands, options, stamps) != rec.chunk_fingerprint(cands[:2], options, stamps[:2])
    assert rec.chunk_fingerprint(cands, options, stamps) != rec.chunk_fingerprint(
        cands, rec.DecodeOptions(flat_leads="skip"), stamps)


def test_a_cached_chunk_is_counted_without_reading_its_ecgs(tmp_path, monkeypatch):
    """A resumed build's workers and its report read every cached chunk whole to count its records: the ECGs are
    nearly all of the decode cache (about 39 GB for MIMIC-IV-ECG), read once more each time for a few numbers."""
    cands = [candidate(), candidate(age=None), candidate()]
    options = rec.DecodeOptions()
    task = (MIMIC_DIR, cands, options, str(tmp_path / "chunk.npz"))
    assert rec.decode_chunk_to_cache(task) == 2
    read = []
    original = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: read.append(key) or original(self, key))
    assert rec.decode_chunk_to_cache(task) == 2
    assert "skip_reason" in read and "ecg" not in read
    assert list(rec._load_chunk(task[3], ecg=False).skip_reason) == ["", "missing_age", ""]
    assert "ecg" not in read


def test_a_chunk_is_identified_by_its_record_files_size_and_time(tmp_path):
    """A header fixed (or a truncated signal file replaced) after a chunk was decoded: the chunk was recognised by
    record path and table metadata only, and its stale values were reused."""
    record = E07500
    for extension in (".hea", ".dat"):
        os.makedirs(os.path.dirname(tmp_path / record), exist_ok=True)
        shutil.copy2(os.path.join(MIMIC_DIR, record + extension), str(tmp_path / record) + extension)
    cands = [candidate(record)]
    options = rec.DecodeOptions()
    before = rec.chunk_fingerprint(cands, options, rec.file_stamps(str(tmp_path), cands))
    header = tmp_path / (record + ".hea")
    stat = header.stat()
    os.utime(header, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # written again, the same bytes
    assert rec.chunk_fingerprint(cands, options, rec.file_stamps(str(tmp_path), cands)) != before
    os.utime(header, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert rec.chunk_fingerprint(cands, options, rec.file_stamps(str(tmp_path), cands)) == before
    signal = tmp_path / (record + ".dat")
    mtime = signal.stat().st_mtime_ns
    signal.write_bytes(signal.read_bytes()[:-2])  # another size, even with the old time
    os.utime(signal, ns=(mtime, mtime))
    assert rec.chunk_fingerprint(cands, options, rec.file_stamps(str(tmp_path), cands)) != before


def test_fingerprints_keep_the_values_recorded_datasets_hold():
    """Dataset cards and decode caches recorded these fingerprints: one that moves makes every prepared dataset
    "built from other records" (rebuilding MIMIC-IV-ECG takes hours). Values from the code of 2026-12-07 (a68cea9),
    which hashed `dataclasses.asdict` of each record."""
    cands = [rec.RecordCandidate("files/p1000/p10000032/s40689238/40689238", 10000032, 40689238, 52.0, 0,
                                 ("Sinus rhythm", "Normal ECG"), 857.0),
             rec.RecordCandidate("g1/JS20004", 20004, 20004, None, None, (), None, 3, False, True),
             rec.RecordCandidate("records500/00000/00001_hr", 15709, 1, 56.0, 1,
                                 ("sinusrhythmus  periphere niederspannung",), strat_fold=3)]
    stamps = [((".dat", 245760, 1700000000123456789), (".hea", 1203, 1700000000000000000)), (), ((".mat", 10, 5),)]
    options = rec.DecodeOptions()
    assert rec.chunk_fingerprint(cands, options, stamps) == "f010a2e03780dd0699e2"
    assert rec.chunk_fingerprint(cands, rec.DecodeOptions(flat_leads="skip"), stamps) == "3fdf96885b5343dcb048"
    assert rec.listing_fingerprint(cands, options, stamps) == "c95c30da7328b8ac4d0c4d3a"
    assert rec.legacy_chunk_fingerprint(cands, options) == "dd2205704d877b70b0c6"
    assert rec.legacy_listing_fingerprint(cands, options) == "5c9692007776750a2d0f143c"


def test_a_new_decoder_decodes_again_but_keeps_a_datasets_records_fingerprint(monkeypatch):
    """Decoding changed (heart rates clear of gaps, 'µV' headers, inverted leads) without a version bump: a prepare
    resumed with the new code reused chunks the old one decoded and mixed the two decoders' records in one dataset.
    Bumping the version that also goes into dataset cards would have made every dataset prepared before look built
    from other records."""
    cands = [candidate(), candidate(age=None)]
    options, stamps = rec.DecodeOptions(), rec.file_stamps(MIMIC_DIR, cands)
    name = rec.chunk_cache_name("train", 3, cands, options, stamps)
    assert name.startswith("train-000003-") and name.endswith(f"-d{rec.DECODER_VERSION}.npz")
    listing = rec.listing_fingerprint(cands, options, stamps)
    monkeypatch.setattr(rec, "DECODER_VERSION", rec.DECODER_VERSION + 1)
    assert rec.chunk_cache_name("train", 3, cands, options, stamps) != name  # decoded again
    assert rec.listing_fingerprint(cands, options, stamps) == listing  # still the same records


def _same_as_wfdb(path: str) -> None:
    ours, theirs = rec.read_wfdb_record(path), wfdb.rdrecord(path)
    np.testing.assert_array_equal(ours.p_signal, theirs.p_signal)  # bit for bit, NaN where wfdb has NaN
    assert ours.p_signal.dtype == theirs.p_signal.dtype == np.float64
    assert (float(ours.fs), list(ours.sig_name), list(ours.units), list(ours.comments)) == (
        float(theirs.fs), list(theirs.sig_name), list(theirs.units), list(theirs.comments))


def test_format_16_records_are_read_as_wfdb_reads_them_without_it():
    """wfdb.rdrecord spent 8.5 of its 9.5 ms a record in its field bookkeeping, most of `prepare`'s decoding; format-16
    records of one signal file are now read directly: the same values, names, units and comments, for every record the
    suite has (MIMIC-IV-ECG, PTB-XL at both rates, CinC 2021's MATLAB files with their byte offset)."""
    from diffusets_jax.experiments.demo import DEMO_RECORDS

    headers = [os.path.join(root, name) for root, _, names in os.walk(ECG_DATA) for name in names
               if name.endswith(".hea")] + [str(p) for p in DEMO_RECORDS.glob("*.hea")]
    assert len(headers) >= 100
    for header in headers:
        assert rec._read_format16(header[:-4]) is not None, header
        _same_as_wfdb(header[:-4])


def test_the_direct_reader_keeps_wfdb_s_rules_and_leaves_other_headers_to_wfdb(tmp_path):
    rng = np.random.default_rng(0)
    signal = rng.normal(scale=2.0, size=(1000, 3))
    signal[5, 1] = np.nan  # written as format 16's "no sample", read back as NaN
    wfdb.wrsamp("odd", fs=257.3, units=["mV", "uV", "V"], sig_name=["I", "II", "V1"], p_signal=signal,
                fmt=["16"] * 3, adc_gain=[200.5, 1000.0, 33.3], baseline=[-7, 0, 1234], comments=["age: 63", "x"],
                write_dir=str(tmp_path))
    assert rec._read_format16(str(tmp_path / "odd")) is not None
    _same_as_wfdb(str(tmp_path / "odd"))
    # Another format, samples of two signal files, a missing gain: wfdb reads them, as before.
    wfdb.wrsamp("packed", fs=500, units=["mV"] * 3, sig_name=["I", "II", "V1"], p_signal=signal[:, :3] * 0.5,
                fmt=["212"] * 3, adc_gain=[200.0] * 3, baseline=[0] * 3, write_dir=str(tmp_path))
    header = (tmp_path / "odd.hea").read_text()
    (tmp_path / "nogain.hea").write_text(header.replace("odd", "nogain").replace("200.5(-7)/mV", "/mV", 1))
    shutil.copy(tmp_path / "odd.dat", tmp_path / "nogain.dat")
    for name in ("packed", "nogain"):
        assert rec._read_format16(str(tmp_path / name)) is None
        _same_as_wfdb(str(tmp_path / name))
    # A signal file shorter than its header says: wfdb's path names it, as before.
    (tmp_path / "odd.dat").write_bytes((tmp_path / "odd.dat").read_bytes()[:100])
    assert rec._read_format16(str(tmp_path / "odd")) is None
    with pytest.raises(rec.BadRecord, match="truncated|has 100 bytes"):
        rec.read_wfdb_record(str(tmp_path / "odd"))


def _clip_in_file(dat, column: int, n_signals: int, rows: slice, value: int) -> None:
    digital = np.fromfile(dat, dtype="<i2").reshape(-1, n_signals)
    digital[rows, column] = value
    digital.tofile(dat)


def test_samples_clipped_at_the_adc_limit_are_missing_and_skip_the_record(mimic_copy):
    """A saturated ADC holds its limit, 32767 in format 16: at MIMIC-IV-ECG's 200 adu/mV that read as a 164 mV plateau,
    which the amplitude check (a 99th percentile) let through into training. Clipped samples are now missing (NaN)
    and the record is skipped as `saturated_signal`, counted, naming the lead."""
    dat = mimic_copy / (E07500 + ".dat")
    v2 = MIMIC_LEADS.index("V2")
    _clip_in_file(dat, v2, 12, slice(1000, 1040), 32767)  # an 80 ms plateau at the rail
    signal, _, _ = rec.read_record_mv(str(mimic_copy / E07500))
    assert np.isnan(signal[1000:1040, v2]).all() and np.isfinite(signal[:1000]).all()
    with pytest.raises(rec.BadRecord, match=r"V2 \(40\)") as bad:
        rec.decode_record(str(mimic_copy), candidate())
    assert bad.value.reason == "saturated_signal"
    # One sample at the rail, too large for an ECG (an electrode pop) is clipped too; the plateau's lead is restored.
    _clip_in_file(dat, v2, 12, slice(1000, 1040), 0)
    _clip_in_file(dat, 0, 12, slice(3000, 3001), -32767)
    assert reason_of(mimic_copy, candidate()) == "saturated_signal"
    assert np.isnan(rec.read_record_mv(str(mimic_copy / E07500))[0][3000, 0])


def test_a_records_own_extremes_at_the_format_limits_are_not_clipping(tmp_path):
    """wfdb.wrsamp's automatic gain maps each signal's extremes onto the format's limits: that record's tallest R peak
    lies at 32767 and is a real sample, not a clip, as with the format-212 reader (wfdb's) and a header's 12-bit ADC."""
    signal = standard_signal()
    wfdb.wrsamp("auto", fs=500, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=signal, fmt=["16"] * 12,
                write_dir=str(tmp_path))
    assert (wfdb.rdrecord(str(tmp_path / "auto"), physical=False).d_signal.max(axis=0) == 32767).sum() >= 4
    record = rec.read_wfdb_record(str(tmp_path / "auto"))
    assert record.saturated == (0,) * 12 and np.isfinite(record.p_signal).all()
    rec.decode_record(str(tmp_path), candidate("auto"))
    # A clean (simulated) ECG whose flat baseline is its lowest value holds format 16's limit for 0.6 s of every beat:
    # its own extreme, not a clip.
    t = np.arange(5000) / 500.0
    clean = np.clip(np.sin(2 * np.pi * 1.2 * t), 0.0, None)[:, None] * np.linspace(0.5, 1.5, 12)[None, :]
    wfdb.wrsamp("clean", fs=500, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), p_signal=clean, fmt=["16"] * 12,
                write_dir=str(tmp_path))
    record = rec.read_wfdb_record(str(tmp_path / "clean"))
    assert record.saturated == (0,) * 12 and np.isfinite(record.p_signal).all()
    # Format 212 (read by wfdb): a 12-bit plateau at 2047 is clipped; the same record's own extremes are not.
    clipped = signal.copy()
    clipped[2000:2030, 3] = 2047 / 200.0
    write_record(tmp_path, "packed", clipped, gain=200.0, fmt="212")
    record = rec.read_wfdb_record(str(tmp_path / "packed"))
    assert record.saturated == tuple(30 if i == 3 else 0 for i in range(12))
    assert np.isnan(record.p_signal[2000:2030, 3]).all()
    assert reason_of(tmp_path, candidate("packed")) == "saturated_signal"
    # A 12-bit converter stored in format 16 (ADC resolution 12 in the header): its limit is 2047, not 32767.
    write_record(tmp_path, "twelve", clipped, gain=200.0)
    header = (tmp_path / "twelve.hea").read_text()
    (tmp_path / "twelve.hea").write_text(header.replace("200.0(0)/mV 16 0", "200.0(0)/mV 12 0"))
    assert "/mV 12 0" in (tmp_path / "twelve.hea").read_text()
    assert rec.read_wfdb_record(str(tmp_path / "twelve")).saturated[3] == 30


def test_an_eight_lead_record_gets_its_limb_leads_derived(tmp_path):
    """Many devices store only the 8 independent leads (I, II, V1-V6); such a record was skipped as too_few_leads. Its
    other limb leads are exact combinations of I and II (Einthoven, Goldberger): they are derived, and the chunk says
    which, for the build report to count."""
    signal = standard_signal()
    eight = [STANDARD_LEADS.index(lead) for lead in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]
    write_record(tmp_path, "eight", signal[:, eight], names=[STANDARD_LEADS[i] for i in eight])
    write_record(tmp_path, "twelve", signal)
    decoded = rec.decode_record(str(tmp_path), candidate("eight"))
    full = rec.decode_record(str(tmp_path), candidate("twelve"))
    assert decoded.derived_leads == ("III", "aVR", "aVL", "aVF") and full.derived_leads == ()
    np.testing.assert_allclose(decoded.ecg, full.ecg, atol=0.002)  # PTB-XL's stored limb leads, to 1 uV rounding
    chunk = rec.decode_chunk(str(tmp_path), [candidate("eight"), candidate("twelve")], rec.DecodeOptions())
    assert list(chunk.derived_leads) == ["III,aVR,aVL,aVF", ""]
    # Without lead II nothing can be derived: still too few leads.
    seven = eight[:1] + eight[2:]
    write_record(tmp_path, "seven", signal[:, seven], names=[STANDARD_LEADS[i] for i in seven])
    assert reason_of(tmp_path, candidate("seven")) == "too_few_leads"
