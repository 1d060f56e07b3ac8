"""`sample`'s outputs: NPZ / WFDB / PNG / manifest, resumable corpora, and folders that are never a user's."""

from __future__ import annotations

import contextlib
import json
import sqlite3

import numpy as np
import pytest
import wfdb

from diffusets_jax.cli import main
from diffusets_jax.conditioning.requests import make_condition
from diffusets_jax.diffusion.samplers import sampler_config
from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.io.corpus import write_corpus
from diffusets_jax.io.outputs import parse_formats, sample_to_directory
from diffusets_jax.io.run_dir import RUN_FILE, fingerprint
from diffusets_jax.pipeline import ECGGenerator
from tests.helpers.cli import exit_code
from tests.helpers.non_finite import NonFiniteAt
from tests.helpers.tiny_models import TEXT_DIM


@pytest.fixture(scope="module")
def generator(model_dir, openai_env):
    return ECGGenerator(model_dir, sampler_config("ddim", steps=2), batch_size=8, seed=1)


SAMPLE = ["--text", "Sinus tachycardia|Abnormal ECG", "--sex", "F", "--age", "37", "--hr", "110", "--steps", "2",
          "--batch-size", "8"]


def test_sample_command_writes_npz_wfdb_png_and_manifest(model_dir, openai_env, tmp_path):
    out = tmp_path / "out"
    assert main(["sample", "--model-dir", str(model_dir), "--out", str(out), *SAMPLE, "-n", "2", "--wfdb-fs", "500"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 2 and not manifest["skipped"] and manifest["npz"] == ["samples.npz"]
    with np.load(out / "samples.npz") as data:
        assert data["ecg"].shape == (2, 1024, 12)
        assert data["heart_rate"].tolist() == [110.0, 110.0]
        assert data["prompt"][0].startswith("Most importantly, the 1st diagnosis is {Sinus tachycardia}.")
        ecg0 = data["ecg"][0]
    record = wfdb.rdrecord(str(out / manifest["samples"][0]["wfdb"]))
    assert record.sig_name == list(STANDARD_LEADS) and record.fs == 500 and record.p_signal.shape == (5000, 12)
    assert any("Sinus tachycardia" in c for c in record.comments)
    from scipy.signal import resample

    back = resample(record.p_signal, 1024, axis=0)  # the 500 Hz record is the generated signal resampled
    assert np.max(np.abs(back - ecg0)) < 0.01 + 0.05 * np.max(np.abs(ecg0))
    assert (out / manifest["samples"][1]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".parts").exists()  # per-batch parts are merged and removed


class Crash(RuntimeError):
    pass


def crash_after_the_first_batch(generator, conditions, out, formats=("npz",)):
    """Run `sample_to_directory` into `out` (npz only, unless `formats`) and crash it as the second batch arrives:
    part 0 is on disk."""
    def crashing(batches):
        for i, batch in enumerate(batches):
            if i == 1:
                raise Crash
            yield batch

    original = generator.generate
    generator.generate = lambda *a, **k: crashing(original(*a, **k))
    try:
        with pytest.raises(Crash):
            sample_to_directory(generator, conditions, out, formats=list(formats), progress=False)
    finally:
        generator.generate = original


def test_a_crashed_run_resumes_and_completes_identically(generator, openai_env, monkeypatch, tmp_path):
    """The server's vectors differ a little from call to call, as ada-002's do: the resume asked again and made the
    rest of the ECGs from other vectors than the uninterrupted run. The run keeps what it got and reuses it."""
    monkeypatch.setattr(openai_env, "jitter", 1e-6)
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 11)]
    openai_env.jitter_calls = 0
    reference = sample_to_directory(generator, conditions, tmp_path / "ref", formats=["npz"], progress=False)
    with np.load(tmp_path / "ref" / "samples.npz") as data:
        expected = data["ecg"]

    openai_env.jitter_calls = 0  # the crashed run gets the answer the uninterrupted one got
    crash_after_the_first_batch(generator, conditions, tmp_path / "out")
    assert len(list((tmp_path / "out" / ".parts").glob("batch-*.npz"))) == 1  # batch 0 survived the crash
    asked = len(openai_env.received)
    resumed = sample_to_directory(generator, conditions, tmp_path / "out", formats=["npz"], progress=False)
    assert len(openai_env.received) == asked  # the resume asked for nothing
    # Kept in the output folder, which may be on a shared disk: a rollback journal, not WAL's shared memory.
    with contextlib.closing(sqlite3.connect(tmp_path / "out" / "embeddings.sqlite")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not list((tmp_path / "out").glob("embeddings.sqlite-*"))
    with np.load(tmp_path / "out" / "samples.npz") as data:
        np.testing.assert_array_equal(data["ecg"], expected)
    assert resumed["count"] == reference["count"] == 11


def test_a_run_killed_after_merging_its_parts_is_not_generated_again(generator, tmp_path, monkeypatch):
    """The merged parts were removed before the manifest and the run record said complete: a run killed in between
    (the removal of thousands of parts takes a while) found no part and generated every ECG again on its rerun."""
    from diffusets_jax.io.run_dir import RunDir

    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 11)]
    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        patched.setattr(RunDir, "mark_complete", lambda self, **_: (_ for _ in ()).throw(Crash()))  # the kill
        with pytest.raises(Crash):
            sample_to_directory(generator, conditions, out, formats=["npz"], progress=False)
    with np.load(out / "samples.npz") as data:
        expected = data["ecg"]
    asked = []
    original = generator.generate
    monkeypatch.setattr(generator, "generate", lambda *a, **k: (asked.append(list(k["batches"])), original(*a, **k))[1])
    manifest = sample_to_directory(generator, conditions, out, formats=["npz"], progress=False)
    assert asked == [[]] and manifest["written"] == 11  # nothing generated again
    with np.load(out / "samples.npz") as data:
        np.testing.assert_array_equal(data["ecg"], expected)
    assert not (out / ".parts").exists() and json.loads((out / RUN_FILE).read_text())["status"] == "complete"
    # Killed after the record said complete, before the parts went: the rerun removes them.
    (out / ".parts").mkdir()
    (out / ".parts" / "batch-000000.npz").write_bytes(b"merged already")
    assert sample_to_directory(generator, conditions, out, formats=["npz"], progress=False)["written"] == 11
    assert not (out / ".parts").exists()


