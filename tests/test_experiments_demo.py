"""The embedded default: `diffusets-jax demo --quick` runs every stage on the bundled records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import wfdb

from diffusets_jax.cli import main
from diffusets_jax.experiments.demo import DEMO_PROMPTS, DEMO_RECORDS


def test_bundled_records_ship_with_their_attribution():
    headers = sorted(DEMO_RECORDS.glob("*.hea"))
    assert len(headers) == 40 and all(h.with_suffix(".mat").exists() for h in headers)
    assert "CC BY 4.0" in (DEMO_RECORDS / "README.md").read_text() or "Creative Commons" in (
        DEMO_RECORDS / "README.md").read_text()


def _demo_quick(out, cwd) -> str:
    """`diffusets-jax demo --quick --out OUT` as a user runs it: a process of its own on this machine's one CPU
    device, not the suite's 8 simulated ones (under those the same run took 166 s instead of 89 s alone; the
    sharded training and sampling paths have tests of their own). Its programs still go through the session's
    compilation cache (tests/conftest.py). Returns what it printed."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "diffusets_jax", "demo", "--quick", "--out", str(out)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo_out"
    printed = _demo_quick(out, tmp_path)
    assert "evaluation report" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"]["written"] + sum(summary["records"]["skipped"].values()) == 40
    assert summary["records"]["written"] >= 38
    assert [s["stage"].split()[0].rstrip(":") for s in summary["stages"]] == [
        "prepare", "train", "encode", "train", "train", "sample", "evaluate"]
    manifest = json.loads((out / "samples" / "manifest.json").read_text())
    assert manifest["count"] == len(DEMO_PROMPTS)
    assert any("hyperkalemia" in s["prompt"].lower() for s in manifest["samples"])
    record = wfdb.rdrecord(str(out / "samples" / manifest["samples"][0]["wfdb"]))
    assert record.p_signal.shape == (1024, 12) and np.isfinite(record.p_signal).all()
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert set(report) >= {"signal_level", "feature_level", "diagnostic_level"}
    assert (out / "evaluation" / "heart_rate_scatter.png").exists()
    # One model directory, written by the trainers themselves: the U-Net records the latent dataset's conditioning,
    # its measured latent scale (diffusion.scale_by_std) and the VAE it was trained on; nothing was copied.
    from diffusets_jax.data.latents import measure_latent_scale
    from diffusets_jax.models.model_dir import read_index

    measured = measure_latent_scale(out / "latents", "train")
    index = read_index(out / "model")
    assert set(index.components) == {"vae", "unet", "clip"}
    assert index.diffusion.latent_scale == pytest.approx(measured)
    assert index.diffusion.clip_sample is False and index.diffusion.schedule.prediction_type == "v_prediction"
    assert index.conditioning.embedder.kind == "local" and index.conditioning.prompt_style == "ordered"
    assert index.conditioning.patient_features == "normalised"
    assert index.components["unet"]["vae_uid"] == index.components["vae"]["uid"]
    provenance = index.components["unet"]["provenance"]
    assert provenance["dataset"]["kind"] == "latents" and provenance["run"]["step"] == 4
    assert provenance["dataset"]["derived_from"]["dataset"]["name"] == "physionet_challenge"
    assert json.loads((out / "runs" / "unet" / "config.json").read_text())["diffusion"]["latent_scale"] == pytest.approx(
        measured)
    # Rerunning the same demo finds every stage done and keeps the model directory as it is.
    uids = {name: entry["uid"] for name, entry in index.components.items()}
    _demo_quick(out, tmp_path)
    assert {name: entry["uid"] for name, entry in read_index(out / "model").components.items()} == uids


def test_demo_never_deletes_a_users_folder(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"] or \
        sorted(p.name for p in out.iterdir() if not p.name.startswith(".diffusets-run")) == ["notes.txt"]


def test_a_preempted_training_stops_the_demo_with_exit_75(tmp_path, monkeypatch, capsys):
    """A SIGTERM during one training stage must not let the next stage run on its half-trained model."""
    from types import SimpleNamespace

    from diffusets_jax.experiments import demo

    demo._finished(SimpleNamespace(preempted=False, step=1200), tmp_path / "runs" / "vae")  # a finished stage

    def preempted_demo(out, **_):
        demo._finished(SimpleNamespace(preempted=True, step=37), tmp_path / "runs" / "unet")
        raise AssertionError("the demo went on after a preempted training")

    monkeypatch.setattr(demo, "run_demo", preempted_demo)
    assert main(["demo", "--out", str(tmp_path / "out")]) == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 37" in err[0] and "runs/unet" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow  # imports every stage's modules (TFDS, Orbax, the trainers): about a minute on a busy CPU
def test_a_demo_killed_between_the_two_evaluation_reports_evaluates_again(tmp_path, monkeypatch):
    """report.json is written before report.md: a demo killed between them took its evaluation stage as done on the
    rerun, and its summary pointed at a report.md that was not there. Every stage but the evaluation's bookkeeping
    is replaced by a stand-in (the real ones have their own tests)."""
    from types import SimpleNamespace

    from diffusets_jax.data import latents, sources
    from diffusets_jax.experiments import demo, evaluate
    from diffusets_jax.io import outputs
    from diffusets_jax.train import run

    monkeypatch.setattr(sources, "prepare", lambda *a, **k: {"examples_written": 40, "skipped_by_reason": {},
                                                             "examples_per_split": {}})
    monkeypatch.setattr(sources, "make_builder", lambda *a, **k: SimpleNamespace(data_dir=str(tmp_path / "data")))
    monkeypatch.setattr(run, "run_training", lambda *a, **k: SimpleNamespace(preempted=False, step=4))
    monkeypatch.setattr(latents, "load_vae_encoder", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(latents, "encode_dataset", lambda *a, **k: None)
    monkeypatch.setattr("diffusets_jax.pipeline.ECGGenerator", lambda *a, **k: None)
    monkeypatch.setattr(outputs, "sample_to_directory", lambda *a, **k: {"count": 5})
    monkeypatch.setattr(evaluate, "load_clip", lambda *a, **k: None)
    report = {"signal_level": {"fid": 1.0}, "feature_level": {"heart_rate_mae_bpm": 2.0}, "diagnostic_level": {}}
    evaluations = []

    def killed_between_the_reports(generator, clip, dataset, split, out, **_):
        evaluations.append(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report))
        if len(evaluations) == 1:
            raise KeyboardInterrupt  # the kill, before report.md
        (out / "report.md").write_text("# report")
        return report

    monkeypatch.setattr(evaluate, "evaluate_split", killed_between_the_reports)
    out = tmp_path / "demo_out"
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True)
    summary = demo.run_demo(out, quick=True)
    assert len(evaluations) == 2 and (out / "evaluation" / "report.md").is_file()
    assert summary["evaluation"]["report"] == str((out / "evaluation" / "report.md").resolve())


def test_missing_configs_stop_the_demo_before_it_prepares_anything(tmp_path, monkeypatch, capsys):
    from diffusets_jax.experiments import demo

    monkeypatch.setattr(demo, "SHIPPED_CONFIGS", tmp_path / "configs")  # an install that lost them
    assert main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "configs" / "demo_vae.py") in err[0] and "reinstall" in err[0]
    assert not (tmp_path / "out").exists()
