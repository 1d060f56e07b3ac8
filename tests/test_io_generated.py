"""Reading generated ECGs back with their conditions: NPZ, WFDB folders (ours and others'), corpora."""

from __future__ import annotations

import numpy as np
import pytest

from diffusets_jax.io.generated import read_generated
from diffusets_jax.io.wfdb_out import ADC_GAIN, write_records


def _ecgs(n, length=1024, seed=0):
    return np.random.default_rng(seed).normal(0, 0.2, (n, length, 12)).astype(np.float32)


def test_our_wfdb_records_carry_their_conditions(tmp_path):
    ecgs = _ecgs(3)
    write_records(tmp_path / "wfdb", ecgs, [f"s{i}" for i in range(3)],
                  [{"prompt": "Most importantly, the 1st diagnosis is {Sinus rhythm}.", "sex": "F", "age": 50.0,
                    "heart_rate": 70.0 + i} for i in range(3)], output_fs=500)
    (tmp_path / "wfdb" / "broken.hea").write_text("not a header\n")
    got = read_generated(tmp_path / "wfdb")
    assert got.ecg.shape == (3, 1024, 12) and got.heart_rate.tolist() == [70.0, 71.0, 72.0]
    assert got.sex.tolist() == [0, 0, 0] and got.prompts[0].startswith("Most importantly")
    np.testing.assert_allclose(got.ecg, ecgs, atol=0.02)  # 500 Hz and back, 16-bit quantised
    assert sum(got.skipped.values()) == 1
    assert not got.statements  # a header holds the prompt, not the statements


def test_a_wfdb_record_that_is_not_10_s_long_is_skipped_not_stretched(tmp_path):
    """A header gives the rate, so the duration is known: a 5 s record was resampled whole onto the 10 s time base,
    halving its heart rate (60 bpm scored as 30), where `prepare` refuses such a recording as `wrong_duration`."""
    ten = _ecgs(2)
    write_records(tmp_path / "wfdb", ten, ["ten_0", "ten_1"], output_fs=500)
    write_records(tmp_path / "wfdb", _ecgs(1, length=512), ["five_500"], output_fs=500)  # 2500 samples at 500 Hz
    write_records(tmp_path / "wfdb", _ecgs(1, length=2048), ["twenty"])  # 2048 samples at 102.4 Hz
    got = read_generated(tmp_path / "wfdb")
    assert got.ecg.shape == (2, 1024, 12) and got.skipped == {"not 10 s long": 2}
    np.testing.assert_allclose(got.ecg, ten, atol=0.02)
    write_records(tmp_path / "short", _ecgs(1, length=512), ["five"])
    with pytest.raises(ValueError, match=r"none of its 1 WFDB records .*'not 10 s long': 1"):
        read_generated(tmp_path / "short")


def test_a_wfdb_record_not_in_millivolts_is_skipped_not_scored(tmp_path):
    """A record whose header says mV over ADC counts or microvolts (a wrong gain) was read at 1000x the amplitude and
    scored or shown as an ECG, where `prepare` skips it as `implausible_amplitude` and an NPZ of such values is
    refused: it is skipped and counted."""
    ecgs = _ecgs(3)
    write_records(tmp_path / "wfdb", ecgs, ["mv_0", "mv_1", "counts"], output_fs=500)
    header = tmp_path / "wfdb" / "counts.hea"
    header.write_text(header.read_text().replace(f" {ADC_GAIN}(0)/mV", " 1.0(0)/mV"))  # its ADC counts read as mV
    got = read_generated(tmp_path / "wfdb")
    assert got.ecg.shape == (2, 1024, 12) and list(got.skipped.values()) == [1] and "millivolts" in str(got.skipped)
    np.testing.assert_allclose(got.ecg, ecgs[:2], atol=0.02)


