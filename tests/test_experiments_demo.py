"""The embedded default: `diffusets-jax demo --quick` runs every stage on the bundled records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import wfdb

from diffusets_jax.cli import main
from diffusets_jax.demo import DEMO_PROMPTS, DEMO_RECORDS


def test_bundled_records_ship_with_their_attribution():
    headers = sorted(DEMO_RECORDS.glob("*.hea"))
    assert len(headers) == 40 and all(h.with_suffix(".mat").exists() for h in headers)
    assert "CC BY 4.0" in (DEMO_RECORDS / "README.md").read_text() or "Creative Commons" in (
        DEMO_RECORDS / "README.md").read_text()


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
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
    # the demo U-Net measures its latent scale (train.scale_by_std) and generation uses that scale
    from diffusets_jax.data.latents import measure_latent_scale
    from diffusets_jax.generate import GenerationMeta

    measured = measure_latent_scale(out / "latents", "train")
    meta = GenerationMeta.load(out / "model")
    assert meta.latent_scale == pytest.approx(measured)
    assert meta.clip_sample is False and meta.schedule["prediction_type"] == "v_prediction"
    assert json.loads((out / "runs" / "unet" / "config.json").read_text())["train"]["latent_scale"] == pytest.approx(
        measured)
