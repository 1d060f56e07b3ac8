"""Measured 12-lead reconstruction: the posterior sampler against simple baselines on held-back real records.

For each task (the observed leads: lead I alone, the six limb leads) and each held-back record of a prepared
dataset's test split, the unobserved leads are filled by
- `posterior`: posterior sampling through the VAE decoder (`diffusion.posterior`, twisted SMC), conditioned on the
  record's own report and patient data and on its observed leads (noise `noise_std`);
- `zeros`: 0 mV;
- `train_mean`: the mean training ECG, sample by sample;
- `linear`: least-squares linear regression of every lead on the observed leads (plus a constant), sample-wise,
  fitted on the train split. Because the limb leads are linear in two of them (Einthoven, Goldberger), this
  baseline is exact for limb leads observed from limb leads, and is the bar a generative model must clear.
The baselines copy the observed leads; the posterior's observed leads are its own samples (close to the record
up to `noise_std`). Scores per lead: RMSE (mV) over every sample of every record and the mean per-record Pearson
correlation (undefined, None, where a prediction is constant, e.g. zeros), plus the mean over the unobserved
leads; and the model-free clinical metrics (`metrics.clinical`) of each reconstruction against its record.
A record's flat lead (a disconnected electrode: `prepare` keeps such records, e.g. Chapman-Shaoxing's all-zero
V2/V4/V6) is no truth to score against: it is left out of that lead's scores, and a record whose observed lead is
flat is left out of the task (it has nothing to reconstruct from); both are counted. The baselines are fitted on
the training records whose 12 leads are all recorded.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.ecg.qrs import FLAT_LEAD_MV
from diffusets_jax.ecg.shapes import NUM_LEADS
from diffusets_jax.ecg.units import finite_ecgs

TASKS: dict[str, tuple[str, ...]] = {"lead_I": ("I",), "limb_leads": ("I", "II", "III", "aVR", "aVL", "aVF")}
BASELINES: tuple[str, ...] = ("zeros", "train_mean", "linear")
# The clinical rows the Markdown table shows (every row is in report.json).
CLINICAL_ROWS: tuple[tuple[str, str], ...] = (
    ("qrs_f1", "generated_vs_real"), ("heart_rate_mae", "generated_vs_real"), ("qt_mae", "generated_vs_real"),
    ("st_j60_mae", "generated_vs_real"), ("einthoven_rmse", "generated"))


def lead_indices(leads: Sequence[str]) -> np.ndarray:
    return np.array([STANDARD_LEADS.index(lead) for lead in leads], np.int64)


def recorded_leads(ecgs: np.ndarray) -> np.ndarray:
    """`(n, 12)` bool: which leads of `ecgs` `(n, 1024, 12)` are recorded, finite and spanning at least FLAT_LEAD_MV
    (not a disconnected electrode's flat line)."""
    ecgs = np.asarray(ecgs, np.float64)
    finite = np.isfinite(ecgs)
    values = np.where(finite, ecgs, 0.0)
    return finite.all(axis=1) & (values.max(axis=1) - values.min(axis=1) >= FLAT_LEAD_MV)


def fit_linear(train_ecgs: np.ndarray, observed: Sequence[str]) -> np.ndarray:
    """Least-squares weights `(len(observed) + 1, 12)` predicting every lead from the observed leads and a constant,
    fitted over every sample of the training ECGs `(n, 1024, 12)` whose 12 leads are all recorded (finite, none
    flat: an all-zero V2 would teach it to predict zeros)."""
    train = np.asarray(train_ecgs, np.float64)
    train = train[recorded_leads(train).all(axis=1)]
    if not len(train):
        raise ValueError("linear baseline: no finite training ECG to fit on")
    x = train[:, :, lead_indices(observed)].reshape(-1, len(observed))
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    weights, *_ = np.linalg.lstsq(design, train.reshape(-1, NUM_LEADS), rcond=None)
    return weights


def predict_linear(weights: np.ndarray, ecgs: np.ndarray, observed: Sequence[str]) -> np.ndarray:
    """`(n, 1024, 12)` predictions from the observed leads of `ecgs`; the observed leads are copied."""
    index = lead_indices(observed)
    x = np.asarray(ecgs, np.float64)[:, :, index]
    prediction = x @ weights[:-1] + weights[-1]
    prediction[:, :, index] = x
    return prediction.astype(np.float32)


def fill_baseline(name: str, ecgs: np.ndarray, observed: Sequence[str], *, train_mean: np.ndarray | None = None,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """The baseline `name` ("zeros", "train_mean", "linear") for `ecgs` `(n, 1024, 12)`: observed leads copied."""
    ecgs = np.asarray(ecgs, np.float32)
    if name == "linear":
        return predict_linear(weights, ecgs, observed)
    if name == "zeros":
        filled = np.zeros_like(ecgs)
    elif name == "train_mean":
        filled = np.broadcast_to(np.asarray(train_mean, np.float32), ecgs.shape).copy()
    else:
        raise ValueError(f"baseline {name!r}: choose from {', '.join(BASELINES)}")
    index = lead_indices(observed)
    filled[:, :, index] = ecgs[:, :, index]
    return filled


def lead_scores(prediction: np.ndarray, truth: np.ndarray, scored: np.ndarray | None = None
                ) -> dict[str, list[float | None]]:
    """Per lead (standard order): RMSE (mV) over all samples of the records it is scored on, and mean per-record
    Pearson r over those where both signals vary (None where none is / does).

    scored: `(n, 12)` bool, which records' leads are truth to score against (default `recorded_leads(truth)`: a
    flat or non-finite truth lead is not)."""
    prediction, truth = np.asarray(prediction, np.float64), np.asarray(truth, np.float64)
    scored = recorded_leads(truth) if scored is None else np.asarray(scored, bool)
    counts = scored.sum(axis=0)
    squared = np.where(scored[:, None, :], (prediction - np.where(scored[:, None, :], truth, 0.0)) ** 2, 0.0)
    rmse = np.sqrt(squared.sum(axis=(0, 1)) / np.maximum(counts * truth.shape[1], 1))
    p = prediction - prediction.mean(axis=1, keepdims=True)
    t = np.where(scored[:, None, :], truth - truth.mean(axis=1, keepdims=True), 0.0)
    denominator = np.sqrt((p ** 2).sum(axis=1) * (t ** 2).sum(axis=1))
    defined = scored & (denominator > 1e-12)
    r = np.where(defined, (p * t).sum(axis=1) / np.where(defined, denominator, 1.0), np.nan)
    r_counts = defined.sum(axis=0)
    mean_r = np.where(r_counts > 0, np.nansum(np.where(defined, r, 0.0), axis=0) / np.maximum(r_counts, 1), np.nan)
    return {"rmse_mv": [float(v) if n else None for v, n in zip(rmse, counts, strict=True)],
            "correlation": [None if np.isnan(v) else float(v) for v in mean_r]}


def summarize(scores: Mapping[str, list[float | None]], observed: Sequence[str]) -> dict[str, float | None]:
    """Means over the unobserved leads of `lead_scores` output (each over the leads where it is defined)."""
    hidden = [i for i, lead in enumerate(STANDARD_LEADS) if lead not in observed]
    rmse = [scores["rmse_mv"][i] for i in hidden if scores["rmse_mv"][i] is not None]
    correlations = [scores["correlation"][i] for i in hidden if scores["correlation"][i] is not None]
    return {"rmse_mv": float(np.mean(rmse)) if rmse else None,
            "correlation": float(np.mean(correlations)) if correlations else None}


def posterior_reconstructions(generator: Any, real: Mapping[str, Any], observed: Sequence[str], *, noise_std: float,
                              particles: int, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Posterior samples `(n, 1024, 12)` for the records `real` (`evaluate.load_split` arrays) given their `observed`
    leads, their own text embeddings and patient data, with `generator`'s model (`pipeline.ECGGenerator`, whose
    sampler must be ddpm, or ddim with eta > 0). One compiled program; batch b uses `fold_in(PRNGKey(seed), b)`."""
    import jax

    from diffusets_jax import parallel
    from diffusets_jax.diffusion.observations import make_observation
    from diffusets_jax.diffusion.posterior import PosteriorConfig, jit_posterior_generate
    from diffusets_jax.diffusion.schedule import make_schedule
    from diffusets_jax.io.progress import progress_bar

    sharding = parallel.batch_sharding(generator.mesh)
    if generator.sampler.guidance_scale != 1.0:
        raise ValueError("reconstruction runs without classifier-free guidance (guidance_scale 1)")
    run = jit_posterior_generate(generator.unet, generator.vae, make_schedule(generator.diffusion.schedule),
                                 PosteriorConfig(sampler=generator.sampler, particles=particles),
                                 batch_sharding=sharding, latent_scale=generator.diffusion.latent_scale)
    ecgs = np.asarray(real["ecg"], np.float32)
    size, out = generator.batch_size, []
    bar = progress_bar(len(ecgs), desc="posterior", unit="ECG") if progress else None
    for batch, start in enumerate(range(0, len(ecgs), size)):
        rows = np.arange(start, min(start + size, len(ecgs)))
        padded = np.concatenate([rows, np.repeat(rows[-1:], size - len(rows))])
        patients = [types.SimpleNamespace(sex=int(real["sex"][i]), age=float(real["age"][i]),
                                          heart_rate=float(real["heart_rate"][i])) for i in padded]
        cond = generator.condition_arrays(patients, real["text_embedding"][padded])
        observation = make_observation(ecgs[padded], noise_std=noise_std, leads=list(observed))
        observation = observation.map_samples(lambda a: jax.device_put(a, sharding))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), batch)
        result = run(generator.unet_variables, generator.vae_variables, jax.device_put(cond, sharding), observation,
                     key)
        out.append(np.asarray(jax.device_get(result.ecg))[: len(rows)])
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return np.concatenate(out)


def reconstruction_study(generator: Any, train_ecgs: np.ndarray, test: Mapping[str, Any], *,
                         tasks: Mapping[str, Sequence[str]] = TASKS, noise_std: float = 0.05, particles: int = 8,
                         seed: int = 0, n_boot: int = 200, workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Reconstruct every task's unobserved leads of `test`'s records (`evaluate.load_split` arrays) with the
    posterior sampler of `generator` (None: baselines only) and the baselines fitted on `train_ecgs`
    `(n, 1024, 12)`; per-lead scores, their means over the unobserved leads and the clinical metrics, JSON-ready.
    Records with a non-finite sample are left out (counted)."""
    from diffusets_jax.metrics.clinical import clinical_metrics

    finite = finite_ecgs(test["ecg"])
    if not finite.any():
        raise ValueError("test split: no record without missing samples")
    test = {k: (np.asarray(v)[finite] if not isinstance(v, list) else [x for x, f in zip(v, finite, strict=True) if f])
            for k, v in test.items()}
    train = np.asarray(train_ecgs, np.float32)
    complete = recorded_leads(train).all(axis=1)
    if not complete.any():
        raise ValueError("train split: no record with all 12 leads recorded (finite and not flat) to fit the baselines on")
    train_mean = train[complete].mean(axis=0)
    recorded = recorded_leads(test["ecg"])
    report: dict[str, Any] = {"n_test": int(finite.sum()), "n_test_left_out": int((~finite).sum()),
                              "n_train": int(complete.sum()), "n_train_left_out": int((~complete).sum()),
                              "leads": list(STANDARD_LEADS), "noise_std_mv": noise_std,
                              "particles": particles if generator is not None else None, "seed": seed, "tasks": {}}
    for task, observed in tasks.items():
        usable = recorded[:, lead_indices(observed)].all(axis=1)  # a flat observed lead: nothing to reconstruct from
        if not usable.any():
            report["tasks"][task] = {"observed": list(observed), "n_records": 0, "n_left_out_flat_observed": int(len(usable)),
                                     "n_flat_leads_not_scored": 0, "methods": {}}
            continue
        records = {k: (np.asarray(v)[usable] if not isinstance(v, list) else [x for x, u in zip(v, usable, strict=True) if u])
                   for k, v in test.items()}
        truth, scored = records["ecg"], recorded[usable]
        methods: dict[str, np.ndarray] = {}
        if generator is not None:
            methods["posterior"] = posterior_reconstructions(generator, records, observed, noise_std=noise_std,
                                                             particles=particles, seed=seed, progress=progress)
        weights = fit_linear(train, observed)
        for name in BASELINES:
            methods[name] = fill_baseline(name, truth, observed, train_mean=train_mean, weights=weights)
        rows = {}
        for name, prediction in methods.items():
            scores = lead_scores(prediction, truth, scored)
            clinical = clinical_metrics(prediction, truth, records["heart_rate"], records["subject_id"], n_boot=n_boot,
                                        seed=seed, workers=workers)
            rows[name] = {**scores, "unobserved_mean": summarize(scores, observed), "clinical": clinical["metrics"]}
        report["tasks"][task] = {"observed": list(observed), "n_records": int(usable.sum()),
                                 "n_left_out_flat_observed": int((~usable).sum()),
                                 "n_flat_leads_not_scored": int((~scored).sum()), "methods": rows}
    return report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """Tables per task: mean RMSE / r over the unobserved leads, per-lead RMSE, and the main clinical metrics."""
    lines = [f"Reconstruction of 12 leads on {report['n_test']} held-back records ({report['n_test_left_out']} with "
             f"missing samples left out); baselines fitted on {report['n_train']} training records with all 12 leads "
             f"recorded ({report.get('n_train_left_out', 0)} with a flat lead left out); observation noise "
             f"{report['noise_std_mv']} mV, {report['particles'] or '-'} particles, seed {report['seed']}.", ""]
    for task, result in report["tasks"].items():
        lines += [f"### {task}: observed {', '.join(result['observed'])}", "",
                  f"{result.get('n_records', report['n_test'])} records ({result.get('n_left_out_flat_observed', 0)} "
                  f"left out: an observed lead is flat); {result.get('n_flat_leads_not_scored', 0)} flat leads of "
                  "theirs not scored (no truth to score against).", "",
                  "| method | RMSE unobserved (mV) | r unobserved | " + " | ".join(
                      f"RMSE {lead}" for lead in STANDARD_LEADS) + " |",
                  "|---|---|---|" + "---|" * len(STANDARD_LEADS)]
        for name, row in result["methods"].items():
            mean = row["unobserved_mean"]
            lines.append(f"| {name} | {_fmt(mean['rmse_mv'])} | {_fmt(mean['correlation'])} | "
                         + " | ".join(_fmt(v) for v in row["rmse_mv"]) + " |")
        lines += ["", "| method | " + " | ".join(f"{m} ({c.replace('_', ' ')})" for m, c in CLINICAL_ROWS) + " |",
                  "|---|" + "---|" * len(CLINICAL_ROWS)]
        for name, row in result["methods"].items():
            values = {(r["metric"], r["comparison"]): r for r in row["clinical"]}
            cells = []
            for key in CLINICAL_ROWS:
                entry = values.get(key)
                cells.append("n/a" if entry is None or entry["value"] is None
                             else " ".join(part for part in (_fmt(entry["value"]), entry["unit"],
                                                             f"({entry['n_measured']}/{entry['n']})") if part))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def reconstruct_eval(model_dir: str | os.PathLike | None, dataset: str | os.PathLike, out: str | os.PathLike, *,
                     data_dir: str | os.PathLike | None = None, train_split: str = "train", test_split: str = "test",
                     limit: int | None = None, train_limit: int | None = 2000, steps: int = 100, particles: int = 8,
                     noise_std: float = 0.05, batch_size: int = 8, seed: int = 0, n_boot: int = 200, workers: int = 1,
                     overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run `reconstruction_study` on a prepared dataset's splits and write report.json and report.md into `out`
    (claimed like `sample`'s folder; a rerun with the same settings returns the finished report).

    model_dir None: baselines only. Checks every argument before loading data or a model.
    """
    from diffusets_jax.data.location import dataset_folder
    from diffusets_jax.io.files import read_json, write_json_atomic, write_text_atomic
    from diffusets_jax.io.run_dir import check_output_path, output_dir, reading

    reads = [("--model-dir", model_dir), ("--dataset", dataset_folder(dataset)), ("--data-dir", data_dir)]
    check_output_path(out, command="reconstruct-eval", overwrite=overwrite, reads=reads)
    for name, value, low in (("--steps", steps, 1), ("--particles", particles, 1), ("--batch-size", batch_size, 1),
                             ("--n-boot", n_boot, 1),
                             # None is every record; 0 is not (`load_split` would read every one for it)
                             ("--limit", 1 if limit is None else limit, 1),
                             ("--train-limit", 1 if train_limit is None else train_limit, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not (np.isfinite(noise_std) and noise_std > 0):
        raise ValueError(f"--noise-std must be > 0 mV, got {noise_std}")
    from diffusets_jax.data.card import card_fingerprint
    from diffusets_jax.experiments.evaluate import ecg_dataset, load_split

    builder = ecg_dataset(dataset, data_dir, kind="prepared")  # another kind of dataset is refused before --out is claimed
    for flag, split in (("--train-split", train_split), ("--test-split", test_split)):
        if split not in builder.info.splits:
            raise ValueError(f"{flag} {split}: dataset {builder.name!r} has no such split; it has "
                             f"{', '.join(sorted(builder.info.splits))} (one split each: the baselines are fitted on "
                             "--train-split and everything is scored on --test-split)")
    if train_split == test_split:
        raise ValueError(f"--train-split and --test-split are both {train_split!r}: the regression and mean "
                         "baselines would be fitted on the records they are scored on; give two different splits")
    settings = {"model_dir": None if model_dir is None else os.path.abspath(model_dir), "dataset": os.fspath(dataset),
                "dataset_card": card_fingerprint(builder),  # another build at this path: not this finished run
                "data_dir": None if data_dir is None else os.path.abspath(data_dir), "train_split": train_split,
                "test_split": test_split, "limit": limit, "train_limit": train_limit, "steps": steps,
                "particles": particles, "noise_std": noise_std, "batch_size": batch_size, "seed": seed, "n_boot": n_boot}
    generator = None
    if model_dir is not None:
        from diffusets_jax.data.card import check_embeddings_fit, read_card
        from diffusets_jax.diffusion.samplers import SamplerConfig
        from diffusets_jax.models import model_dir as model_dirs
        from diffusets_jax.pipeline import ECGGenerator

        # The posterior conditions on the split's stored embeddings as they are: another embedder's (even of the
        # U-Net's width) or another prompt style's are inputs it never saw. Checked before any weights load.
        index = model_dirs.read_index(model_dir)
        model_dirs.require(index, model_dir, "vae", "unet")
        check_embeddings_fit(index.conditioning, read_card(builder), model=f"the U-Net of --model-dir {model_dir}",
                             data=f"--dataset {dataset}", remedy="use the dataset it was trained on, or one prepared "
                                                                "with its embedder and prompt style")
        generator = ECGGenerator(model_dir, SamplerConfig(sampler="ddpm", steps=steps, clip_sample=None),
                                 batch_size=batch_size, seed=seed)
        # The models by uid, as `sample` and `evaluate` record them: a model retrained into the same directory is
        # another input, not this finished run.
        settings["components"] = generator.settings()["components"]

    with output_dir(out, command="reconstruct-eval", settings=settings, overwrite=overwrite, reads=reads) as run:
        if run.complete:
            return read_json(run.path / "report.json", "reconstruction report")
        with reading(builder.data_dir):  # both splits of one build: no `prepare --overwrite` between the reads
            train = load_split(builder, train_split, limit=train_limit)  # the builder checked above, not reopened
            test = load_split(builder, test_split, limit=limit)
        report = reconstruction_study(generator, train["ecg"], test, noise_std=noise_std, particles=particles,
                                      seed=seed, n_boot=n_boot, workers=workers, progress=progress)
        report["settings"] = settings
        write_json_atomic(run.path / "report.json", report)
        write_text_atomic(run.path / "report.md", render_markdown(report))
        run.mark_complete(n_test=report["n_test"])
    return report
