"""The paper's three-level evaluation of generated ECGs against real ones from the same conditions.

- Signal level: heart-rate MAE (condition vs XQRS on the generated ECG, failures counted) and per-lead
  amplitude statistics of real vs generated signals.
- Feature level: FID, rFID, manifold precision / recall / F1 (k = 3) on CLIP ECG-tower features.
- Diagnostic level: CLIP score (generated ECG vs its text condition), beside the same score of the real ECGs.

`evaluate` writes `report.json`, `report.md`, the heart-rate scatter and real/generated example pairs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffusets_jax import parallel
from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.io.files import write_json_atomic, write_text_atomic
from diffusets_jax.metrics.clip_score import clip_score
from diffusets_jax.metrics.features import clip_ecg_features, clip_text_features
from diffusets_jax.metrics.fid import fid, rfid
from diffusets_jax.metrics.heart_rate_mae import measure_heart_rates
from diffusets_jax.metrics.precision_recall import precision_recall


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def measure_records(real: np.ndarray, generated: np.ndarray, text_embeddings: np.ndarray,
                    clip: tuple[Any, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-record measurements of pairs `real[i]`, `generated[i]` `(n, 1024, 12)` mV: everything the report needs,
    so hosts can each measure their own records and the report is built from the gathered rows.

    Returns `(n, ...)` arrays: `real_features`, `generated_features` (CLIP ECG tower), `text_features`,
    `hr_generated`, `hr_real` (bpm, NaN where unmeasurable), `lead_std_real`, `lead_std_generated` `(n, 12)`,
    `abs_amplitude_real`, `abs_amplitude_generated` (mean |mV|).
    """
    real = np.asarray(real, np.float32)
    generated = np.asarray(generated, np.float32)
    if real.shape != generated.shape or real.ndim != 3:
        raise ValueError(f"evaluate: real {real.shape} and generated {generated.shape} must both be (n, 1024, 12)")
    module, variables = clip
    return {
        "real_features": clip_ecg_features(module, variables, real),
        "generated_features": clip_ecg_features(module, variables, generated),
        "text_features": clip_text_features(module, variables, np.asarray(text_embeddings, np.float32)),
        "hr_generated": measure_heart_rates(generated)[0],
        "hr_real": measure_heart_rates(real)[0],
        "lead_std_real": real.std(axis=1), "lead_std_generated": generated.std(axis=1),
        "abs_amplitude_real": np.abs(real).mean(axis=(1, 2)), "abs_amplitude_generated": np.abs(generated).mean(axis=(1, 2)),
    }


def _mae(measured: np.ndarray, condition: np.ndarray) -> tuple[float | None, int, int]:
    ok = np.isfinite(measured)
    mae = float(np.mean(np.abs(measured[ok] - condition[ok]))) if ok.any() else None
    return mae, int(ok.sum()), int((~ok).sum())