OLD_CODE = {"package_version": "0.0.1", "git_commit": "0123456789abcdef", "git_dirty": False}


def as_if_written_by_old_code(out, part=None, count=None):
    """Pretend the crashed run in `out` was begun under an older diffusets-jax: its record and its `part` (a batch's
    NPZ) or `count` (a corpus shard's count) say so."""
    from diffusets_jax.io.files import read_json, write_json_atomic

    write_json_atomic(out / RUN_FILE, {**read_json(out / RUN_FILE, "run record"), "code": OLD_CODE})
    if part is not None:
        with np.load(part) as data:
            arrays = dict(data)
        np.savez_compressed(part, **{**arrays, "code": np.array(json.dumps(OLD_CODE, sort_keys=True))})
    if count is not None:
        write_json_atomic(count, {**read_json(count, "count"), "code": OLD_CODE})


def test_a_rerun_removes_what_a_killed_run_left_half_written(generator, tmp_path):
    """A run killed inside a WFDB write or a PNG save leaves `.NAME.tmp-*` staging folders and files; the rerun
    wrote those records again but left the temporaries in the folder for good."""
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 11)]
    crash_after_the_first_batch(generator, conditions, tmp_path / "out", formats=("npz", "wfdb", "png"))
    out = tmp_path / "out"
    leftovers = [out / "wfdb" / ".sample_00009.tmp-abc123", out / "plots" / ".sample_00009.png.tmp-7-0a1b2c.png",
                 out / ".samples.npz.tmp-7-0a1b2c.npz"]
    leftovers[0].mkdir(parents=True)
    (leftovers[0] / "sample_00009.dat").write_bytes(b"half")
    leftovers[1].parent.mkdir(parents=True, exist_ok=True)
    for path in leftovers[1:]:
        path.write_bytes(b"half")
    sample_to_directory(generator, conditions, out, formats=["npz", "wfdb", "png"], progress=False)
    assert [p for p in leftovers if p.exists()] == []
    assert sorted(p.name for p in (out / "wfdb").iterdir()) == sorted(
        f"sample_{i:05d}.{ext}" for i in range(11) for ext in ("dat", "hea"))


def test_a_run_resumed_by_other_code_says_which_samples_each_version_wrote(generator, tmp_path, capsys):
    from diffusets_jax.provenance import code_version

    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 11)]
    assert "samples_by_code" not in sample_to_directory(generator, conditions, tmp_path / "ref", formats=["npz"],
                                                        progress=False)
    crash_after_the_first_batch(generator, conditions, tmp_path / "out")
    as_if_written_by_old_code(tmp_path / "out", part=tmp_path / "out" / ".parts" / "batch-000000.npz")
    manifest = sample_to_directory(generator, conditions, tmp_path / "out", formats=["npz"], progress=False)
    assert "is resumed by" in capsys.readouterr().err
    assert manifest["samples_by_code"] == [
        {"code": OLD_CODE, "samples": [f"sample_{i:05d}" for i in range(8)]},
        {"code": code_version(), "samples": ["sample_00008", "sample_00009", "sample_00010"]}]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples_by_code"] == manifest["samples_by_code"]


def test_a_non_finite_ecg_is_skipped_in_every_format_and_counted(generator, tmp_path):
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 5), make_condition("Atrial fibrillation", "M", 70, 95, 6)]
    clean = sample_to_directory(generator, conditions, tmp_path / "clean", formats=["npz"], progress=False)
    assert clean["written"] == 11 and not clean["skipped"]
    for formats in (["npz"], ["npz", "wfdb", "png"]):
        out = tmp_path / "_".join(formats)
        manifest = sample_to_directory(NonFiniteAt(generator, [1, 9]), conditions, out, formats=formats,
                                       progress=False)
        assert manifest["count"] == 11 and manifest["written"] == 9
        assert set(manifest["skipped"]) == {"sample_00001", "sample_00009"}
        assert manifest["skipped"]["sample_00001"] == "the ECG has 1 non-finite samples (NaN/inf)"
        with np.load(out / "samples.npz") as data, np.load(tmp_path / "clean" / "samples.npz") as reference:
            kept = [p for p in range(11) if p not in (1, 9)]
            assert data["position"].tolist() == kept and np.isfinite(data["ecg"]).all()
            np.testing.assert_array_equal(data["ecg"], reference["ecg"][kept])  # the others are as generated
            assert data["heart_rate"].tolist() == [60.0] * 4 + [95.0] * 5  # conditions follow their positions
        if "wfdb" in formats:
            assert sorted(p.stem for p in (out / "wfdb").glob("*.hea")) == [f"sample_{p:05d}" for p in kept]
            assert sorted(p.stem for p in (out / "plots").glob("*.png")) == [f"sample_{p:05d}" for p in kept]
            assert "wfdb" not in manifest["samples"][9] and manifest["samples"][8]["wfdb"] == "wfdb/sample_00008"