def test_npz_errors_and_conditions(tmp_path):
    np.savez(tmp_path / "a.npz", ecg=_ecgs(2), heart_rate=np.array([60.0, 80.0]),
             report=np.array(["Sinus rhythm|Normal ECG", "Atrial fibrillation"]))
    got = read_generated(tmp_path / "a.npz")
    assert got.reports == [("Sinus rhythm", "Normal ECG"), ("Atrial fibrillation",)]
    assert np.isnan(got.age).all() and got.sex.tolist() == [-1, -1] and got.text_embedding is None
    assert got.statements
    np.savez(tmp_path / "prompts.npz", ecg=_ecgs(1), prompt=np.array(["Most importantly, ..."]))
    assert not read_generated(tmp_path / "prompts.npz").statements
    np.savez(tmp_path / "b.npz", signal=_ecgs(1))
    with pytest.raises(ValueError, match="no 'ecg' array"):
        read_generated(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", ecg=_ecgs(2)[..., :8])
    with pytest.raises(ValueError, match=r"expected \(n, samples, 12\)"):
        read_generated(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", ecg=_ecgs(2), heart_rate=np.array([60.0]))
    with pytest.raises(ValueError, match="'heart_rate' has 1 entries for 2 ECGs"):
        read_generated(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError):
        read_generated(tmp_path / "nope.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an .npz, a folder of WFDB records, or a dataset folder"):
        read_generated(tmp_path / "empty")


def test_a_sample_folder_is_read_from_its_npz_files_in_host_order(tmp_path):
    """A `sample` output folder used to be read through its WFDB records (16-bit, maybe resampled, maybe not
    written: an npz-only run was "not an .npz, a folder of WFDB records, or a dataset folder"); a multi-host run's
    folder holds one NPZ per host, and a single NPZ given alone is only that host's share."""
    import json

    folder = tmp_path / "samples"
    folder.mkdir()
    first, second = _ecgs(2, seed=1), _ecgs(3, seed=2)
    np.savez(folder / "samples-00000-of-00002.npz", ecg=first, heart_rate=np.array([60.0, 61.0]),
             report=np.array(["Sinus rhythm", "Sinus rhythm"]))
    np.savez(folder / "samples-00001-of-00002.npz", ecg=second, heart_rate=np.array([70.0, 71.0, 72.0]),
             report=np.array(["Atrial fibrillation"] * 3))
    manifest = {"count": 5, "npz": ["samples-00000-of-00002.npz", "samples-00001-of-00002.npz"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    got = read_generated(folder)
    np.testing.assert_array_equal(got.ecg, np.concatenate([first, second]))  # exact, not 16-bit
    assert got.heart_rate.tolist() == [60.0, 61.0, 70.0, 71.0, 72.0] and got.reports[2] == ("Atrial fibrillation",)
    assert got.statements  # each NPZ holds a report array: the Turing kit can pair and show them
    from diffusets_jax.io.generated import source_fingerprint

    before = source_fingerprint(folder)
    (folder / "plots").mkdir()
    (folder / "plots" / "sample_00000.png").write_bytes(b"\x89PNG")  # not what is read
    assert source_fingerprint(folder) == before
    np.savez(folder / "samples-00001-of-00002.npz", ecg=second * 2)
    assert source_fingerprint(folder) != before
    (folder / "manifest.json").write_text(json.dumps({**manifest, "npz": []}))
    with pytest.raises(ValueError, match="this sample run wrote no NPZ"):
        read_generated(folder)


def test_the_source_fingerprint_follows_the_content_not_the_path(tmp_path):
    """What a run records of its --generated / --real input: samples written again at the same path are another
    input. A file is its bytes; a folder its files' names and bytes (hidden run records aside)."""
    from diffusets_jax.io.generated import source_fingerprint

    np.savez(tmp_path / "a.npz", ecg=_ecgs(1, seed=1))
    first = source_fingerprint(tmp_path / "a.npz")
    np.savez(tmp_path / "a.npz", ecg=_ecgs(1, seed=2))
    assert source_fingerprint(tmp_path / "a.npz") != first
    folder = tmp_path / "wfdb"
    write_records(folder, _ecgs(2), ["s0", "s1"], [{}, {}])
    before = source_fingerprint(folder)
    (folder / ".diffusets-run.json").write_text("{}")  # a run record is not content
    assert source_fingerprint(folder) == before
    write_records(folder, _ecgs(2, seed=3), ["s0", "s1"], [{}, {}])
    assert source_fingerprint(folder) != before


def test_an_unfinished_sample_run_is_refused(tmp_path):
    """A `sample` run killed midway (its batches in .parts/, some WFDB records, no manifest, its run record still
    "running") was read through its WFDB records and scored as if it were the whole set."""
    import json

    folder = tmp_path / "samples"
    write_records(folder / "wfdb", _ecgs(2), ["s0", "s1"], [{}, {}])
    (folder / ".parts").mkdir()
    np.savez(folder / ".parts" / "batch-000000.npz", ecg=_ecgs(2))
    (folder / ".diffusets-run.json").write_text(json.dumps({"command": "sample", "status": "running"}))
    with pytest.raises(ValueError, match=r"is an unfinished `diffusets-jax sample` run .* rerun the same sample "
                                         "command to finish it"):
        read_generated(folder)
    (folder / ".diffusets-run.json").write_text(json.dumps({"command": "sample", "status": "complete"}))
    assert read_generated(folder).ecg.shape == (2, 1024, 12)  # finished (here without an NPZ): its records


def test_a_part_of_an_unfinished_sample_run_is_refused_too(tmp_path):
    """Given the `wfdb/` folder (or an NPZ) of an unfinished sample run instead of the run's folder, the records
    there were read and scored as the whole set. The enclosing run is found by the sample layout only: a folder
    that merely lies somewhere below a run is not taken for a part of it."""
    import json

    folder = tmp_path / "samples"
    write_records(folder / "wfdb", _ecgs(2), ["s0", "s1"], [{}, {}])
    (folder / ".parts").mkdir()
    np.savez(folder / ".parts" / "batch-000000.npz", ecg=_ecgs(2))
    np.savez(folder / "samples.npz", ecg=_ecgs(2))  # as a killed run's leftovers may stand
    np.savez(folder / "samples-00001-of-00002.npz", ecg=_ecgs(2))
    write_records(folder / "other" / "wfdb", _ecgs(1), ["s0"], [{}])
    (folder / ".diffusets-run.json").write_text(json.dumps({"command": "sample", "status": "running"}))
    parts = [folder / "wfdb", folder / "samples.npz", folder / "samples-00001-of-00002.npz",
             folder / ".parts" / "batch-000000.npz"]
    for part in parts:
        with pytest.raises(ValueError, match=rf"--generated {part} is part of {folder}, an unfinished `diffusets-jax "
                                             "sample` run .* rerun the same sample command to finish it"):
            read_generated(part)
    assert read_generated(folder / "other" / "wfdb").ecg.shape == (1, 1024, 12)  # not the sample layout
    (folder / ".diffusets-run.json").write_text(json.dumps({"command": "sample", "status": "complete"}))
    assert read_generated(folder / "wfdb").ecg.shape == (2, 1024, 12)
    assert read_generated(folder / "samples.npz").ecg.shape == (2, 1024, 12)
    # A run record of another command is not a sample run's.
    (folder / ".diffusets-run.json").write_text(json.dumps({"command": "evaluate", "status": "running"}))
    assert read_generated(folder / "wfdb").ecg.shape == (2, 1024, 12)


def test_a_damaged_npz_or_a_bad_field_is_one_line_naming_the_file_and_field(tmp_path):
    """A garbled NPZ was a BadZipFile traceback, a single heart rate for every ECG "len() of unsized object", and
    sex spelt M/F (as the conditions files spell it) "invalid literal for int()" naming no file or field."""
    (tmp_path / "garbled.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match=r"garbled.npz: not a readable .npz"):
        read_generated(tmp_path / "garbled.npz")
    np.save(tmp_path / "array.npy", _ecgs(1))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    with pytest.raises(ValueError, match=r"array.npz: not a readable .npz \(an .npy array"):
        read_generated(tmp_path / "array.npz")
    np.savez(tmp_path / "scalar.npz", ecg=_ecgs(4), heart_rate=np.array(70.0))
    with pytest.raises(ValueError, match=r"scalar.npz: 'heart_rate' is a single value; give one per ECG \(4\)"):
        read_generated(tmp_path / "scalar.npz")
    np.savez(tmp_path / "words.npz", ecg=_ecgs(4), sex=np.array(["M", "female", "", "1"]),
             age=np.array(["50", "61.5", "", "70"]))
    got = read_generated(tmp_path / "words.npz")
    assert got.sex.tolist() == [1, 0, -1, 1] and got.age[[0, 1, 3]].tolist() == [50.0, 61.5, 70.0]
    assert np.isnan(got.age[2])
    np.savez(tmp_path / "bad_sex.npz", ecg=_ecgs(2), sex=np.array(["M", "X"]))
    with pytest.raises(ValueError, match=r"bad_sex.npz: 'sex'\[1\]: cannot parse 'X' \(allowed: M, F, male"):
        read_generated(tmp_path / "bad_sex.npz")
    np.savez(tmp_path / "bad_age.npz", ecg=_ecgs(2), age=np.array(["50", "fifty"]))
    with pytest.raises(ValueError, match=r"bad_age.npz: 'age'\[1\] is 'fifty', not a number"):
        read_generated(tmp_path / "bad_age.npz")


def test_an_npz_in_microvolts_is_refused_naming_the_file(tmp_path):
    """An NPZ names no units: samples in microvolts were scored as ECGs of 1000x the amplitude, exit 0, the only
    sign "Records over 10 mV: 100 %" in the report."""
    ecgs = _ecgs(3)
    np.savez(tmp_path / "uv.npz", ecg=ecgs * 1000.0)
    with pytest.raises(ValueError, match=r"uv.npz: 'ecg' does not look like millivolts"):
        read_generated(tmp_path / "uv.npz")
    np.savez(tmp_path / "mv.npz", ecg=ecgs)
    assert read_generated(tmp_path / "mv.npz").ecg.shape == ecgs.shape


def test_a_set_without_ecgs_is_refused_when_read(tmp_path):
    """An NPZ of shape (0, 1024, 12) got through to `evaluate`, which claimed its output folder and measured the
    whole real split before failing with "no inputs given"."""
    np.savez(tmp_path / "empty.npz", ecg=np.zeros((0, 1024, 12), np.float32))
    with pytest.raises(ValueError, match=r"--generated .*empty.npz holds no ECGs"):
        read_generated(tmp_path / "empty.npz")


def test_a_multi_host_runs_npz_files_must_agree_on_their_text_embeddings(tmp_path):
    """Hosts' NPZs with text embeddings of other widths failed in numpy's concatenate with a traceback; of other
    recorded embedders, they were mixed into one set of vectors. One line naming the file; agreeing ones are read."""
    import json

    folder = tmp_path / "samples"
    folder.mkdir()
    names = ["samples-00000-of-00002.npz", "samples-00001-of-00002.npz"]
    (folder / "manifest.json").write_text(json.dumps({"count": 4, "npz": names}))
    np.savez(folder / names[0], ecg=_ecgs(2), text_embedding=np.ones((2, 8)), embedder_id=np.array("local/a/8"))
    for second, message in (({"text_embedding": np.ones((2, 5)), "embedder_id": np.array("local/a/8")}, "is 5-d from"),
                            ({"text_embedding": np.ones((2, 8)), "embedder_id": np.array("local/b/8")}, "is 8-d from local/b/8")):
        np.savez(folder / names[1], ecg=_ecgs(2), **second)
        with pytest.raises(ValueError, match=f"{names[1]}: 'text_embedding' {message}"):
            read_generated(folder)
    np.savez(folder / names[1], ecg=_ecgs(2), text_embedding=np.ones((2, 8)), embedder_id=np.array("local/a/8"))
    got = read_generated(folder)
    assert got.text_embedding.shape == (4, 8) and got.text_embedder == "local/a/8"
    assert got.text_embedding_file == str(folder / names[0])


def test_an_npz_of_ecgs_at_the_time_base_is_read_without_copies(tmp_path):
    """`evaluate --generated samples.npz` held each ECG three times (read, stacked, cast): about 2.9 GB for 20,000
    ECGs of 48 KB. At 1024 samples in float32 they are used as read."""
    import tracemalloc

    n = 400
    ecg = np.random.default_rng(0).normal(size=(n, 1024, 12)).astype(np.float32)
    path = tmp_path / "samples.npz"
    np.savez(path, ecg=ecg, report=np.array(["Sinus rhythm"] * n))
    tracemalloc.start()
    try:
        generated = read_generated(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(generated.ecg, ecg)
    assert generated.ecg.dtype == np.float32
    assert peak < 1.5 * ecg.nbytes, (peak, ecg.nbytes)


def test_an_npz_names_each_samples_patient_where_known(tmp_path):
    """`subject_id`: the patient whose record conditioned each ECG, for evaluate's clustered bootstrap; -1, NaN
    or an empty entry is unknown, and a float array's 17.0 is patient 17."""
    np.savez(tmp_path / "ids.npz", ecg=_ecgs(4), subject_id=np.array([17.0, -1.0, np.nan, 17.0]))
    got = read_generated(tmp_path / "ids.npz")
    assert got.subject_id.tolist() == ["17", "", "", "17"]
    np.savez(tmp_path / "text.npz", ecg=_ecgs(2), subject_id=np.array(["p-3", ""]))
    assert read_generated(tmp_path / "text.npz").subject_id.tolist() == ["p-3", ""]
    np.savez(tmp_path / "none.npz", ecg=_ecgs(2))
    assert read_generated(tmp_path / "none.npz").subject_id is None
    np.savez(tmp_path / "short.npz", ecg=_ecgs(2), subject_id=np.array([1]))
    with pytest.raises(ValueError, match="'subject_id' has 1 entries for 2 ECGs"):
        read_generated(tmp_path / "short.npz")
