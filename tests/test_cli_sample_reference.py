"""`sample --reference`: posterior reconstruction, SDEdit editing and digital twins from a WFDB record, end to end
on the tiny model directory, and the one-line refusals of bad requests before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import wfdb

from diffusets_jax.cli import main
from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.io.reference import read_reference
from diffusets_jax.pipeline import ECGGenerator

CONDITION = ["--text", "Atrial fibrillation|Abnormal ECG", "--sex", "M", "--age", "71", "--hr", "95",
             "--batch-size", "8"]


def _write_record(directory, name, seconds=10.0, fs=500.0, leads=STANDARD_LEADS):
    """A made-up record: one sinusoidal 'beat' train per lead, different amplitude and phase in each."""
    t = np.arange(int(round(seconds * fs))) / fs
    signal = np.stack([(0.2 + 0.05 * i) * np.sin(2 * np.pi * 1.1 * t + 0.4 * i) for i in range(len(leads))], axis=1)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=signal,
                fmt=["16"] * len(leads), adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads),
                write_dir=str(directory))
    return directory / name


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return _write_record(tmp_path_factory.mktemp("records"), "patient01")


def _run(model_dir, out, record, *extra):
    return main(["sample", "--model-dir", str(model_dir), "--out", str(out), "--reference", str(record), *CONDITION,
                 *extra])


@pytest.mark.slow
def test_reconstruction_from_two_leads_writes_sample_outputs_with_the_reference(model_dir, openai_env, record, tmp_path):
    out = tmp_path / "out"
    assert _run(model_dir, out, record, "--observe", "I,II", "--steps", "3", "--particles", "2", "-n", "2") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reference = read_reference(record)
    assert manifest["count"] == 2 and manifest["reference"]["mode"] == "posterior"
    assert manifest["reference"]["observed_leads"] == ["I", "II"] and manifest["reference"]["particles"] == 2
    assert manifest["settings"]["sampler"]["sampler"] == "ddpm" and manifest["settings"]["sampler"]["steps"] == 3
    with np.load(out / "samples.npz") as data:
        assert data["ecg"].shape == (2, 1024, 12) and np.isfinite(data["ecg"]).all()
        np.testing.assert_array_equal(data["reference"], reference.ecg)
        expected_mask = np.zeros((1024, 12), bool)
        expected_mask[:, [0, 1]] = True
        np.testing.assert_array_equal(data["observed"], expected_mask)
        assert not np.allclose(data["ecg"][0], data["ecg"][1])  # two posterior draws, not one copied
    assert (out / manifest["samples"][1]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert wfdb.rdrecord(str(out / manifest["samples"][0]["wfdb"])).sig_name == list(STANDARD_LEADS)


@pytest.mark.slow
def test_edit_at_strength_zero_is_the_vae_reconstruction_of_the_record(model_dir, openai_env, record, tmp_path):
    out = tmp_path / "out"
    assert _run(model_dir, out, record, "--edit-strength", "0", "--formats", "npz,png") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference"]["mode"] == "edit" and manifest["reference"]["edit_strength"] == 0.0
    with np.load(out / "samples.npz") as data:
        edited = data["ecg"][0]
        assert not data["observed"].any()  # an edit observes nothing
    # Independently: the pipeline's decoder(encoder(x)) of the same recording.
    expected = ECGGenerator(model_dir, batch_size=8).reconstruct(read_reference(record).ecg[None])[0]
    np.testing.assert_allclose(edited, expected, atol=1e-4)


@pytest.mark.slow
def test_twins_differ_from_each_other_and_record_their_settings(model_dir, openai_env, record, tmp_path):
    out = tmp_path / "out"
    assert _run(model_dir, out, record, "--observe", "all", "--noise-std", "0.2", "--edit-strength", "0.5",
                "--observe-window", "0,5", "--drift", "--steps", "4", "--particles", "2", "-n", "3",
                "--formats", "npz") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    task = manifest["reference"]
    assert task["mode"] == "twin" and task["observed_leads"] == list(STANDARD_LEADS)
    assert task["observed_window_s"] == [0.0, 5.0] and task["noise_std_mv"] == 0.2 and task["drift"] is True
    with np.load(out / "samples.npz") as data:
        twins = data["ecg"]
        assert twins.shape == (3, 1024, 12) and np.isfinite(twins).all()
        assert data["observed"][:512].all() and not data["observed"][512:].any()  # 0-5 s of 10 s at 102.4 Hz
    assert min(np.abs(twins[i] - twins[j]).max() for i in range(3) for j in range(i + 1, 3)) > 1e-4


@pytest.fixture(scope="module")
def bad_records(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad")
    records = {"slow": _write_record(directory, "slow", fs=50.0), "short": _write_record(directory, "short", seconds=5.0),
               "two": _write_record(directory, "two", fs=250.0, leads=("II", "I")), "good": _write_record(directory, "good"),
               "truncated": _write_record(directory, "truncated"),
               "long": _write_record(directory, "long", seconds=30.0)}
    dat = records["truncated"].with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:1000])  # a download cut short
    return records


@pytest.mark.parametrize("which,extra,match", [
    ("good", ["--observe", "I,XX"], "--observe: "),
    ("good", ["--observe", "I", "--edit-strength", "1.5"], "--edit-strength must be in [0, 1]"),
    ("good", ["--edit-strength", "-0.1"], "--edit-strength must be in [0, 1]"),
    ("good", ["--observe", "I", "--noise-std", "0"], "--noise-std must be > 0"),
    ("good", ["--observe", "I", "--observe-window", "6,3"], "--observe-window: need 0 <= start < end"),
    ("good", ["--observe", "I", "--observe-window", "abc"], "give START,END in seconds"),
    ("good", ["--noise-std", "0.1", "--edit-strength", "0.3"], "--noise-std refines an observation"),
    ("good", ["--particles", "4", "--edit-strength", "0.3"], "--particles sets the posterior sampler"),
    ("good", [], "--reference needs --observe"),
    ("good", ["--observe", "I", "--sampler", "dpmpp_2m"], "run ddpm or ddim"),
    ("good", ["--observe", "I", "--sampler", "ddim"], "stochastic chain"),
    ("good", ["--observe", "I", "--corpus"], "not a --corpus"),
    ("good", ["--observe", "I", "--reference-start", "3"], "--reference-start=3 leaves less than 10 s"),
    ("long", ["--observe", "I"], "last 30.00 s; the model needs a 10 s recording (pass --reference-start to take"),
    ("slow", ["--observe", "I"], "below 100 Hz"),
    ("short", ["--observe", "I"], "last 5.00 s"),
    ("two", ["--observe", "V1"], "not in the reference"),
    ("two", ["--edit-strength", "0.5"], "encodes the whole recording"),
    ("missing", ["--observe", "I"], "no WFDB header"),
    ("truncated", ["--observe", "I"], "--reference: "),
    ("truncated", ["--observe", "I"], "truncated.dat has 1000 bytes, header implies"),
    ("slow", ["--observe", "I"], "--reference: "),
    (None, ["--observe", "I"], "--observe works on a recording: add --reference"),
])
def test_bad_reference_requests_fail_in_one_line_before_the_model_loads(bad_records, tmp_path, capsys, which,
                                                                        extra, match):
    out = tmp_path / "out"
    # No model directory exists: the request is refused before anything tries to load one.
    args = ["sample", "--model-dir", str(tmp_path / "no-model"), "--out", str(out), *CONDITION, *extra]
    if which is not None:
        args += ["--reference", str(bad_records.get(which, tmp_path / "missing"))]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "model directory" not in err and not out.exists()


def test_a_task_records_its_recording_by_content(tmp_path):
    """The run fingerprint named the recording by path only: another recording saved under the same name and the
    same command resumed the old run's batches beside the new recording's."""
    from diffusets_jax.posterior_pipeline import reference_task

    record = _write_record(tmp_path, "patient01")
    first = reference_task(record, observe="I").describe()
    wfdb.wrsamp("patient01", fs=500.0, units=["mV"] * 12, sig_name=list(STANDARD_LEADS),
                p_signal=0.5 * np.sin(np.linspace(0, 80, 5000))[:, None] * np.ones((1, 12)), fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path))
    second = reference_task(record, observe="I").describe()
    assert first["record"] == second["record"] and first["record_content"] != second["record_content"]
    assert reference_task(record, observe="I").describe() == second  # the same recording, the same settings


def test_observing_a_lead_the_record_has_but_cannot_use_says_why():
    """A flat or gapped lead is in the recording: "--observe: lead(s) II not in the reference" sent the user looking
    for a misspelt or absent lead. The refusal now names the lead and why it is left out."""
    from diffusets_jax.io.reference import reference_from_array
    from diffusets_jax.posterior_pipeline import reference_task

    t = np.arange(5000) / 500.0
    signal = np.stack([0.3 * np.sin(2 * np.pi * 1.2 * t + i) for i in range(3)], axis=1)
    signal[:, 1] = 0.0  # a disconnected electrode
    signal[:, 2] = np.nan  # a lead with no sample
    reference = reference_from_array(signal, 500.0, ["I", "II", "V1"], source="rec")
    for lead, why in (("II", "flat"), ("V1", "missing samples")):
        with pytest.raises(ValueError, match=rf"^--observe: rec has {lead} \({why}\), which cannot be observed; "
                                             r"observe its usable leads \(I\) instead$"):
            reference_task(reference, observe=f"I,{lead}")
    with pytest.raises(ValueError, match=r"^--observe: lead\(s\) V2 not in the reference, which has I$"):
        reference_task(reference, observe="V2")  # a lead the record lacks is still named so
    assert reference_task(reference, observe="all").observe == ("I",)


def test_a_task_records_which_ten_seconds_of_a_longer_record_it_used(tmp_path):
    """The manifest named a longer record but not --reference-start, so which 10 s a run was made from could not be
    told from it. The start is recorded when one is given; a whole 10 s record's task is described as before."""
    from diffusets_jax.posterior_pipeline import reference_task

    long = _write_record(tmp_path, "long", seconds=30.0)
    first, later = (reference_task(long, observe="I", start_s=s).describe() for s in (0.0, 12.5))
    assert first["start_s"] == 0.0 and later["start_s"] == 12.5
    assert "start_s" not in reference_task(_write_record(tmp_path, "short"), observe="I").describe()