def summarize(measures: Mapping[str, np.ndarray], heart_rates: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """The three levels from per-record measurements (`measure_records`, possibly gathered from several hosts)."""
    heart_rates = np.asarray(heart_rates, np.float64)
    n = len(heart_rates)
    hr_mae, measured, failed = _mae(measures["hr_generated"], heart_rates)
    real_mae, _, _ = _mae(measures["hr_real"], heart_rates)
    real_std, gen_std = measures["lead_std_real"].mean(axis=0), measures["lead_std_generated"].mean(axis=0)
    signal = {
        "heart_rate_mae_bpm": hr_mae, "heart_rate_measured": measured, "heart_rate_failed": failed,
        "heart_rate_mae_real_bpm": real_mae,
        "lead_std_mv": {lead: {"real": float(r), "generated": float(g)}
                        for lead, r, g in zip(STANDARD_LEADS, real_std, gen_std, strict=True)},
        "mean_abs_amplitude_mv": {"real": float(measures["abs_amplitude_real"].mean()),
                                  "generated": float(measures["abs_amplitude_generated"].mean())},
    }
    real_features, gen_features = measures["real_features"], measures["generated_features"]
    features: dict[str, Any] = {"n_real": n, "n_generated": n, "fid": fid(real_features, gen_features)}
    if n >= 4:
        relative = rfid(real_features, gen_features, key=jax.random.PRNGKey(seed))
        features.update(rfid=_finite_or_none(relative.value), real_vs_real_fid=relative.real_vs_real_fid)
    if n > 3:
        pr = precision_recall(real_features, gen_features)
        features.update(precision=pr.precision, recall=pr.recall, f1=pr.f1, k=pr.k)
    diagnostic = {
        "clip_score_generated": clip_score(gen_features, measures["text_features"]).mean,
        "clip_score_real": clip_score(real_features, measures["text_features"]).mean,
    }
    return {"signal_level": signal, "feature_level": features, "diagnostic_level": diagnostic}


def write_report(summary: dict[str, Any], measures: Mapping[str, np.ndarray], heart_rates: np.ndarray,
                 examples: Sequence[tuple[np.ndarray, np.ndarray, dict[str, Any]]], out_dir: str | os.PathLike,
                 settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Figures (heart-rate scatter, real/generated pairs from `examples`) and report.json / report.md in `out_dir`."""
    from diffusets_jax.io.plot import plot_heart_rate_scatter, plot_pair

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"heart_rate_scatter": "heart_rate_scatter.png", "pairs": []}
    plot_heart_rate_scatter(np.asarray(heart_rates, np.float64), measures["hr_generated"],
                            path=out / figures["heart_rate_scatter"])
    for i, (real, generated, conditions) in enumerate(examples):
        name = f"pair_{i:02d}.png"
        plot_pair(real, generated, conditions=conditions, path=out / name)
        figures["pairs"].append(name)
    report = {"settings": dict(settings or {}), **summary, "figures": figures}
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report))
    return report


def _example_conditions(prompt: str, heart_rate: float, sex: int | None, age: float | None) -> dict[str, Any]:
    conditions: dict[str, Any] = {"prompt": prompt, "heart_rate": float(heart_rate)}
    if sex is not None:
        conditions["sex"] = "M" if sex else "F"
    if age is not None:
        conditions["age"] = float(age)
    return conditions


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
    measures = measure_records(real_ecgs, generated_ecgs, text_embeddings, clip)
    examples = [(np.asarray(real_ecgs[i]), np.asarray(generated_ecgs[i]), _example_conditions(
        prompts[i], heart_rates[i], None if sexes is None else sexes[i], None if ages is None else ages[i]))
        for i in range(min(n_examples, len(real_ecgs)))]
    return write_report(summarize(measures, heart_rates, seed=seed), measures, heart_rates, examples, out_dir,
                        settings)


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


def load_clip(model_dir: str | os.PathLike | None, clip_dir: str | os.PathLike | None) -> tuple[Any, Any]:
    """The feature extractor: `clip_dir`'s CLIP when given, else the model directory's own `clip` component."""
    from diffusets_jax.models import model_dir as model_dirs

    source = clip_dir if clip_dir is not None else model_dir
    flag = "--clip" if clip_dir is not None else "--model-dir"
    if source is not None and Path(source).exists() and not Path(source).is_dir():
        raise NotADirectoryError(f"{flag} {source} is a file, not a model directory (it must hold a clip/ component)")
    if source is None or not Path(source).is_dir():
        raise FileNotFoundError(f"{flag} {source}: no such model directory (it must hold a clip/ component)")
    index = model_dirs.read_index(source)
    model_dirs.require(index, source, "clip")
    return model_dirs.load_component(source, "clip")


def evaluate_split(
    generator: Any,
    clip: tuple[Any, Any],
    dataset: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
    n_examples: int = 4,
) -> dict[str, Any]:
    """Generate one ECG per real example of `split` from its own conditions (its stored text embedding, sex,
    age and heart rate) with `generator` (a `pipeline.ECGGenerator`), then `evaluate` them against the real ECGs
    with `clip` (`(module, variables)`, see `load_clip`) as the feature extractor.

    On several hosts each process generates and measures its share of the batches; the measurements are gathered
    and process 0 writes the report (the others return only the settings).
    """
    from diffusets_jax.conditioning.requests import make_condition

    real = load_split(dataset, split, data_dir=data_dir, limit=limit)
    conditions = [make_condition(list(lines), int(sex), float(age), float(hr), where=f"{split}[{i}]")
                  for i, (lines, sex, age, hr) in enumerate(zip(real["report_lines"], real["sex"], real["age"],
                                                                 real["heart_rate"], strict=True))]
    measured: list[dict[str, np.ndarray]] = []
    examples = []
    for batch in generator.generate(conditions, progress=progress, text_embeddings=real["text_embedding"]):
        rows = slice(batch.start, batch.start + len(batch.conditions))
        measures = measure_records(real["ecg"][rows], batch.ecgs, real["text_embedding"][rows], clip)
        measured.append({"position": np.arange(rows.start, rows.stop), **measures})
        for offset in range(len(batch.conditions)):
            i = rows.start + offset
            if i < n_examples:
                examples.append((i, real["ecg"][i], batch.ecgs[offset], _example_conditions(
                    real["prompt"][i], real["heart_rate"][i], real["sex"][i], real["age"][i])))
    # Each host measured its own batches; the report is built from every host's rows, in record order.
    local = {k: np.concatenate([m[k] for m in measured]) for k in measured[0]} if measured else {}
    rows = parallel.gather_rows(local)
    order = np.argsort(rows.pop("position"))
    rows = {k: v[order] for k, v in rows.items()}
    settings = {"dataset": str(dataset), "split": split, "n": len(conditions), **generator.settings()}
    if jax.process_index() != 0:
        return {"settings": settings, "written_by": 0}
    summary = summarize(rows, real["heart_rate"], seed=generator.seed)
    examples = [e[1:] for e in sorted(examples, key=lambda e: e[0])]
    return write_report(summary, rows, real["heart_rate"], examples, out_dir, settings)