@pytest.mark.parametrize("corpus", [False, True], ids=["folder", "corpus"])
def test_the_command_says_when_ecgs_failed_and_exits_1_when_all_did(model_dir, openai_env, tmp_path, capsys,
                                                                    monkeypatch, corpus):
    """The summary's skipped count was the only trace of failed generations, with exit 0 even when no ECG was
    usable (e.g. --guidance-scale 1e30)."""
    import diffusets_jax.pipeline as pipeline

    real, failing = pipeline.ECGGenerator, {"positions": [1]}
    monkeypatch.setattr(pipeline, "ECGGenerator", lambda *a, **k: NonFiniteAt(real(*a, **k), failing["positions"]))
    args = ["sample", "--model-dir", str(model_dir), *SAMPLE, "-n", "3", *(["--corpus"] if corpus else [])]
    assert main([*args, "--out", str(tmp_path / "some")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffusets-jax")]
    listed = f"{tmp_path / 'some'}/.shard-counts/" if corpus else f"'skipped' in {tmp_path / 'some'}/manifest.json"
    first = "ECG 1" if corpus else "sample_00001"
    assert err == [f"diffusets-jax sample: warning: 1 of 3 ECGs were skipped (e.g. {first}: the ECG has 1 non-finite "
                   f"samples (NaN/inf)); {listed} lists them with the reason"]
    failing["positions"] = [0, 1, 2]
    assert main([*args, "--out", str(tmp_path / "none")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffusets-jax")]
    assert len(err) == 1 and err[0].startswith("diffusets-jax sample: error: every one of the 3 ECGs has NaN or inf "
                                               "samples, so none was written")
    assert err[0].endswith("lower --guidance-scale, or check the model with `diffusets-jax diagnose`")


def test_guidance_on_a_unet_without_condition_dropout_is_said_in_one_line(model_dir, openai_env, tmp_path, capsys):
    """The tiny U-Net records no condition dropout: guidance ran on its untrained null condition without a word."""
    args = ["sample", "--model-dir", str(model_dir), *SAMPLE, "-n", "1", "--formats", "npz"]
    assert main([*args, "--guidance-scale", "3", "--out", str(tmp_path / "guided")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffusets-jax")]
    assert err == ["diffusets-jax sample: warning: --guidance-scale 3: this U-Net's provenance records no condition "
                   "dropout (train.cond_dropout), so the null condition guidance contrasts with was never trained "
                   "and the ECGs are not classifier-free guidance; train with condition dropout "
                   "(configs/improved_unet.py) to use it"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffusets-jax")]


def test_a_resumed_run_leaves_a_failed_ecg_of_an_earlier_part_out_of_the_npz(generator, tmp_path):
    """Parts written before failed generations were skipped (an npz-only run recorded none) may hold a NaN ECG:
    the merge leaves it out whichever run wrote the part."""
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 11)]
    out = tmp_path / "out"

    crash_after_the_first_batch(generator, conditions, out)
    (part,) = (out / ".parts").glob("batch-*.npz")
    with np.load(part) as data:
        arrays = dict(data)
    arrays["ecg"][3, 7, 2] = np.nan  # as the code before 2026-12-06 kept it, with nothing in skipped_name
    np.savez_compressed(part, **arrays)
    manifest = sample_to_directory(generator, conditions, out, formats=["npz"], progress=False)
    assert manifest["written"] == 10 and manifest["skipped"] == {
        "sample_00003": "the ECG has 1 non-finite samples (NaN/inf)"}
    with np.load(out / "samples.npz") as data:
        assert data["position"].tolist() == [p for p in range(11) if p != 3] and np.isfinite(data["ecg"]).all()


def test_user_folders_are_refused_and_overwrite_replaces_them_as_a_whole(model_dir, openai_env, tmp_path, capsys):
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    args = ["sample", "--model-dir", str(model_dir), *SAMPLE, "--formats", "npz"]
    assert main([*args, "--out", str(users)]) == 2
    err = capsys.readouterr().err
    assert "is not empty and was not written by diffusets-jax sample" in err and len(err.strip().splitlines()) == 1
    assert (users / "thesis.tex").read_text() == "years of work"
    # Our own run with other settings: refused, naming what changed; the same settings: nothing to redo.
    ours = tmp_path / "ours"
    assert main([*args, "--out", str(ours), "-n", "6"]) == 0
    before = (ours / "samples.npz").read_bytes()
    assert main([*args, "--out", str(ours), "-n", "2"]) == 2
    assert "other settings" in capsys.readouterr().err
    # The network's dtype changes the ECGs: a bf16 rerun would have resumed (or mixed into) the float32 run. The
    # message names what changed and nothing else (the recorded settings went through JSON, tuples and all); a
    # float32 run records no compute_dtype at all.
    assert main([*args, "--out", str(ours), "-n", "6", "--dtype", "bfloat16"]) == 2
    assert ('with other settings (compute_dtype: (absent) -> "bfloat16 networks, float32 sampler"):'
            in capsys.readouterr().err)
    assert main([*args, "--out", str(ours), "-n", "6"]) == 0
    assert (ours / "samples.npz").read_bytes() == before
    # A bf16 run recorded before 2026-12-06 (the bare "bfloat16": most of the U-Net then still computed in float32),
    # interrupted, is not resumed into by today's bf16 networks.
    old = tmp_path / "old_bf16"
    assert main([*args, "--out", str(old), "-n", "2", "--dtype", "bfloat16"]) == 0
    record = json.loads((old / RUN_FILE).read_text())
    record["settings"]["compute_dtype"] = "bfloat16"
    record.update(status="running", fingerprint=fingerprint({"command": "sample", **record["settings"]}))
    (old / RUN_FILE).write_text(json.dumps(record))
    assert main([*args, "--out", str(old), "-n", "2", "--dtype", "bfloat16"]) == 2
    assert 'compute_dtype: "bfloat16" -> "bfloat16 networks, float32 sampler"' in capsys.readouterr().err
    # --overwrite replaces the folder as a whole: nothing of the old run is left beside the new one.
    assert main([*args, "--out", str(ours), "-n", "2", "--formats", "npz,wfdb", "--overwrite"]) == 0
    manifest = json.loads((ours / "manifest.json").read_text())
    assert manifest["count"] == 2 and len(list((ours / "wfdb").glob("*.hea"))) == 2
    assert not [p for p in ours.parent.iterdir() if p.name.startswith(".ours.")]  # no staging left behind


@pytest.mark.parametrize("extra,match", [
    (["--formats", "npz,gif"], "unknown gif"),
    (["--steps", "0"], "argument --steps: must be a whole number >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    (["--wfdb-fs", "-5"], "--wfdb-fs must be a rate in Hz from 100 to 10000"),
    # A rate for records not asked for: samples.npz stayed at 102.4 Hz, with nothing saying so.
    (["--formats", "npz,png", "--wfdb-fs", "500"], "--wfdb-fs sets the WFDB records' rate, and --formats npz,png "
                                                   "writes none"),
])
def test_bad_sample_flags_fail_at_once_with_one_line(model_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    args = ["sample", "--model-dir", str(model_dir), "--out", str(out), *SAMPLE]
    assert exit_code([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # checked before anything was created


def test_output_path_that_is_a_file_is_refused_before_any_work(model_dir, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["sample", "--model-dir", str(model_dir), "--out", str(target), *SAMPLE]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_parse_formats():
    assert parse_formats("npz, WFDB,npz") == ["npz", "wfdb"]
    with pytest.raises(ValueError, match="nothing chosen"):
        parse_formats(" , ")


def test_the_same_formats_in_another_order_resume_the_run(generator, tmp_path):
    """The formats are part of the fingerprint, and were kept in the order given: `--formats wfdb,npz` after
    `npz,wfdb` was refused as a run with other settings, though it writes the same files."""
    out, condition = tmp_path / "out", make_condition("Sinus rhythm", "M", 50, 70, 2)
    first = sample_to_directory(generator, [condition], out, formats="wfdb,npz", progress=False)
    assert first["settings"]["formats"] == ["npz", "wfdb"]
    stamp = (out / "samples.npz").stat().st_mtime_ns
    again = sample_to_directory(generator, [condition], out, formats=("npz", "wfdb"), progress=False)
    assert again["settings"]["formats"] == ["npz", "wfdb"]
    assert (out / "samples.npz").stat().st_mtime_ns == stamp  # the finished run, returned as it was
    assert parse_formats("png,npz") == parse_formats("npz,png") == ["npz", "png"]


@pytest.mark.parametrize("formats", ["npz", ("NPZ",)], ids=["string", "upper-case"])
def test_the_library_reads_formats_as_the_command_does(generator, tmp_path, formats):
    """`formats="npz"` was read letter by letter and ("NPZ",) matched no format: the run wrote no file at all and its
    manifest counted every ECG written."""
    out = tmp_path / "out"
    manifest = sample_to_directory(generator, [make_condition("Sinus rhythm", "M", 50, 70, 2)], out, formats=formats,
                                   progress=False)
    assert manifest["settings"]["formats"] == ["npz"] and manifest["npz"] == ["samples.npz"]
    with np.load(out / "samples.npz") as data:
        assert data["ecg"].shape == (2, 1024, 12)


def test_the_library_refuses_an_unknown_format_before_claiming_the_folder(generator, tmp_path):
    with pytest.raises(ValueError, match="unknown pdf"):
        sample_to_directory(generator, [make_condition("Sinus rhythm", "M", 50, 70, 1)], tmp_path / "out",
                            formats=["npz", "pdf"], progress=False)
    assert not (tmp_path / "out").exists()


def test_corpus_is_resumable_refuses_other_settings_and_reads_back_with_tfds(generator, openai_env, monkeypatch,
                                                                            tmp_path):
    import tensorflow_datasets as tfds

    from diffusets_jax.data.card import read_card

    monkeypatch.setattr(openai_env, "jitter", 1e-6)  # a lost shard is made again from the vectors it was made from
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 10), make_condition("Sinus bradycardia", "M", 70, 48, 7)]
    out = tmp_path / "corpus"
    first = write_corpus(generator, conditions, out, shard_size=8, progress=False)
    assert first == {"examples": 17, "requested": 17, "shards": 3, "written": 3, "skipped": 0, "skipped_ecgs": 0,
                     "skipped_examples": {}}
    shards = sorted(p for p in out.iterdir() if ".tfrecord-" in p.name)
    before = {p.name: p.read_bytes() for p in shards}
    shards[1].unlink()  # a crash lost the middle shard
    second = write_corpus(generator, conditions, out, shard_size=8, progress=False)
    assert second["written"] == 1 and second["skipped"] == 2
    assert shards[1].read_bytes() == before[shards[1].name]  # regenerated identically
    with pytest.raises(ValueError, match="other settings"):
        write_corpus(generator, conditions[:1], out, shard_size=8, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        write_corpus(generator, conditions, out, shard_size=16, progress=False)
    builder = tfds.builder_from_directory(str(out))
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(examples) == 17
    assert {e["heart_rate_source"].decode() for e in examples} == {"condition"}
    assert examples[0]["ecg"].shape == (1024, 12) and examples[0]["text_embedding"].shape == (TEXT_DIM,)
    assert sorted(int(e["sex"]) for e in examples) == [0] * 10 + [1] * 7
    card = read_card(builder)
    assert card["kind"] == "corpus" and card["conditioning"]["embedder"]["dim"] == TEXT_DIM


def test_the_next_batch_computes_while_the_writer_serializes_this_one(generator, tmp_path, monkeypatch):
    """A corpus shard's host work (serializing each ECG) ran between batches, with the accelerator idle: now the next
    batch is dispatched before this one is handed to the writer, for corpora, sample folders and `generate_batches`,
    and the ECGs are the ones `generate_batch` makes alone."""
    from diffusets_jax.data import shards

    events = []
    dispatch = generator._dispatch
    monkeypatch.setattr(generator, "_dispatch", lambda cond, index: events.append(("dispatch", index)) or dispatch(
        cond, index))
    make_serializer = shards.example_serializer

    def noting_serializer(features):
        serialize = make_serializer(features)
        return lambda example: events.append(("write", example["study_id"] // 8)) or serialize(example)

    monkeypatch.setattr(shards, "example_serializer", noting_serializer)
    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 20)]
    write_corpus(generator, conditions, tmp_path / "corpus", shard_size=24, progress=False)
    first_write = {index: events.index(("write", index)) for index in range(3)}
    assert events.index(("dispatch", 1)) < first_write[0] and events.index(("dispatch", 2)) < first_write[1]
    assert [event for event in events if event[0] == "dispatch"] == [("dispatch", i) for i in range(3)]

    events.clear()
    for batch in generator.generate(conditions):
        events.append(("handed over", batch.index))
    assert events == [("dispatch", 0), ("dispatch", 1), ("handed over", 0), ("dispatch", 2), ("handed over", 1),
                      ("handed over", 2)]

    from diffusets_jax.conditioning.requests import expand

    items = expand(conditions)
    vectors = np.random.default_rng(0).normal(size=(len(items), TEXT_DIM)).astype(np.float32)
    jobs = [(generator.condition_arrays(items[s : s + 8], vectors[s : s + 8]), s // 8) for s in range(0, len(items), 8)]
    together = list(generator.generate_batches(iter(jobs)))
    alone = [generator.generate_batch(cond, index) for cond, index in jobs]
    assert [a.shape for a in together] == [(8, 1024, 12), (8, 1024, 12), (4, 1024, 12)]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone, strict=True))


def test_a_corpus_resumed_by_other_code_says_which_shards_each_version_wrote(generator, tmp_path):
    from diffusets_jax.data.card import read_card
    from diffusets_jax.provenance import code_version

    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 17)]
    out = tmp_path / "corpus"
    write_corpus(generator, conditions, out, shard_size=8, progress=False)
    shards = sorted(p for p in out.iterdir() if ".tfrecord-" in p.name)
    shards[1].unlink()  # a crash lost the middle shard, and the rerun comes after an upgrade
    as_if_written_by_old_code(out, count=out / ".shard-counts" / "shard-00000.json")
    as_if_written_by_old_code(out, count=out / ".shard-counts" / "shard-00002.json")
    summary = write_corpus(generator, conditions, out, shard_size=8, progress=False)
    expected = [{"code": OLD_CODE, "shards": [0, 2]}, {"code": code_version(), "shards": [1]}]
    assert summary["written"] == 1 and summary["shards_by_code"] == expected
    assert read_card(out)["shards_by_code"] == expected


def test_a_corpus_leaves_non_finite_ecgs_out_counts_them_and_resumes(generator, tmp_path):
    """A NaN in a training corpus poisons every run that reads it: such ECGs are left out of their shards, counted,
    and TFDS is given the shards' true lengths, also when a lost shard is regenerated."""
    import tensorflow_datasets as tfds

    from diffusets_jax.data.card import read_card

    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 10), make_condition("Sinus bradycardia", "M", 70, 48, 7)]
    spoiled = NonFiniteAt(generator, [3, 9, 10])
    out = tmp_path / "corpus"
    first = write_corpus(spoiled, conditions, out, shard_size=8, progress=False)
    assert first["examples"] == 14 and first["requested"] == 17 and first["skipped_ecgs"] == 3
    assert first["skipped_examples"] == {3: "the ECG has 1 non-finite samples (NaN/inf)",
                                         9: "the ECG has 1 non-finite samples (NaN/inf)",
                                         10: "the ECG has 1 non-finite samples (NaN/inf)"}

    def read_back():
        builder = tfds.builder_from_directory(str(out))
        assert builder.info.splits["train"].num_examples == 14
        return builder, list(tfds.as_numpy(builder.as_dataset(split="train")))

    builder, examples = read_back()
    assert builder.info.splits["train"].shard_lengths == [7, 6, 1]
    assert sorted(int(e["study_id"]) for e in examples) == [p for p in range(17) if p not in (3, 9, 10)]
    assert all(np.isfinite(e["ecg"]).all() for e in examples)
    assert read_card(builder)["splits"] == {"train": 14} and read_card(builder)["skipped_ecgs"] == 3
    # A crash lost the middle shard's count after the shard was written: that shard is generated again.
    shards = sorted(p for p in out.iterdir() if ".tfrecord-" in p.name)
    before = shards[1].read_bytes()
    (out / ".shard-counts" / "shard-00001.json").unlink()
    second = write_corpus(spoiled, conditions, out, shard_size=8, progress=False)
    assert second["written"] == 1 and second["skipped"] == 2 and second["skipped_ecgs"] == 3
    assert shards[1].read_bytes() == before
    builder, examples = read_back()
    assert builder.info.splits["train"].shard_lengths == [7, 6, 1] and len(examples) == 14


def test_overwrite_never_replaces_a_folder_holding_the_generators_model(model_dir, openai_env, tmp_path):
    """The writers themselves refuse it (the command checks its flags first): `--out` one level above the model
    directory, with --overwrite, would have replaced the model with the samples drawn from it."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(model_dir, project / "model")
    generator = ECGGenerator(project / "model", sampler_config("ddim", steps=2), batch_size=8, seed=1)
    conditions = [make_condition("Sinus rhythm", "M", 50, 70)]
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    with pytest.raises(ValueError, match=r"--out .*/project holds --model-dir .*/project/model, which this run reads"):
        sample_to_directory(generator, conditions, project, formats=["npz"], overwrite=True, progress=False)
    with pytest.raises(ValueError, match=r"holds --model-dir"):
        write_corpus(generator, conditions, project, shard_size=8, overwrite=True, progress=False)
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before


def test_a_corpus_rerun_removes_its_own_temporaries_in_one_listing_and_no_other_process_s(generator, tmp_path,
                                                                                         monkeypatch):
    """A corpus run killed (-9) while writing a shard left `.synthetic_ecg-train.tfrecord-....tmp-PID-RANDOM` (and
    could leave a count's) for good. The rerun removes them, in one listing per folder (a glob per shard and count
    was two thousand scans for 1,000 shards), and only this corpus's shard and count temporaries, never what another
    process may be writing beside them (process 0's metadata, card or run record)."""
    import os

    import diffusets_jax.io.corpus as corpus

    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 17)]  # 3 shards of 8
    out = tmp_path / "corpus"
    write_corpus(generator, conditions, out, shard_size=8, progress=False)
    shard = sorted(p for p in out.iterdir() if ".tfrecord-" in p.name)[1]
    shard.unlink()  # killed while writing shard 1
    killed = [out / f".{shard.name}.tmp-4242-0123456789ab", out / ".shard-counts" / ".shard-00001.json.tmp-4242-ab"]
    in_flight = [out / ".dataset_info.json.tmp-77-0a1b2c", out / f".{RUN_FILE}.tmp-77-0a1b2c",
                 out / ".shard-counts" / ".notes.json.tmp-77-0a1b2c"]
    for path in [*killed, *in_flight]:
        path.write_bytes(b"half")
    # The folder listings from the cleanup's start (after every host's shards are written) to the gathering of
    # their counts: the cleanup's.
    scans, window = [], {"open": False}
    for name in ("listdir", "scandir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path=".", real=real: (window["open"] and scans.append(path)) or real(path))
    remove, gather = corpus.remove_temporaries_in, corpus._gather_counts
    monkeypatch.setattr(corpus, "remove_temporaries_in", lambda *a: window.update(open=True) or remove(*a))
    monkeypatch.setattr(corpus, "_gather_counts", lambda *a: window.update(open=False) or gather(*a))
    assert write_corpus(generator, conditions, out, shard_size=8, progress=False)["written"] == 1
    monkeypatch.undo()
    assert shard.exists() and not [p for p in killed if p.exists()]
    assert all(p.exists() for p in in_flight)
    assert sorted(str(path) for path in scans if not isinstance(path, int)) == [str(out), str(out / ".shard-counts")]


def test_two_runs_of_one_corpus_command_write_the_same_bytes(model_dir, openai_env, tmp_path):
    """The shards of two runs of the same command differed byte for byte (protobuf writes an Example's feature map
    in an order that changes from process to process), so a resumed corpus was not the uninterrupted one either.
    Also: a shard size rounded up to whole batches is said, once, on stderr (it silently became the batch size)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shards = []
    for run in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "diffusets_jax", "sample", "--model-dir", str(model_dir), *SAMPLE,
                               "--batch-size", "2", "-n", "3", "--corpus", "--shard-size", "1",
                               "--out", str(tmp_path / run)], capture_output=True, text=True, cwd=repo, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # (the batch size itself is rounded up to a multiple of the test's CPU devices)
        assert re.search(r"note: --shard-size 1 is rounded up to (\d+), a whole number of batches of \1 "
                         r"\(--batch-size\)", proc.stderr), proc.stderr[-3000:]
        shards.append({p.name: p.read_bytes() for p in (tmp_path / run).iterdir() if ".tfrecord-" in p.name})
    assert shards[0] and shards[0] == shards[1]


def test_a_batch_size_rounded_up_to_the_devices_is_said(model_dir, openai_env, tmp_path, capsys):
    """--batch-size 1 on the suite's 8 CPU devices runs (and fingerprints) batches of 8 silently: a rerun of the same
    command on a host with another device count was refused as "batch_size: 1 -> 8", a value never given."""
    import jax

    devices = jax.local_device_count()
    assert main(["sample", "--model-dir", str(model_dir), "--out", str(tmp_path / "out"), *SAMPLE[:-2],
                 "--batch-size", "1", "-n", "1", "--formats", "npz"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "rounded up" in line]
    if devices == 1:
        assert notes == []
    else:
        assert notes == [f"diffusets-jax sample: note: batches of 1 ECGs are rounded up to {devices}, a multiple of "
                         f"this host's {devices} devices: the ECGs (and the run's fingerprint) are those of "
                         f"--batch-size {devices}"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["batch_size"] == devices


class StubGenerator:
    """What `_finish` asks of a generator: the prompt style, prompts, and a reference task or none."""

    def __init__(self, reference=None):
        import types

        self.conditioning = types.SimpleNamespace(prompt_style="ordered")
        self.reference = reference

    def prompt(self, condition):
        return condition.prompt("ordered")


def write_parts(out, parts):
    """Write `.parts/batch-NNNNNN.npz` as `sample_to_directory` does, from {file number: positions}; each ECG holds
    its position (so the merged order is visible) plus a ramp; a position below 0 is stored NaN-spoiled as `-p`."""
    (out / ".parts").mkdir(parents=True)
    for number, positions in parts.items():
        ecg = np.stack([np.full((1024, 12), abs(p), np.float32) + np.linspace(0, 1, 12, dtype=np.float32)
                        for p in positions])
        for row, p in enumerate(positions):
            if p < 0:
                ecg[row, 5, 2] = np.nan
        np.savez_compressed(out / ".parts" / f"batch-{number:06d}.npz", ecg=ecg,
                            position=np.array([abs(p) for p in positions]), code=np.array('{"v": 1}'),
                            skipped_name=np.array([], dtype=str), skipped_why=np.array([], dtype=str))


def merged_as_before(out, items, generator):
    """`samples.npz`'s arrays as `_finish` made them before it streamed the ECGs: every part in memory at once."""
    loaded = []
    for part in sorted((out / ".parts").glob("batch-*.npz")):
        with np.load(part) as data:
            loaded.append(dict(data))
    positions = np.concatenate([d["position"] for d in loaded])
    ecg = np.concatenate([d["ecg"] for d in loaded])
    failed = {int(p) for p, e in zip(positions, ecg, strict=True) if not np.isfinite(e).all()}
    order = np.array([i for i in np.argsort(positions) if int(positions[i]) not in failed], np.int64)
    chosen = [items[int(p)] for p in positions[order]]
    reference = generator.reference
    return {"ecg": ecg[order], "position": positions[order],
            **({} if reference is None else {"reference": reference.reference.ecg, "observed": reference.observed_mask()}),
            "prompt": np.array([generator.prompt(c) for c in chosen], dtype=str),
            "report": np.array(["|".join(c.report) for c in chosen], dtype=str),
            "sex": np.array([c.sex for c in chosen], np.int32), "age": np.array([c.age for c in chosen], np.float32),
            "heart_rate": np.array([c.heart_rate for c in chosen], np.float32)}


def finish(out, parts, generator, count):
    from diffusets_jax.conditioning.requests import expand
    from diffusets_jax.io.outputs import _finish

    items = expand([make_condition("Sinus rhythm", "F", 40, 60, count // 2),
                    make_condition("Atrial fibrillation|Abnormal ECG", "M", 71, 95, count - count // 2)])
    write_parts(out, parts)
    expected = merged_as_before(out, items, generator)
    manifest = _finish(out, generator, items, len(parts), ["npz"], {})
    return expected, manifest


@pytest.mark.parametrize("with_reference", [False, True], ids=["plain", "reference"])
@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_the_streamed_merge_writes_what_the_whole_set_in_memory_did(tmp_path, with_reference, layout):
    """`_finish` streams the parts into `samples.npz` one part at a time: the arrays must be what concatenating every
    part in memory gave (keys in order, dtypes, shapes, values), the failed ECG left out, whatever order the part
    files list in (batch-1000000 sorts before batch-200000) and even if parts interleave positions."""
    import types

    reference = None
    if with_reference:
        ecg = np.random.default_rng(0).normal(size=(1024, 12)).astype(np.float32)
        mask = np.zeros((1024, 12), bool)
        mask[:, :2] = True
        reference = types.SimpleNamespace(reference=types.SimpleNamespace(ecg=ecg), observed_mask=lambda: mask,
                                          describe=lambda: {"task": "stub"})
    if layout == "blocks":  # whole batches, the file names out of position order, one NaN ECG (position 9)
        parts = {1000000: [12, 13, 14, 15], 200000: [0, 1, 2, 3], 3: [8, -9, 10, 11], 0: [4, 5, 6, 7], 7: [16, 17]}
    else:  # positions interleave across parts and are unsorted within one
        parts = {0: [0, 3, 6, 9], 1: [1, 4, -7, 10], 2: [11, 8, 5, 2]}
    count = sum(len(p) for p in parts.values())
    out = tmp_path / "out"
    expected, manifest = finish(out, parts, StubGenerator(reference), count)
    failed = "sample_00009" if layout == "blocks" else "sample_00007"
    assert manifest["skipped"] == {failed: "the ECG has 1 non-finite samples (NaN/inf)"}
    assert manifest["written"] == count - 1  # the parts stay until the run is recorded complete (sample_to_directory)
    with np.load(out / "samples.npz") as data:
        assert data.files == list(expected)
        for key, value in expected.items():
            assert data[key].dtype == value.dtype and data[key].shape == value.shape, key
            np.testing.assert_array_equal(data[key], value, err_msg=key)
    assert expected["position"].tolist() == [p for p in range(count) if f"sample_{p:05d}" != failed]


def test_the_merge_holds_one_part_of_ecgs_in_memory_not_the_whole_set(tmp_path):
    """The merge concatenated every part's ECGs (about 48 KB each) in memory, and copied them once more in position
    order, so a large request could not be merged long before `MAX_ECGS`: its peak must stay near one part's."""
    import tracemalloc

    from diffusets_jax.conditioning.requests import expand
    from diffusets_jax.io.outputs import _finish

    parts = {b: list(range(32 * b, 32 * b + 32)) for b in range(24)}
    total_bytes = 24 * 32 * 1024 * 12 * 4  # 37.7 MB of ECGs, 1.6 MB a part
    out = tmp_path / "out"
    write_parts(out, parts)
    items = expand([make_condition("Sinus rhythm", "F", 40, 60, 24 * 32)])
    tracemalloc.start()
    try:
        _finish(out, StubGenerator(), items, len(parts), ["npz"], {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total_bytes / 4, f"peak {peak / 1e6:.1f} MB merging {total_bytes / 1e6:.1f} MB of ECGs"
    with np.load(out / "samples.npz") as data:
        assert data["position"].tolist() == list(range(24 * 32))


def test_a_streamed_npz_member_is_written_byte_for_byte_as_numpy_writes_the_whole_array(tmp_path):
    """`_save_npz` is numpy's `savez` with members that may arrive in blocks: the same bytes (so two identical runs
    still write identical files, and any NPZ reader reads it), whatever the block sizes."""
    from diffusets_jax.io.outputs import StreamedArray, _save_npz

    ecg = np.random.default_rng(1).normal(size=(50, 1024, 12)).astype(np.float32)
    others = {"position": np.arange(50), "prompt": np.array(["a", "bcd"] * 25), "sex": np.zeros(50, np.int32)}
    np.savez(tmp_path / "numpy.npz", ecg=ecg, **others)
    _save_npz(tmp_path / "whole.npz", ecg=ecg, **others)
    _save_npz(tmp_path / "streamed.npz", ecg=StreamedArray(np.dtype(np.float32), ecg.shape,
                                                          (ecg[i : i + 7] for i in range(0, 50, 7))), **others)
    expected = (tmp_path / "numpy.npz").read_bytes()
    assert (tmp_path / "whole.npz").read_bytes() == expected and (tmp_path / "streamed.npz").read_bytes() == expected
    with pytest.raises(ValueError, match="49 rows streamed"):  # a short stream is never renamed into place
        _save_npz(tmp_path / "short.npz", ecg=StreamedArray(np.dtype(np.float32), ecg.shape, iter([ecg[:49]])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["numpy.npz", "streamed.npz", "whole.npz"]


def test_a_runs_npzs_are_stored_not_deflated(generator, tmp_path, monkeypatch):
    """Deflating float32 ECGs saved 7.5 % of the bytes for 1.6 ms of the host's time per ECG, in the parts (read
    once, by the merge, then removed) and again in the merge, which runs alone after sampling. Parts and the merged
    `samples.npz` are `np.savez`'s bytes; an older run's deflated parts still merge (`as_if_written_by_old_code`
    writes such parts)."""
    from pathlib import Path

    from diffusets_jax.io import outputs

    parts = []
    save_npz = outputs._save_npz
    monkeypatch.setattr(outputs, "_save_npz", lambda path, **arrays: parts.append((path, arrays)) or save_npz(
        path, **arrays))
    kept = {}
    remove = outputs.shutil.rmtree
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda path, **kw: kept.update(  # the merge removes the parts
        {p.name: p.read_bytes() for p in Path(path).glob("batch-*.npz")}) or remove(path, **kw))
    sample_to_directory(generator, [make_condition("Sinus rhythm", "F", 40, 60, 9)], tmp_path / "run",
                        formats=["npz"], progress=False)
    *batch_parts, (merged_path, _) = parts
    assert len(batch_parts) == 2 and sorted(kept) == sorted(path.name for path, _ in batch_parts)
    for path, arrays in batch_parts:
        np.savez(tmp_path / "numpy.npz", **arrays)
        assert kept[path.name] == (tmp_path / "numpy.npz").read_bytes()
    assert merged_path == tmp_path / "run" / "samples.npz"
    with np.load(merged_path) as merged:
        np.savez(tmp_path / "numpy.npz", **{key: merged[key] for key in merged.files})
    assert merged_path.read_bytes() == (tmp_path / "numpy.npz").read_bytes()


def test_pngs_drawn_by_worker_processes_are_the_sheets_a_run_draws_itself(generator, tmp_path, monkeypatch):
    """Runs of many PNGs draw them in worker processes (`worker_processes`) while the next batch is generated: the
    same files as a run that draws them itself, and a batch's part (which a resumed run takes as the batch done) is
    saved only once its PNGs are on disk."""
    from diffusets_jax.io import outputs, plot_workers

    conditions = [make_condition("Sinus rhythm", "F", 40, 60, 17)]  # three batches of 8
    sample_to_directory(generator, conditions, tmp_path / "here", formats=["npz", "png"], progress=False)
    save_npz = outputs._save_npz
    drawn_before_saving = []

    def check_sheets_then_save(path, **arrays):
        if path.parent.name == ".parts":
            names = [f"sample_{position:05d}.png" for position in arrays["position"]]
            drawn_before_saving.append(all((tmp_path / "pool" / "plots" / name).exists() for name in names))
        save_npz(path, **arrays)

    monkeypatch.setattr(outputs, "_save_npz", check_sheets_then_save)
    monkeypatch.setattr(plot_workers, "worker_count", lambda sheets: 2)
    sample_to_directory(generator, conditions, tmp_path / "pool", formats=["npz", "png"], progress=False)
    assert drawn_before_saving == [True, True, True]
    pngs = sorted(p.name for p in (tmp_path / "here" / "plots").iterdir())
    assert len(pngs) == 17 and sorted(p.name for p in (tmp_path / "pool" / "plots").iterdir()) == pngs
    for name in pngs:
        assert (tmp_path / "pool" / "plots" / name).read_bytes() == (tmp_path / "here" / "plots" / name).read_bytes()
    assert (tmp_path / "pool" / "samples.npz").read_bytes() == (tmp_path / "here" / "samples.npz").read_bytes()


def test_a_reference_sheet_leaves_the_leads_the_recording_lacks_blank(tmp_path):
    """The PNG beside each result drew the reference's absent leads as flat 0 mV traces, which read as recorded flat
    leads; they are handed to the drawing as NaN (gaps)."""
    import types

    from diffusets_jax.io.outputs import _write_batch_records
    from diffusets_jax.io.reference import reference_from_array
    from diffusets_jax.posterior_pipeline import reference_task

    t = np.arange(2500) / 250.0
    recording = reference_from_array(np.stack([0.3 * np.sin(2 * np.pi * 1.2 * t + i) for i in range(2)], axis=1),
                                     250.0, ["II", "I"], source="watch")
    drawn = []

    class Plots:  # stands in for the worker processes: records what each sheet is drawn from
        def run_for_effect(self, fn, *args, **kwargs):
            drawn.append(args)
            return None

    batch = types.SimpleNamespace(start=0, conditions=[make_condition("Sinus rhythm", "F", 50, 70)],
                                  prompts=["Sinus rhythm"], ecgs=np.zeros((1, 1024, 12), np.float32))
    _write_batch_records(tmp_path, batch, ["png"], None, {}, {}, Plots(), reference_task(recording, observe="I"))
    (reference_sheet, result), = drawn
    assert np.isnan(reference_sheet[:, 2:]).all() and np.array_equal(reference_sheet[:, :2], recording.ecg[:, :2])
    assert np.array_equal(result, batch.ecgs[0])
