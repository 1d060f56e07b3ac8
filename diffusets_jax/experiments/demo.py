"""The end-to-end demo on the 40 real ECGs shipped with the package (`diffusets-jax demo`, `make demo`).

prepare (PhysioNet/CinC 2021 layout -> TFRecords, MiniLM embeddings) -> train a small VAE -> encode latents ->
train a small U-Net (with condition dropout, so guidance works) -> train a small CLIP (the evaluation feature
extractor) -> sample ECGs for a handful of prompts, one of a condition the data never shows -> the paper's
three-level evaluation -> `demo_out/`. Every stage is the library's real code path, at toy model sizes.

The records are from the PhysioNet/Computing in Cardiology Challenge 2021 training data (CC BY 4.0); see
`diffusets_jax/demo_data/cinc2021/README.md` for the attribution.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from diffusets_jax.config import SHIPPED_CONFIGS
from diffusets_jax.io.files import read_json, write_json_atomic

DEMO_RECORDS = Path(__file__).resolve().parent.parent / "demo_data" / "cinc2021"
CONFIG_NAMES = ("demo_vae", "demo_unet", "demo_clip")

# (report lines joined by '|', sex, age, heart rate): the last is a condition none of the 40 records has.
DEMO_PROMPTS: tuple[tuple[str, str, int, int], ...] = (
    ("Sinus rhythm|Normal ECG", "F", 45, 70),
    ("Sinus bradycardia|Abnormal ECG", "M", 72, 48),
    ("Sinus tachycardia|Abnormal ECG", "F", 37, 115),
    ("Atrial fibrillation|Abnormal ECG", "M", 80, 105),
    ("Hyperkalemia", "M", 66, 75),
)

# Training steps per stage. Full: about 7 minutes on 2 idle CPU cores, most of it the VAE (1200 steps, ~8/s) and
# the U-Net (6000 steps, ~27/s); `quick` exercises the same path in about 1.5 minutes, nearly all compilation.
STEPS = {"full": {"vae": 1200, "unet": 6000, "clip": 200}, "quick": {"vae": 4, "unet": 4, "clip": 4}}


def _config_path(name: str) -> Path:
    path = SHIPPED_CONFIGS / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the diffusets-jax install is incomplete; reinstall it")
    return path


def _config(name: str, dataset: Path, steps: int, extra: list[str] | None = None):
    from diffusets_jax.config import load_config

    path = _config_path(name)
    overrides = [f"data.dataset={dataset}", f"train.num_steps={steps}", "train.checkpoint_every=100000",
                 f"train.eval_every={max(steps // 2, 1)}", f"train.log_every={max(steps // 10, 1)}"]
    return load_config(path, overrides + list(extra or []))


def _stage(name: str, log: list[dict[str, Any]]):
    class _Timer:
        def __enter__(self):
            print(f"\n== demo: {name}", flush=True)
            self.began = time.perf_counter()

        def __exit__(self, *exc):
            log.append({"stage": name, "seconds": round(time.perf_counter() - self.began, 1)})

    return _Timer()


def _finished(result: Any, workdir: Path) -> None:
    """Stop the demo when a training was preempted: the next stage must not run on a half-trained model."""
    if result.preempted:
        from diffusets_jax.errors import Preempted

        raise Preempted(f"preempted (SIGTERM) at step {result.step} of {workdir}; checkpoint saved, rerun the same "
                        "command to resume")


def run_demo(out_dir: str | Path = "demo_out", *, quick: bool = False, seed: int = 0,
             overwrite: bool = False) -> dict[str, Any]:
    """Run every stage into `out_dir`; returns the summary.

    The folder is claimed like every output folder (`io.run_dir`): a folder that is not this demo's is refused
    unless `overwrite`, and rerunning the same demo resumes (finished stages are recognised and skipped).
    The four models go into one model directory, `out_dir/model`, exactly as `train --model-dir` does.
    """
    from diffusets_jax.conditioning.requests import make_condition
    from diffusets_jax.data import latents, sources
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.experiments.evaluate import PROTOCOLS, evaluate_split, load_clip
    from diffusets_jax.io.outputs import sample_to_directory
    from diffusets_jax.io.run_dir import output_dir
    from diffusets_jax.pipeline import ECGGenerator
    from diffusets_jax.train.run import run_training

    for name in CONFIG_NAMES:  # before the prepare stage, not minutes into the run
        _config_path(name)
    steps = STEPS["quick" if quick else "full"]
    log: list[dict[str, Any]] = []
    with output_dir(out_dir, command="demo", settings={"quick": quick, "seed": seed, "steps": steps},
                    overwrite=overwrite, flag="--out") as run:
        out = run.path.resolve()
        model_dir = out / "model"

        with _stage("prepare the 40 bundled CinC 2021 records (TFRecords + MiniLM prompt embeddings)", log):
            report = sources.prepare("physionet-challenge", str(DEMO_RECORDS), str(out / "data"), config="local",
                                     workers=1)
            dataset = Path(sources.make_builder("physionet-challenge", str(out / "data"), "local").data_dir)

        with _stage(f"train the VAE ({steps['vae']} steps) into the model directory", log):
            _finished(run_training("vae", _config("demo_vae", dataset, steps["vae"]), out / "runs" / "vae", model_dir),
                      out / "runs" / "vae")

        with _stage("encode every record into latents with that VAE", log):
            encode, variables, vae = latents.load_vae_encoder(model_dir)
            latents.encode_dataset(dataset, out / "latents", encode, variables, vae=vae, batch_size=8)

        with _stage(f"train the diffusion U-Net ({steps['unet']} steps) into the model directory", log):
            _finished(run_training("unet", _config("demo_unet", out / "latents", steps["unet"]), out / "runs" / "unet",
                                   model_dir), out / "runs" / "unet")

        with _stage(f"train the CLIP feature extractor ({steps['clip']} steps) into the model directory", log):
            _finished(run_training("clip", _config("demo_clip", dataset, steps["clip"]), out / "runs" / "clip",
                                   model_dir), out / "runs" / "clip")

        # DPM-Solver++(2M), 20 steps on the noise-level grid with a second-order final step: within 1% of the data's
        # std at every latent scale from 0.1 to 1 (diffusion.sampler_validation), with 50x fewer calls than DDPM.
        sampler = sampler_config("dpmpp_2m", steps=4 if quick else 20)
        generator = ECGGenerator(model_dir, sampler, batch_size=16, seed=seed,
                                 embedding_cache=out / "data" / "embedding_cache" / "demo_prompts.sqlite")

        with _stage("sample ECGs for the demo prompts", log):
            conditions = [make_condition(*p, count=2 if not quick else 1) for p in DEMO_PROMPTS]
            manifest = sample_to_directory(generator, conditions, out / "samples")

        with _stage("evaluate: generated vs real ECGs from the same conditions", log):
            # report.md is written last (`evaluate.write_report`), after report.json: a demo killed between the two
            # took the stage as done and pointed its summary at a report.md that was not there.
            if run.resumed and (out / "evaluation" / "report.md").is_file():  # this demo's: the stage is done
                evaluation = read_json(out / "evaluation" / "report.json", "evaluation report")
            else:
                # The fast protocol (raw references, the demo's DPM-Solver++ generator): `diffusets-jax evaluate
                # --protocol paper` runs the published one (1000 DDPM steps) on the same model directory.
                evaluation = evaluate_split(generator, load_clip(model_dir, None), dataset, "all", out / "evaluation",
                                            proto=PROTOCOLS["fast"], limit=8 if quick else None,
                                            n_boot=100 if quick else 1000)

        summary = {
            "out": str(out),
            "model_dir": str(model_dir),
            "records": {"written": report["examples_written"], "skipped": report["skipped_by_reason"],
                        "per_split": report["examples_per_split"]},
            "samples": {"count": manifest["count"], "plots": str(out / "samples" / "plots"),
                        "wfdb": str(out / "samples" / "wfdb"), "npz": str(out / "samples" / "samples.npz")},
            "evaluation": {"report": str(out / "evaluation" / "report.md"),
                           "heart_rate_mae_bpm": evaluation["feature_level"]["heart_rate_mae_bpm"],
                           "fid": evaluation["signal_level"]["fid"],
                           "precision": evaluation["signal_level"].get("precision"),
                           "recall": evaluation["signal_level"].get("recall"),
                           "clip_score": evaluation["diagnostic_level"].get("clip_score_generated")},
            "stages": log,
            "quick": quick,
        }
        write_json_atomic(out / "summary.json", summary)
        run.mark_complete()
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    out = summary["out"]
    print("\n== demo finished" + (" (quick mode: a smoke run, not a trained model)" if summary["quick"] else ""))
    for stage in summary["stages"]:
        print(f"  {stage['seconds']:7.1f} s  {stage['stage']}")
    print(f"\n  generated ECG plots (12-lead clinical layout): {summary['samples']['plots']}/")
    print(f"  WFDB records: {summary['samples']['wfdb']}/   arrays: {summary['samples']['npz']}")
    print(f"  evaluation report: {summary['evaluation']['report']} (+ heart-rate scatter and real/generated pairs)")
    print(f"  model directory (sample from it with `diffusets-jax sample --model-dir`): {summary['model_dir']}/")
    print(f"  everything: {out}/ (summary.json)")
    print("  The demo trains toy-sized models for minutes on 40 records: expect ECG-like, not clinical-grade, output.")
    print("  The evaluation compares with those same 40 records (split 'all'): it measures fit, not generalisation.")
