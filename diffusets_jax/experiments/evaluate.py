"""The paper's three-level evaluation of generated ECGs against real ones from the same conditions.

- Signal level: heart-rate MAE (condition vs XQRS on the generated ECG, failures counted) and per-lead
  amplitude statistics of real vs generated signals.
- Feature level: FID, rFID, manifold precision / recall / F1 (k = 3) on CLIP ECG-tower features.
- Diagnostic level: CLIP score (generated ECG vs its text condition), beside the same score of the real ECGs.

`evaluate` writes `report.json`, `report.md`, the heart-rate scatter and real/generated example pairs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.metrics.clip_score import clip_score
from diffusets_jax.metrics.features import clip_ecg_features, clip_text_features
from diffusets_jax.metrics.fid import fid, rfid
from diffusets_jax.metrics.heart_rate_mae import heart_rate_mae
from diffusets_jax.metrics.precision_recall import precision_recall


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate(
    real_ecgs: np.ndarray,
    generated_ecgs: np.ndarray,
    *,
    text_embeddings: np.ndarray,
    heart_rates: np.ndarray,
    prompts: Sequence[str],
    clip: tuple[Any, Mapping[str, Any]],
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_examples: int = 4,
    settings: Mapping[str, Any] | None = None,
    sexes: Sequence[int] | None = None,
    ages: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Compare `generated_ecgs[i]` (made from the conditions of `real_ecgs[i]`), both `(n, 1024, 12)` mV.

    `text_embeddings` `(n, D)`, `heart_rates` `(n,)` bpm and `prompts` are the shared conditions; `clip` is the
    feature extractor as a `(module, variables)` pair. Returns the report dict (also written to disk).
    """
    from diffusets_jax.io.plot import plot_heart_rate_scatter, plot_pair

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    real = np.asarray(real_ecgs, np.float32)
    generated = np.asarray(generated_ecgs, np.float32)
    if real.shape != generated.shape or real.ndim != 3:
        raise ValueError(f"evaluate: real {real.shape} and generated {generated.shape} must both be (n, 1024, 12)")
    n = len(real)
    heart_rates = np.asarray(heart_rates, np.float64)

    # Signal level.
    hr = heart_rate_mae(generated, heart_rates)
    hr_real = heart_rate_mae(real, heart_rates)
    real_std, gen_std = real.std(axis=1).mean(axis=0), generated.std(axis=1).mean(axis=0)
    signal = {
        "heart_rate_mae_bpm": _finite_or_none(hr.mae),
        "heart_rate_measured": hr.n_measured,
        "heart_rate_failed": hr.n_failed,
        "heart_rate_mae_real_bpm": _finite_or_none(hr_real.mae),
        "lead_std_mv": {lead: {"real": float(r), "generated": float(g)}
                        for lead, r, g in zip(STANDARD_LEADS, real_std, gen_std, strict=True)},
        "mean_abs_amplitude_mv": {"real": float(np.abs(real).mean()), "generated": float(np.abs(generated).mean())},
    }

    # Feature level (CLIP ECG tower).
    module, variables = clip
    real_features = clip_ecg_features(module, variables, real)
    gen_features = clip_ecg_features(module, variables, generated)
    text_features = clip_text_features(module, variables, np.asarray(text_embeddings, np.float32))
    features: dict[str, Any] = {"n_real": n, "n_generated": n, "fid": fid(real_features, gen_features)}
    if n >= 4:
        relative = rfid(real_features, gen_features, key=jax.random.PRNGKey(seed))
        features.update(rfid=_finite_or_none(relative.value), real_vs_real_fid=relative.real_vs_real_fid)
    if n > 3:
        pr = precision_recall(real_features, gen_features)
        features.update(precision=pr.precision, recall=pr.recall, f1=pr.f1, k=pr.k)

    # Diagnostic level.
    diagnostic = {
        "clip_score_generated": clip_score(gen_features, text_features).mean,
        "clip_score_real": clip_score(real_features, text_features).mean,
    }

    figures = {"heart_rate_scatter": "heart_rate_scatter.png"}
    plot_heart_rate_scatter(heart_rates, hr.measured_bpm, path=out / figures["heart_rate_scatter"])
    pairs = []
    for i in range(min(n_examples, n)):
        name = f"pair_{i:02d}.png"
        conditions = {"prompt": prompts[i], "heart_rate": float(heart_rates[i])}
        if sexes is not None:
            conditions["sex"] = "M" if sexes[i] else "F"
        if ages is not None:
            conditions["age"] = float(ages[i])
        plot_pair(real[i], generated[i], conditions=conditions, path=out / name)
        pairs.append(name)
    figures["pairs"] = pairs

    report = {"settings": dict(settings or {}), "signal_level": signal, "feature_level": features,
              "diagnostic_level": diagnostic, "figures": figures}
    _write_atomic(out / "report.json", json.dumps(report, indent=2))
    _write_atomic(out / "report.md", render_markdown(report))
    return report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown page laid out like the paper's Table 1 (one row per level)."""
    s, f, d = report["signal_level"], report["feature_level"], report["diagnostic_level"]
    lines = ["# DiffuSETS evaluation", ""]
    if report.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in report["settings"].items()), ""]
    lines += [
        "| level | metric | generated | real (reference) |",
        "|---|---|---|---|",
        f"| signal | heart-rate MAE (bpm) | {_fmt(s['heart_rate_mae_bpm'])} "
        f"({s['heart_rate_failed']} of {s['heart_rate_measured'] + s['heart_rate_failed']} unmeasurable) "
        f"| {_fmt(s['heart_rate_mae_real_bpm'])} |",
        f"| signal | mean abs amplitude (mV) | {_fmt(s['mean_abs_amplitude_mv']['generated'])} "
        f"| {_fmt(s['mean_abs_amplitude_mv']['real'])} |",
        f"| feature | FID (CLIP ECG features) | {_fmt(f['fid'])} | 0 |",
        f"| feature | rFID | {_fmt(f.get('rfid'))} | 1 (real half vs half: FID {_fmt(f.get('real_vs_real_fid'))}) |",
        f"| feature | precision / recall / F1 (k = {f.get('k', 3)}) | {_fmt(f.get('precision'), 3)} / "
        f"{_fmt(f.get('recall'), 3)} / {_fmt(f.get('f1'), 3)} | 1 / 1 / 1 |",
        f"| diagnostic | CLIP score | {_fmt(d['clip_score_generated'])} | {_fmt(d['clip_score_real'])} |",
        "",
        f"{f['n_generated']} generated ECGs against {f['n_real']} real ECGs with the same conditions.",
        "",
        "## Per-lead standard deviation (mV)",
        "",
        "| lead | real | generated |",
        "|---|---|---|",
    ]
    lines += [f"| {lead} | {v['real']:.3f} | {v['generated']:.3f} |" for lead, v in s["lead_std_mv"].items()]
    lines += ["", "## Figures", "", f"![heart rate]({report['figures']['heart_rate_scatter']})", ""]
    lines += [f"![pair]({name})" for name in report["figures"]["pairs"]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_split(dataset: str | os.PathLike, split: str, *, data_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> dict[str, np.ndarray]:
    """Read a prepared split into host arrays: ecg (n, 1024, 12), text_embedding, sex, age, heart_rate,
    prompt and report_lines (`limit`: the first n examples, in the dataset's stored order)."""
    import tensorflow_datasets as tfds

    from diffusets_jax.data import pipeline

    builder = pipeline.load_builder(dataset, data_dir)
    if split not in builder.info.splits and split != "all":
        raise ValueError(f"dataset {builder.name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    ds = builder.as_dataset(split=split, shuffle_files=False)
    if limit:
        ds = ds.take(limit)
    columns: dict[str, list] = {k: [] for k in ("ecg", "text_embedding", "sex", "age", "heart_rate", "prompt",
                                                 "report_lines")}
    for example in tfds.as_numpy(ds):
        for key in columns:
            value = example[key]
            if key == "prompt":
                value = value.decode()
            elif key == "report_lines":
                value = tuple(line.decode() for line in value)
            columns[key].append(value)
    if not columns["ecg"]:
        raise ValueError(f"split {split!r} of {builder.name!r} is empty")
    return {k: (np.stack(v) if k not in ("prompt", "report_lines") else v) for k, v in columns.items()}


def evaluate_split(
    generator: Any,
    clip_dir: str | os.PathLike,
    dataset: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate one ECG per real example of `split` from its own conditions (its stored text embedding, sex,
    age and heart rate) with `generator` (a `generate.ECGGenerator`), then `evaluate` them against the real ECGs
    with the CLIP model saved in `clip_dir/clip` as the feature extractor."""
    from diffusets_jax.generate import make_condition
    from diffusets_jax.models.bundle import load_model

    real = load_split(dataset, split, data_dir=data_dir, limit=limit)
    conditions = [make_condition(list(lines), int(sex), float(age), float(hr), where=f"{split}[{i}]")
                  for i, (lines, sex, age, hr) in enumerate(zip(real["report_lines"], real["sex"], real["age"],
                                                                 real["heart_rate"], strict=True))]
    generated = np.concatenate([ecgs for _, _, ecgs in generator.generate(
        conditions, progress=progress, text_embeddings=real["text_embedding"])])
    clip = load_model(clip_dir, "clip")
    settings = {"dataset": str(dataset), "split": split, "n": len(conditions), "model_dir": str(generator.model_dir),
                "sampler": generator.sampler.sampler, "steps": generator.sampler.steps,
                "guidance_scale": generator.sampler.guidance_scale, "seed": generator.seed}
    return evaluate(real["ecg"], generated, text_embeddings=real["text_embedding"], heart_rates=real["heart_rate"],
                    prompts=real["prompt"], clip=clip, out_dir=out_dir, seed=generator.seed, settings=settings,
                    sexes=real["sex"], ages=real["age"])