def test_an_edit_records_the_first_order_last_step_its_chain_runs(model_dir, record):
    """The posterior and editing chain ends with x0 of its last timestep (first order), but an edit's DDIM recorded
    DDIM's default second-order final step in its settings (manifest, fingerprint): a step that never ran."""
    from diffusets_jax.diffusion.posterior import PosteriorConfig
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.posterior_pipeline import ReferenceGenerator, reference_task

    ddim = sampler_config("ddim", steps=4)
    assert ddim.final_step_order == 2  # what `sample` runs without a recording
    assert PosteriorConfig(sampler=sampler_config("ddim", steps=4, eta=1.0)).sampler.final_step_order == 1
    for sampler in (ddim, None):  # the user's DDIM, and the edit's default chain
        generator = ReferenceGenerator(model_dir, reference_task(record, strength=0.5), sampler, batch_size=1)
        assert generator.settings()["sampler"]["sampler"] == "ddim"
        assert generator.settings()["sampler"]["final_step_order"] == 1


def test_a_dropout_is_left_unobserved_sample_by_sample():
    """One missing sample made `--observe` refuse its lead ("missing samples, which cannot be observed"). The lead is
    observed now except at the gap: the task's mask and the sampler's observation both leave exactly those samples
    out, the manifest counts them, and an edit, which would encode the bridged gap as recorded, is still refused."""
    from diffusets_jax.diffusion.observations import make_observation
    from diffusets_jax.io.reference import reference_from_array
    from diffusets_jax.posterior_pipeline import reference_task

    t = np.arange(5000) / 500.0
    signal = np.stack([0.3 * np.sin(2 * np.pi * 1.2 * t + i) for i in range(3)], axis=1)
    signal[2500:2510, 2] = np.nan  # 20 ms missing at 5 s
    reference = reference_from_array(signal, 500.0, ["I", "II", "V1"], source="rec")
    task = reference_task(reference, observe="I,V1")
    assert task.observe == ("I", "V1")
    v1 = STANDARD_LEADS.index("V1")
    mask = task.observed_mask()
    assert mask[:, 0].all() and not mask[reference.missing[:, v1], v1].any()
    assert mask[:, v1].sum() == 1024 - reference.missing[:, v1].sum() > 1000
    observation = make_observation(reference.ecg[None], noise_std=0.05, leads=list(task.observe),
                                   available_leads=reference.leads, mask=~reference.missing[None])
    np.testing.assert_array_equal(np.asarray(observation.mask[0]) > 0, mask)
    assert task.describe()["missing_samples"] == {"V1": int(reference.missing[:, v1].sum())}
    with pytest.raises(ValueError, match=r"^--edit-strength encodes the whole recording, but rec lacks .*samples of V1 "
                                         r"\(missing samples\)"):
        reference_task(reference, observe="I", strength=0.5)
