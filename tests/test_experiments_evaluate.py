"""The three-level evaluation report: real vs generated ECGs through a CLIP feature extractor."""

from __future__ import annotations

import json

import jax
import numpy as np
from diffusets_jax.metrics.report import evaluate

from diffusets_jax.models.clip import CLIP
from diffusets_jax.parallel import jit_run_once


def synthetic_ecgs(rng, n, rate_bpm):
    """ECG-like signals at 102.4 Hz: narrow QRS-like pulses at `rate_bpm` on every lead, plus noise."""
    t = np.arange(1024) / 102.4
    out = np.zeros((n, 1024, 12), np.float32)
    for i in range(n):
        beats = np.arange(0.3 + rng.uniform(0, 0.2), 10, 60.0 / rate_bpm[i])
        pulse = sum(np.exp(-0.5 * ((t - b) / 0.02) ** 2) for b in beats)
        out[i] = pulse[:, None] * rng.uniform(0.5, 1.5, 12)[None] + 0.02 * rng.standard_normal((1024, 12))
    return out


def test_evaluate_writes_all_three_levels(tmp_path):
    rng = np.random.default_rng(0)
    n = 12
    hr = rng.uniform(55, 110, n)
    real = synthetic_ecgs(rng, n, hr)
    generated = synthetic_ecgs(rng, n, hr)
    clip = CLIP(base_filters=8, filters=(8, 16), blocks_per_stage=(1, 1), group_width=8, text_dim=16,
                text_hidden_dim=16, embed_dim=8)
    text = rng.standard_normal((n, 16)).astype(np.float32)
    variables = jit_run_once(clip.init, jax.random.PRNGKey(0), real[:2], text[:2])
    report = evaluate(real, generated, text_embeddings=text, heart_rates=hr, prompts=[f"p{i}" for i in range(n)],
                      clip=(clip, variables), out_dir=tmp_path, n_examples=2, sexes=[1] * n, ages=[50.0] * n)
    signal, features, diagnostic = report["signal_level"], report["feature_level"], report["diagnostic_level"]
    # Generated signals have exactly the conditioned rhythm: XQRS must find it on (almost) every record.
    assert signal["heart_rate_failed"] <= 1 and signal["heart_rate_mae_bpm"] < 5
    assert features["n_real"] == n and features["fid"] >= 0 and 0 <= features["precision"] <= 1
    assert -1 <= diagnostic["clip_score_generated"] <= 1
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["feature_level"]["fid"] == features["fid"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| signal | heart-rate MAE (bpm)" in markdown and "| diagnostic | CLIP score" in markdown
    for name in ["heart_rate_scatter.png", "pair_00.png", "pair_01.png"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
