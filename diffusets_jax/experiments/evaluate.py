"""The paper's evaluation protocol, and past it: per-condition tables, any generator's samples, model comparisons,
and model-free clinical metrics in every report.

Levels, named as in the paper (DiffuSETS, arXiv 2501.05932):
- **signal level**: FID and manifold precision / recall / F1 (k = 3) on the CLIP ECG tower's features (plus rFID);
- **feature level**: heart rate, MAE between the condition and the rate measured on the generated ECG, and the
  scatter of one against the other (Fig. 2A);
- **diagnostic level**: CLIP score, the cosine between the generated ECG's and its report's CLIP features.
Every report adds the model-free clinical metrics (`metrics.clinical`: heart rate, beat count, RR, SDNN, QRS
F1, limb-lead identities, amplitude, PR / QRS / QT / QTc / ST errors, each with coverage and a patient-clustered
bootstrap 95% interval), which caught an undertrained published U-Net that the learned features hid.

Protocols (`PROTOCOLS`): `paper` reproduces the published evaluation: generated ECGs are compared with VAE
reconstructions decoder(encoder(real)) of the real records, each through one draw from the VAE's posterior as the
published latents were (`reference_key`), sampled with the published 1000-step DDPM, heart rate
by first-lead XQRS; `fast` compares with the raw real ECGs, samples with DPM-Solver++ and measures the heart rate
with the multi-lead consensus detector.

Per condition (Fig. 2D/2E): records are chosen by keyword rules on their reports
(`experiments/data/condition_rules.json`), N per condition, S samples each, and every level is tabulated per
condition with a figure. `evaluate_generated` scores samples from any generator against a prepared split.

On several hosts each process generates and measures its share; the per-record measurements are gathered and
process 0 scores and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from diffusets_jax import parallel
from diffusets_jax.diffusion.samplers import DEFAULT_STEPS
from diffusets_jax.ecg.heart_rate import CONSENSUS, XQRS_FIRST_LEAD
from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.ecg.shapes import ECG_SHAPE, NUM_LEADS
from diffusets_jax.ecg.units import finite_ecgs
from diffusets_jax.errors import RunFailed
from diffusets_jax.experiments.keyword_rules import RuleSet
from diffusets_jax.io.files import write_json_atomic, write_text_atomic
from diffusets_jax.io.generated import finite_only
from diffusets_jax.metrics.clinical import (
    ECGMeasurements,
    compare_measurements,
    measure_ecgs,
    render_clinical_markdown,
)
from diffusets_jax.metrics.clip_score import clip_score
from diffusets_jax.metrics.features import clip_ecg_features, clip_text_features
from diffusets_jax.metrics.fid import UndefinedRelativeFID, fid, rfid
from diffusets_jax.metrics.heart_rate_mae import measure_heart_rates
from diffusets_jax.metrics.precision_recall import precision_recall
from diffusets_jax.metrics.record_pool import RecordPool, record_pool

MEASURE_CHUNK = 2048  # records per clinical-measurement call (each converts its records to float64 at once)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How an evaluation is run: the sampler, what the generated ECGs are compared with, how heart rate is measured."""

    name: str
    sampler: str
    steps: int | None
    references: str  # "reconstruction": decoder(encoder(real)) as published; "raw": the real ECGs themselves
    heart_rate_method: str
    k: int = 3
    description: str = ""


PROTOCOLS: dict[str, Protocol] = {
    "paper": Protocol("paper", "ddpm", 1000, "reconstruction", XQRS_FIRST_LEAD, 3,
                      "the published evaluation: VAE-reconstructed references, DDPM-1000, first-lead XQRS heart rate"),
    "fast": Protocol("fast", "dpmpp_2m", None, "raw", CONSENSUS, 3,
                     "raw real references, DPM-Solver++ (20 steps), multi-lead consensus heart rate"),
}


def protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name]


HEART_RATE_METHOD_TITLES = {XQRS_FIRST_LEAD: "first-lead XQRS heart rate", CONSENSUS: "multi-lead consensus heart rate"}


SAMPLER_TITLES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++"}
REFERENCE_TITLES = {"reconstruction": "VAE-reconstructed references", "raw": "raw real references"}


def _sampler_text(sampler: str, steps: int, guidance_scale: float = 1.0) -> str:
    guidance = f", guidance scale {guidance_scale:g}" if guidance_scale != 1.0 else ""
    return f"{SAMPLER_TITLES[sampler]} ({steps} steps{guidance})"


def split_protocol(proto: Protocol, sampler: Any) -> dict[str, Any]:
    """What `evaluate_split` records of `proto` when `sampler` (the generator's `SamplerConfig`) made the ECGs:
    `--sampler`, `--steps` and `--guidance-scale` replace the protocol's sampler, and the record (report.md's
    first line included) said "DDPM-1000" of a 2-step DDIM run. The sampler that ran, with its steps resolved."""
    default_steps = proto.steps or DEFAULT_STEPS[proto.sampler]
    record = {**dataclasses.asdict(proto), "sampler": sampler.sampler, "steps": int(sampler.steps),
              "guidance_scale": float(sampler.guidance_scale)}
    if (sampler.sampler, sampler.steps, sampler.guidance_scale) != (proto.sampler, default_steps, 1.0):
        record["description"] = (
            f"{REFERENCE_TITLES[proto.references]}, {_sampler_text(sampler.sampler, sampler.steps, sampler.guidance_scale)}"
            f" in place of the protocol's {_sampler_text(proto.sampler, default_steps)}, "
            f"{HEART_RATE_METHOD_TITLES[proto.heart_rate_method]}")
    return record


def generated_protocol(proto: Protocol) -> dict[str, Any]:
    """What `evaluate_generated` records of `proto`: samples given as they are (nothing is sampled) against the raw
    real ECGs (no VAE reconstructs them), measured with `proto`'s heart-rate method and k. The protocol's own
    record said "VAE-reconstructed references, DDPM-1000" for `--protocol paper`, which such a run never did."""
    return {**dataclasses.asdict(proto), "sampler": None, "steps": None, "references": "raw",
            "description": f"the given samples against the raw real ECGs (no model samples or reconstructs here), "
                           f"{HEART_RATE_METHOD_TITLES[proto.heart_rate_method]}"}


# -- data ---------------------------------------------------------------------------------------------------------
SPLIT_COLUMNS = ("ecg", "text_embedding", "sex", "age", "heart_rate", "subject_id", "prompt", "report_lines")


def ecg_dataset(dataset: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, flag: str = "--dataset",
                kind: str | None = None):
    """The TFDS builder of a dataset of ECGs (`prepare`, or a `sample --corpus` corpus), or one ValueError line
    when it is another kind (a latent dataset of `encode` has no `ecg`): cheap, so commands call it before they
    claim an output folder, where `load_split` would have failed with a KeyError. `kind`: "prepared" where the
    command needs recorded ECGs, "corpus" where generated ones (`data.card.check_dataset_kind`)."""
    from diffusets_jax.data import pipeline
    from diffusets_jax.data.card import check_dataset_kind

    builder = pipeline.load_builder(dataset, data_dir)
    missing = [column for column in SPLIT_COLUMNS if column not in builder.info.features.keys()]
    if missing:
        latent = " (a latent dataset: `encode` wrote it)" if "latent_mean" in builder.info.features.keys() else ""
        # Only the writers this command takes: a command of recorded ECGs refuses a corpus next (check_dataset_kind).
        writers = {"prepared": "`diffusets-jax prepare`", "corpus": "`diffusets-jax sample --corpus`"}.get(
            kind, "`diffusets-jax prepare` or `sample --corpus`")
        raise ValueError(f"{flag} {dataset}: not a prepared ECG dataset{latent}, it has no {', '.join(missing)}; "
                         f"give one {writers} wrote")
    if kind is not None:
        check_dataset_kind(builder.data_dir, kind, flag)
    return builder


def load_split(dataset: Any, split: str, *, data_dir: str | os.PathLike | None = None,
               limit: int | None = None, with_ecg: bool = True,
               ecg_rows: Sequence[int] | None = None) -> dict[str, Any]:
    """Read a prepared split into host arrays: ecg (n, 1024, 12), finite (n,) (whether each ECG has only finite
    samples), text_embedding, sex, age, heart_rate, subject_id, prompt and report_lines (`limit`: the first n
    examples, in the dataset's stored order). `dataset`: a folder, a TFDS name with `data_dir`, or a builder
    `ecg_dataset` returned (not opened again).

    To choose records without holding every ECG (4 GB for MIMIC-IV-ECG's test split): `with_ecg=False` reads the
    conditions alone (ecg and finite are then None); `ecg_rows` keeps only those rows' ECGs, `(len(ecg_rows), 1024,
    12)` in the order given, while every other column still covers the whole split.

    The dataset is held as read (`io.run_dir.reading`) while the split is read, and only then (not while a run
    generates and scores): a `prepare --overwrite` cannot move it away mid-read; one under way now is a ValueError."""
    from diffusets_jax.io.run_dir import reading

    builder = ecg_dataset(dataset, data_dir)
    if split not in builder.info.splits and split != "all":
        raise ValueError(f"dataset {builder.name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    with reading(builder.data_dir):
        return _read_split(builder, split, limit, with_ecg, ecg_rows)


def read_reference_split(dataset: Any, split: str, *, data_dir: str | os.PathLike | None = None,
                         limit: int | None = None) -> dict[str, Any]:
    """`load_split` as `evaluate` reads its reference split: on every host of a run together, so that a host refused
    (its dataset being replaced now, or unreadable) stops every host with its line, not only itself while the others
    wait at the next collective until the coordination service ends them. Call it on every process."""
    with parallel.failing_together():
        return load_split(dataset, split, data_dir=data_dir, limit=limit)


def _read_split(builder: Any, split: str, limit: int | None, with_ecg: bool,
                ecg_rows: Sequence[int] | None) -> dict[str, Any]:
    """`load_split`'s reading, of an opened `builder`."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=split, shuffle_files=False)
    if limit:
        ds = ds.take(limit)
    if not with_ecg:
        kept = [k for k in SPLIT_COLUMNS if k != "ecg"]
        ds = ds.map(lambda example: {k: example[k] for k in kept})
    # The ECGs (49 KB each; 39 GB for all of MIMIC-IV-ECG) go straight into one array of the split's size: a list
    # of per-example arrays stacked at the end held them twice.
    splits = builder.info.splits
    total = sum(info.num_examples for info in splits.values()) if split == "all" else splits[split].num_examples
    size = min(total, limit) if limit else total
    slot = None if ecg_rows is None else {int(row): i for i, row in enumerate(ecg_rows)}  # row -> place in `ecg`
    ecg: np.ndarray | None = None
    finite: list[bool] = []
    columns: dict[str, list] = {k: [] for k in SPLIT_COLUMNS if k != "ecg"}
    count = 0
    for example in tfds.as_numpy(ds):
        if with_ecg:
            if ecg is None:
                ecg = np.empty((max(size, 1) if slot is None else len(slot), *example["ecg"].shape),
                               example["ecg"].dtype)
            finite.append(bool(finite_ecgs(example["ecg"][None])[0]))
            if slot is None:
                if count == len(ecg):  # more examples than the metadata says: grow rather than fail
                    ecg = np.concatenate([ecg, np.empty_like(ecg)])
                ecg[count] = example["ecg"]
            elif count in slot:
                ecg[slot[count]] = example["ecg"]
        count += 1
        for key in columns:
            value = example[key]
            if key == "prompt":
                value = value.decode()
            elif key == "report_lines":
                value = tuple(line.decode() for line in value)
            columns[key].append(value)
    if not count:
        raise ValueError(f"split {split!r} of {builder.name!r} is empty")
    if slot is not None and (beyond := sorted(row for row in slot if not 0 <= row < count)):
        raise ValueError(f"split {split!r} of {builder.name!r} has {count} examples, no row {beyond[0]}")
    return {"ecg": None if ecg is None else ecg[:count] if slot is None else ecg[: len(slot)],
            "finite": np.array(finite, bool) if with_ecg else None,
            **{k: (np.stack(v) if k not in ("prompt", "report_lines") else v) for k, v in columns.items()}}


def find_clip(model_dir: str | os.PathLike | None, clip_dir: str | os.PathLike | None) -> tuple[str, Any]:
    """The model directory whose `clip` component is the feature extractor (`clip_dir` when given, else
    `model_dir`) and its index, checked from the index alone: cheap, so a command finds a wrong one before any
    weights load or its output folder is claimed."""
    from diffusets_jax.models import model_dir as model_dirs

    source = clip_dir if clip_dir is not None else model_dir
    flag = "--clip" if clip_dir is not None else "--model-dir"
    if source is not None and Path(source).exists() and not Path(source).is_dir():
        raise NotADirectoryError(f"{flag} {source} is a file, not a model directory (it must hold a clip/ component)")
    if source is None or not Path(source).is_dir():
        raise FileNotFoundError(f"{flag} {source}: no such model directory (it must hold a clip/ component)")
    index = model_dirs.read_index(source)
    model_dirs.require(index, source, "clip")
    return os.fspath(source), index


def check_text_embeddings(generated: Any, clip_dir: str | os.PathLike, conditioning: Any, *,
                          flag: str = "--generated", clip_flag: str = "--clip") -> None:
    """Refuse in one line, before the CLIP's weights load, the text embeddings a generated set carries
    (`io.generated.GeneratedSet.text_embedding`, `(n, D)`, finite) when the CLIP's text tower cannot take them: D
    is not its `text_dim` (it failed with a traceback after every ECG was measured), or the NPZ records an
    embedder other than the one the CLIP was trained on (`conditioning`, None when the CLIP records none:
    `data.card.check_embedder_id_fits`), or a corpus's card another embedder or prompt style
    (`data.card.check_embeddings_fit`)."""
    from diffusets_jax.data.card import CARD_FILE, check_embedder_id_fits, check_embeddings_fit, read_card
    from diffusets_jax.models import bundle

    if generated.text_embedding is None:
        return
    where = f"{flag} {generated.text_embedding_file or generated.source}"
    config = bundle.read_module_config(clip_dir, "clip")
    text_dim = int(bundle.module_from_config(config, f"{clip_dir}/clip").text_dim)
    width = int(generated.text_embedding.shape[1])
    if width != text_dim:
        raise ValueError(f"{where}: 'text_embedding' is {width}-d, but the CLIP of {clip_flag} {clip_dir} takes "
                         f"{text_dim}-d text embeddings: give the embeddings of the embedder the CLIP was trained "
                         "with, or leave the array out (the split's embeddings of the same prompts are used)")
    if conditioning is None:
        return
    model = f"the CLIP of {clip_flag} {clip_dir}"
    if not generated.text_embedding_file and (Path(generated.source) / CARD_FILE).is_file():
        # A corpus (`sample --corpus`): its card records how its text embeddings were made, as a dataset's does.
        check_embeddings_fit(conditioning, read_card(generated.source), model=model, data=where,
                             remedy="give a --clip trained on embeddings of the corpus's embedder and prompt style")
        return
    check_embedder_id_fits(conditioning, generated.text_embedder, model=model, data=f"{where}: 'text_embedding'",
                           remedy="give the embeddings of the embedder the CLIP was trained with, or leave the array "
                                  "out")


def clip_conditioning(index: Any) -> Any:
    """The text conditioning a CLIP was trained on (`conditioning.spec.ConditioningSpec`), when its entry records
    one (`train clip` does; a converted CLIP does not); else None."""
    from diffusets_jax.conditioning.spec import ConditioningSpec

    recorded = index.components["clip"].get("conditioning")
    return None if recorded is None else ConditioningSpec.from_json(recorded, "the clip entry of model_index.json")


def load_clip(model_dir: str | os.PathLike | None, clip_dir: str | os.PathLike | None, *,
              uid: str | None = None) -> tuple[Any, Any]:
    """The feature extractor: `clip_dir`'s CLIP when given, else the model directory's own `clip` component.

    `uid`: the CLIP's uid as `find_clip`'s index gave it, which the run records and checked its inputs against;
    a CLIP replaced since (a `train clip` or `convert` finishing into the directory while the generators loaded)
    is refused in one line rather than scored with under the old one's uid."""
    from diffusets_jax.models import model_dir as model_dirs

    source, index = find_clip(model_dir, clip_dir)
    flag = "--clip" if clip_dir is not None else "--model-dir"
    return model_dirs.load_component_as_read(source, "clip", uid or index.components["clip"].get("uid"), flag)


# -- measuring ----------------------------------------------------------------------------------------------------
def measure(ecgs: np.ndarray, clip: tuple[Any, Mapping[str, Any]], heart_rate_method: str,
            workers: int | RecordPool = 1) -> dict[str, Any]:
    """Per-record measurements of `ecgs` `(n, 1024, 12)` mV: CLIP `features` `(n, d)`, `heart_rate` `(n,)` by the
    protocol's method (NaN where unmeasurable), `lead_std` `(n, 12)`, `abs_amplitude` `(n,)` and the clinical
    measurements (`clinical`, an `ECGMeasurements`)."""
    ecgs = np.asarray(ecgs, np.float32)
    module, variables = clip
    with record_pool(workers) as pool:
        parts = [measure_ecgs(ecgs[start : start + MEASURE_CHUNK], workers=pool)
                 for start in range(0, len(ecgs), MEASURE_CHUNK)]
        clinical = ECGMeasurements.concatenate(parts or [measure_ecgs(ecgs)])
        heart_rate = measure_heart_rates(ecgs, method=heart_rate_method, workers=pool)[0]
    return {
        "features": clip_ecg_features(module, variables, ecgs), "heart_rate": heart_rate,
        "lead_std": ecgs.std(axis=1), "abs_amplitude": np.abs(ecgs).mean(axis=(1, 2)), "clinical": clinical,
    }


def _gather(local: Mapping[str, Any]) -> dict[str, Any]:
    """Every host's per-record measurements (with their `position`), in position order."""
    arrays = {k: v for k, v in local.items() if k != "clinical"}
    rows = parallel.gather_rows(arrays)
    clinical = [ECGMeasurements.from_lists(part) for part in parallel.allgather_objects(local["clinical"].as_lists())
                if part["beats_s"]]
    order = np.argsort(rows["position"], kind="stable")
    gathered = {k: v[order] for k, v in rows.items()}
    gathered["clinical"] = ECGMeasurements.concatenate(clinical).take(order) if clinical else local["clinical"]
    return gathered


def _gather_examples(examples: list[tuple[int, np.ndarray, np.ndarray, dict[str, Any]]]
                     ) -> list[tuple[int, np.ndarray, np.ndarray, dict[str, Any]]]:
    """Every host's example pairs `(row, real (1024, 12), generated (1024, 12), conditions)` for the report's
    figures: process 0 alone held only those of its own batches (two of four at two ECGs a batch on two hosts)."""
    if jax.process_count() == 1:
        return examples
    rows = parallel.gather_rows({
        "row": np.asarray([e[0] for e in examples], np.int64).reshape(-1),
        "real": np.asarray([e[1] for e in examples], np.float32).reshape(-1, *ECG_SHAPE),
        "generated": np.asarray([e[2] for e in examples], np.float32).reshape(-1, *ECG_SHAPE)})
    conditions = [c for part in parallel.allgather_objects([e[3] for e in examples]) for c in part]  # process order
    return list(zip(rows["row"].tolist(), rows["real"], rows["generated"], conditions, strict=True))


def _concat(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys = [k for k in parts[0] if k != "clinical"]
    out = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    out["clinical"] = ECGMeasurements.concatenate([p["clinical"] for p in parts])
    return out


# -- scoring ------------------------------------------------------------------------------------------------------
def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _hr_mae(measured: np.ndarray, condition: np.ndarray) -> dict[str, Any]:
    """The MAE over the rows with a condition heart rate whose ECG could be measured; `unmeasurable` counts the rows
    with a condition whose ECG could not be, `without_condition` those with no condition heart rate (another
    generator's samples may give none): counted as unmeasurable, they made measurable ECGs look broken."""
    known = np.isfinite(condition)
    ok = np.isfinite(measured) & known
    mae = float(np.mean(np.abs(measured[ok] - condition[ok]))) if ok.any() else None
    return {"heart_rate_mae_bpm": mae, "measured": int(ok.sum()), "unmeasurable": int((known & ~ok).sum()),
            "without_condition": int((~known).sum())}


def score(real: Mapping[str, Any], generated: Mapping[str, Any], *, pairs: np.ndarray | None,
          condition_hr: np.ndarray, text_features: np.ndarray | None, subject_ids: np.ndarray | None,
          proto: Protocol, seed: int = 0, n_boot: int = 1000, cluster_unit: str = "patient") -> dict[str, Any]:
    """The three levels, amplitudes and the clinical metrics of `generated` rows against `real` records.

    `pairs` `(n_generated,)`: the real record each generated row was made from (None: unpaired, e.g. another
    generator's samples: no paired clinical comparisons); `condition_hr`, `text_features`, `subject_ids`: per
    generated row, `subject_ids` the clusters of the bootstrap, named by `cluster_unit` in the report.
    """
    n_gen, n_real = len(generated["features"]), len(real["features"])
    signal: dict[str, Any] = {"n_real": n_real, "n_generated": n_gen, "k": proto.k,
                              "fid": _finite_or_none(fid(real["features"], generated["features"]))
                              if min(n_gen, n_real) >= 2 else None}
    if min(n_gen, n_real) >= 4:
        try:
            relative = rfid(real["features"], generated["features"], key=jax.random.PRNGKey(seed))
            signal.update(rfid=_finite_or_none(relative.value),
                          real_vs_real_fid=_finite_or_none(relative.real_vs_real_fid))
        except UndefinedRelativeFID as undefined:
            # Constant real features (a collapsed CLIP) are a finding for the report, as the CLIP score's zero
            # vectors are: the error stopped the run after every ECG was generated and measured, with no report.
            signal.update(rfid=None, real_vs_real_fid=_finite_or_none(undefined.real_vs_real_fid),
                          rfid_note="undefined: the real-vs-real FID is 0 (real CLIP features duplicated or constant)")
    if min(n_gen, n_real) > proto.k:
        pr = precision_recall(real["features"], generated["features"], k=proto.k)
        signal.update(precision=pr.precision, recall=pr.recall, f1=pr.f1)
    feature = {"method": proto.heart_rate_method, **_hr_mae(generated["heart_rate"], condition_hr)}
    if pairs is not None:
        feature["heart_rate_mae_real_bpm"] = _hr_mae(real["heart_rate"][pairs], condition_hr)["heart_rate_mae_bpm"]
    diagnostic = _diagnostic_level(real, generated, pairs=pairs, text_features=text_features)
    amplitude = {
        "lead_std_mv": {lead: {"real": float(r), "generated": float(g)} for lead, r, g in zip(
            STANDARD_LEADS, real["lead_std"].mean(axis=0), generated["lead_std"].mean(axis=0), strict=True)},
        "mean_abs_amplitude_mv": {"real": float(real["abs_amplitude"].mean()),
                                  "generated": float(generated["abs_amplitude"].mean())},
    }
    clinical = compare_measurements(generated["clinical"], None if pairs is None else real["clinical"].take(pairs),
                                    condition_hr, subject_ids, n_boot=n_boot, seed=seed, cluster_unit=cluster_unit,
                                    real_records=pairs)
    return {"signal_level": signal, "feature_level": feature, "diagnostic_level": diagnostic,
            "amplitude": amplitude, "clinical": clinical}


def _diagnostic_level(real: Mapping[str, Any], generated: Mapping[str, Any], *, pairs: np.ndarray | None,
                      text_features: np.ndarray | None) -> dict[str, Any]:
    """The CLIP score of the generated rows against their texts' features (and of their real records when paired);
    nothing without text."""
    diagnostic: dict[str, Any] = {}
    if text_features is not None:
        diagnostic["clip_score_generated"] = clip_score(generated["features"], text_features).mean
        if pairs is not None:
            diagnostic["clip_score_real"] = clip_score(real["features"][pairs], text_features).mean
    return diagnostic


def score_by_condition(real: Mapping[str, Any], generated: Mapping[str, Any], groups: Mapping[str, Sequence[int]],
                       *, pairs: np.ndarray | None, condition_hr: np.ndarray, text_features: np.ndarray | None,
                       proto: Protocol, real_groups: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """One row per condition: records, samples, precision / recall / F1, FID, CLIP score, heart-rate MAE.

    `groups`: condition -> generated row indices. The condition's real records are those rows' `pairs`, or, for
    unpaired samples (`pairs` None), `real_groups[condition]`. `text_features` `(n_generated, d)`: NaN rows for
    samples without a text, which the CLIP score leaves out (`clip_score_samples` then says over how many it is).
    """
    rows = []
    for name, members in groups.items():
        members = np.asarray(members, np.int64)
        if members.size == 0:
            if pairs is None:  # unpaired samples: the split may hold the condition's records though no sample has it
                rows.append({"condition": name, "records": len((real_groups or {}).get(name, [])), "samples": 0,
                             "note": "no sample of this condition"})
            else:
                rows.append({"condition": name, "records": 0, "samples": 0, "note": "no record of this condition"})
            continue
        real_rows = np.unique(pairs[members]) if pairs is not None else np.asarray(
            (real_groups or {}).get(name, []), np.int64)
        if real_rows.size == 0:
            rows.append({"condition": name, "records": 0, "samples": int(members.size),
                         "note": "no real record of this condition in the split"})
            continue
        real_f, gen_f = real["features"][real_rows], generated["features"][members]
        row: dict[str, Any] = {"condition": name, "records": int(real_rows.size), "samples": int(members.size)}
        if min(len(real_f), len(gen_f)) >= 2:
            row["fid"] = _finite_or_none(fid(real_f, gen_f))
        if min(len(real_f), len(gen_f)) > proto.k:
            pr = precision_recall(real_f, gen_f, k=proto.k)
            row.update(precision=pr.precision, recall=pr.recall, f1=pr.f1)
        else:
            row["note"] = f"precision / recall need more than k = {proto.k} records and samples"
        if text_features is not None:
            # Over the samples with a text: one sample without made every condition's score n/a.
            with_text = members[np.isfinite(text_features[members]).all(axis=1)]
            row["clip_score"] = (clip_score(generated["features"][with_text], text_features[with_text]).mean
                                 if with_text.size else None)
            if with_text.size < members.size:
                row["clip_score_samples"] = int(with_text.size)
        row.update(_hr_mae(generated["heart_rate"][members], condition_hr[members]))
        rows.append(row)
    return rows


# -- reports ------------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _condition_hr_cell(row: Mapping[str, Any]) -> str:
    """A condition's heart-rate MAE with how many of its samples it is over: the MAE leaves out the samples whose
    rate could not be measured, and without the count a condition's MAE over 1 of 6 samples read as over all 6."""
    if "measured" not in row:
        return _fmt(row.get("heart_rate_mae_bpm"))
    return f"{_fmt(row.get('heart_rate_mae_bpm'))} ({row['measured']} of {row['measured'] + row['unmeasurable']} measured)"


def _condition_clip_cell(row: Mapping[str, Any]) -> str:
    """A condition's CLIP score, with how many of its samples it is over where some have no text."""
    if "clip_score_samples" not in row:
        return _fmt(row.get("clip_score"))
    return f"{_fmt(row.get('clip_score'))} (over {row['clip_score_samples']} of {row['samples']} with a text)"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the paper's three levels (Table 1's layout), amplitudes, clinical metrics, conditions."""
    s, f, d = report["signal_level"], report["feature_level"], report["diagnostic_level"]
    proto = report.get("protocol", {})
    lines = ["# DiffuSETS evaluation", ""]
    if proto:
        lines += [f"Protocol **{proto.get('name')}**: {proto.get('description')}.", ""]
    if report.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in report["settings"].items()
                                           if not isinstance(v, dict | list)), ""]
    no_condition = f.get("without_condition", 0)
    hr_note = (f"({f['unmeasurable']} of {f['measured'] + f['unmeasurable']} unmeasurable"
               + (f"; {no_condition} without a condition heart rate" if no_condition else "") + f"; {f['method']})")
    # Samples whose prompt has no text embedding are left out of the CLIP score: said beside it, or the score
    # reads as that of the whole set (report.json alone held the count).
    without_text = d.get("samples_without_text", 0)
    clip_note = (f" (over the {s['n_generated'] - without_text} of {s['n_generated']} samples with a text; "
                 f"{without_text} have none)" if without_text else "")
    lines += [
        "| level | metric | generated | real (reference) |",
        "|---|---|---|---|",
        f"| signal | FID (CLIP ECG features) | {_fmt(s.get('fid'))} | 0 |",
        f"| signal | rFID | {_fmt(s.get('rfid'))}{f' ({note})' if (note := s.get('rfid_note')) else ''} "
        f"| 1 (real half vs half: FID {_fmt(s.get('real_vs_real_fid'))}) |",
        f"| signal | precision / recall / F1 (k = {s['k']}) | {_fmt(s.get('precision'), 3)} / "
        f"{_fmt(s.get('recall'), 3)} / {_fmt(s.get('f1'), 3)} | 1 / 1 / 1 |",
        f"| feature | heart-rate MAE (bpm) vs condition | {_fmt(f['heart_rate_mae_bpm'])} {hr_note} "
        f"| {_fmt(f.get('heart_rate_mae_real_bpm'))} |",
        f"| diagnostic | CLIP score | {_fmt(d.get('clip_score_generated'))}{clip_note} "
        f"| {_fmt(d.get('clip_score_real'))} |",
        "",
        f"{s['n_generated']} generated ECGs against {s['n_real']} real ECGs."
        + (f" {failed} more generated ECGs had NaN or inf samples: failed generations, left out of every metric."
           if (failed := report.get("settings", {}).get("failed_generations")) else "")
        + (f" {sum(skipped.values())} more samples of the set were skipped and are in no metric ("
           + ", ".join(f"{why}: {count}" for why, count in skipped.items()) + ")."
           if (skipped := report.get("settings", {}).get("samples_skipped")) else "")
        + (f" {bad} real records of the split have NaN or inf samples and are no reference."
           if (bad := report.get("settings", {}).get("real_records_non_finite")) else ""),
        "",
        "## Model-free clinical metrics",
        "",
        render_clinical_markdown(report["clinical"]).rstrip(),
        "",
        "## Per-lead standard deviation (mV)",
        "",
        "| lead | real | generated |",
        "|---|---|---|",
    ]
    lines += [f"| {lead} | {v['real']:.3f} | {v['generated']:.3f} |"
              for lead, v in report["amplitude"]["lead_std_mv"].items()]
    if report.get("by_condition"):
        lines += ["", "## Per condition", "", "| condition | records | samples | precision | recall | F1 | FID "
                  "| CLIP score | HR MAE (bpm) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["by_condition"]:
            lines.append(f"| {row['condition']} | {row['records']} | {row['samples']} | {_fmt(row.get('precision'), 3)} "
                         f"| {_fmt(row.get('recall'), 3)} | {_fmt(row.get('f1'), 3)} | {_fmt(row.get('fid'))} "
                         f"| {_condition_clip_cell(row)} | {_condition_hr_cell(row)} "
                         f"| {row.get('note', '')} |")
    figures = report.get("figures", {})
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({path})" for name, path in figures.items() if isinstance(path, str)]
    lines += [f"![pair]({name})" for name in figures.get("pairs", [])]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, *, condition_hr: np.ndarray,
                 measured_hr: np.ndarray, examples: Sequence[tuple[np.ndarray, np.ndarray, dict[str, Any]]] = ()
                 ) -> dict[str, Any]:
    """Figures (heart-rate scatter, per-condition bars, real/generated pairs) and report.json / report.md.

    The per-record clinical measurements go to `clinical_per_record.json` (they are large); `report.json` keeps the
    heart rates per record, which the model comparison (`compare_reports`) plots.
    """
    from diffusets_jax.io.plot import plot_condition_bars, plot_heart_rate_scatter, plot_pair

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"heart_rate_scatter": "heart_rate_scatter.png", "pairs": []}
    plot_heart_rate_scatter(condition_hr, measured_hr, path=out / figures["heart_rate_scatter"])
    if report.get("by_condition"):
        figures["by_condition"] = "by_condition.png"
        plot_condition_bars(report["by_condition"], path=out / figures["by_condition"])
    for i, (real, generated, conditions) in enumerate(examples):
        name = f"pair_{i:02d}.png"
        plot_pair(real, generated, conditions=conditions, path=out / name)
        figures["pairs"].append(name)
    clinical = dict(report["clinical"])
    write_json_atomic(out / "clinical_per_record.json", clinical.pop("per_record"))
    report = {**report, "clinical": clinical, "figures": figures,
              "per_record": {"condition_hr": [_finite_or_none(v) for v in np.asarray(condition_hr, float)],
                             "generated_hr": [_finite_or_none(v) for v in np.asarray(measured_hr, float)]}}
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report))
    return report


def model_labels(model_dirs: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> list[str]:
    """One label per model directory: its report's subfolder and its name in the comparison.

    By default `io.names.distinct_names`: `runs/a/model` and `runs/b/model` (train's default WORKDIR/model) are
    `a-model` and `b-model`, not both `model`, whose reports would have been written into one folder. Given labels
    must be distinct names that can be folder names.
    """
    from diffusets_jax.io.names import distinct_names

    resolved = [Path(d).resolve() for d in model_dirs]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ValueError(f"--model-dir {model_dirs[i]} is given twice: give each model directory once")
    if labels is not None:
        if len(labels) != len(model_dirs):
            raise ValueError(f"--labels: give one label per --model-dir ({len(model_dirs)}), got {len(labels)}")
        for label in labels:
            if not label or label in (".", "..") or "/" in label or os.sep in label:
                raise ValueError(f"--labels: {label!r} names the model's report folder: give a plain name")
        if len(set(labels)) != len(labels):
            raise ValueError(f"--labels: {', '.join(labels)} repeat a name: give each model its own")
        return list(labels)
    return distinct_names(resolved)


def compare_reports(reports: Sequence[tuple[str, Mapping[str, Any]]], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Side by side: one heart-rate scatter panel per model (the paper's Fig. 2A: with and without patient
    information) and a table of every level; `comparison.png`, `comparison.md`, `comparison.json`."""
    from diffusets_jax.io.plot import plot_heart_rate_scatter

    out = Path(out_dir)
    panels = [(label, r["per_record"]["condition_hr"], r["per_record"]["generated_hr"]) for label, r in reports]
    plot_heart_rate_scatter(None, None, panels=panels, path=out / "comparison.png")
    table = [{"model": label, "fid": r["signal_level"].get("fid"), "precision": r["signal_level"].get("precision"),
              "recall": r["signal_level"].get("recall"), "f1": r["signal_level"].get("f1"),
              "heart_rate_mae_bpm": r["feature_level"]["heart_rate_mae_bpm"],
              "clip_score": r["diagnostic_level"].get("clip_score_generated")} for label, r in reports]
    lines = ["# Model comparison", "", "![heart rate](comparison.png)", "",
             "| model | FID | precision | recall | F1 | HR MAE (bpm) | CLIP score |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {t['model']} | {_fmt(t['fid'])} | {_fmt(t['precision'], 3)} | {_fmt(t['recall'], 3)} "
              f"| {_fmt(t['f1'], 3)} | {_fmt(t['heart_rate_mae_bpm'])} | {_fmt(t['clip_score'])} |" for t in table]
    comparison = {"models": table, "figure": "comparison.png"}
    write_json_atomic(out / "comparison.json", comparison)
    write_text_atomic(out / "comparison.md", "\n".join(lines) + "\n")
    return comparison


# -- orchestration ------------------------------------------------------------------------------------------------
def select_by_condition(reports: Sequence[Sequence[str]], rules: RuleSet, per_condition: int,
                        seed: int) -> dict[str, list[int]]:
    """Up to `per_condition` record indices per rule, drawn with a generator seeded by `seed` and the rule's name (all
    of them when fewer): a condition's records do not depend on which other conditions are selected, nor on their
    order (seeded by the rule's place in the list, `--conditions af` and the full rule set picked other AF records)."""
    chosen = {}
    for name, members in rules.labels(reports).items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # crc32: the same in every process
        picked = rng.permutation(members)[:per_condition] if len(members) > per_condition else np.asarray(members)
        chosen[name] = sorted(int(i) for i in picked)
    return chosen


def reference_key(seed: int) -> jax.Array:
    """The key of the paper protocol's reference reconstructions (one VAE posterior draw per record)."""
    return jax.random.split(jax.random.PRNGKey(seed))[1]


def _example_conditions(prompt: str, heart_rate: float, sex: int, age: float) -> dict[str, Any]:
    return {"prompt": prompt, "heart_rate": float(heart_rate), "sex": "M" if sex else "F", "age": float(age)}


def evaluate_split(
    generator: Any,
    clip: tuple[Any, Any],
    dataset: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    proto: Protocol = PROTOCOLS["paper"],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    rules: RuleSet | None = None,
    records_per_condition: int = 50,
    samples_per_record: int = 1,
    n_boot: int = 1000,
    workers: int | RecordPool = 1,
    progress: bool = True,
    n_examples: int = 4,
) -> dict[str, Any]:
    """Generate from the conditions of real records of `split` (their stored text embeddings, sex, age and heart
    rate) with `generator` (a `pipeline.ECGGenerator`) and score them against those records (`score`).

    Every record of the split (the first `limit`), or with `rules` up to `records_per_condition` per condition with
    `samples_per_record` samples each, tabulated per condition too. Returns the report (process 0 writes it; other
    hosts return only the settings).
    """
    from diffusets_jax.conditioning.requests import make_condition

    real = read_reference_split(dataset, split, data_dir=data_dir, limit=limit)
    non_finite = _check_finite_records(real, split)
    if rules is not None:
        # A record with NaN or inf samples reads as having no report, so no rule picks it.
        reports = [lines if ok else () for lines, ok in zip(real["report_lines"], real["finite"], strict=True)]
        chosen = select_by_condition(reports, rules, records_per_condition, generator.seed)
        records = sorted({i for members in chosen.values() for i in members})
        if not records:
            raise ValueError(f"no record of split {split!r} matches any condition rule "
                             f"({', '.join(r.name for r in rules.rules)})")
    else:
        chosen, records = {}, np.flatnonzero(real["finite"]).tolist()
    pairs = np.repeat(np.asarray(records, np.int64), samples_per_record)  # generated row -> real record
    conditions = [make_condition(list(real["report_lines"][i]), int(real["sex"][i]), float(real["age"][i]),
                                 float(real["heart_rate"][i]), where=f"{split}[{i}]") for i in pairs]
    # References: this host's share of the records, raw or reconstructed as the protocol says, then measured.
    mine = np.asarray([records[i] for i in parallel.process_share(len(records))], np.int64)
    references = real["ecg"][mine]
    if proto.references == "reconstruction" and len(mine):
        # Through a posterior draw per record, as the published references are; a key apart from the batches' noise
        # (fold_in(PRNGKey(seed), batch)), and folded with the record index, so hosts and batch sizes agree.
        references = generator.reconstruct(references, key=reference_key(generator.seed), rows=mine)
    # One set of measuring processes for the references and every generated batch (starting them takes seconds).
    with record_pool(workers) as pool:
        local_real = {"position": mine, **measure(references, clip, proto.heart_rate_method, pool)} if len(mine) else None
        parts, examples = [], []
        for batch in generator.generate(conditions, progress=progress, text_embeddings=real["text_embedding"][pairs]):
            # A generated ECG with NaN or inf samples is a failed generation: counted in the report and left out of
            # every metric (its CLIP features would make FID and precision/recall undefined).
            finite = finite_ecgs(batch.ecgs)
            rows = np.arange(batch.start, batch.start + len(batch.conditions))[finite]
            if len(rows):
                parts.append({"position": rows, **measure(batch.ecgs[finite], clip, proto.heart_rate_method, pool)})
            for offset, row in zip(np.flatnonzero(finite), rows, strict=True):
                if row < n_examples:
                    i = pairs[row]
                    examples.append((row, real["ecg"][i], batch.ecgs[offset], _example_conditions(
                        real["prompt"][i], real["heart_rate"][i], real["sex"][i], real["age"][i])))
    examples = _gather_examples(examples)  # the first rows are any host's batches
    real_rows = _gather(local_real if local_real is not None else _no_rows(clip))  # sorted by record index
    gen_m = _gather(_concat(parts) if parts else _no_rows(clip))
    kept = gen_m["position"].astype(np.int64)  # the generated rows with a finite ECG, in order
    settings = {"dataset": str(dataset), "split": split, "records": len(records), "samples": len(pairs),
                "samples_per_record": samples_per_record, "failed_generations": len(pairs) - len(kept),
                "real_records_non_finite": non_finite, **generator.settings()}
    if not len(kept):
        raise RunFailed(f"every one of the {len(pairs)} generated ECGs has NaN or inf samples, so there is nothing "
                        "to score: check the model (a diverged training?) and the sampler settings (--dtype, "
                        "--guidance-scale)")
    if jax.process_index() != 0:
        return {"settings": settings, "written_by": 0}
    pairs = pairs[kept]  # from here on, one entry per scored ECG
    pair_rows = np.searchsorted(real_rows["position"], pairs)  # scored ECG -> row of its real record
    module, variables = clip
    text_features = clip_text_features(module, variables, real["text_embedding"][pairs])
    condition_hr = real["heart_rate"][pairs].astype(np.float64)
    report = {"protocol": split_protocol(proto, generator.sampler), "settings": settings,
              **score(real_rows, gen_m, pairs=pair_rows, condition_hr=condition_hr, text_features=text_features,
                      subject_ids=real["subject_id"][pairs], proto=proto, seed=generator.seed, n_boot=n_boot)}
    if rules is not None:
        row_of_record = {int(r): np.flatnonzero(pairs == r) for r in records}
        groups = {name: np.concatenate([row_of_record[i] for i in members]) if members else np.zeros(0, np.int64)
                  for name, members in chosen.items()}
        report["by_condition"] = score_by_condition(real_rows, gen_m, groups, pairs=pair_rows,
                                                    condition_hr=condition_hr, text_features=text_features, proto=proto)
    examples = [e[1:] for e in sorted(examples, key=lambda e: e[0])]
    return write_report(report, out_dir, condition_hr=condition_hr, measured_hr=gen_m["heart_rate"], examples=examples)


def _check_finite_records(real: Mapping[str, Any], split: str) -> int:
    """How many records of a split read by `load_split` have NaN or inf samples (`prepare` keeps a recording with
    missing samples, which resampling spreads over its lead): they are no reference, since their CLIP features made
    FID fail ("non-finite values in the features") after every ECG was generated and measured. One line when no
    record is left."""
    finite = real["finite"]
    if not finite.any():
        raise ValueError(f"every one of the {len(finite)} records read from split {split!r} has NaN or inf samples: "
                         "there is no real ECG to score against; evaluate on another split")
    return int((~finite).sum())


def _take(measures: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    rows = np.asarray(rows, np.int64)
    return {k: (v.take(rows) if k == "clinical" else v[rows]) for k, v in measures.items()}


def _no_rows(clip: tuple[Any, Any]) -> dict[str, Any]:
    """Measurements of zero records (a host with no share), shaped like `measure`'s."""
    module, _ = clip
    return {"position": np.zeros(0, np.int64), "features": np.zeros((0, module.embed_dim), np.float32),
            "heart_rate": np.zeros(0), "lead_std": np.zeros((0, NUM_LEADS), np.float32),
            "abs_amplitude": np.zeros(0, np.float32), "clinical": measure_ecgs(np.zeros((0, *ECG_SHAPE)))}


GENERATED_CLUSTERS = "patient, else the condition generated from"  # what `sample_clusters` groups by


def sample_clusters(generated: Any) -> np.ndarray:
    """The bootstrap cluster of each sample of `generated` (`io.generated.GeneratedSet`) `(n,)` str: its patient
    where the set names one; else the condition it was generated from (its text, sex, age and heart rate), since
    `sample -n S` or a conditions file's count draws several samples of one record, which are not independent (each
    its own cluster made the intervals too narrow); else (no text) the sample alone. Two records of one condition
    fall into one cluster: a wider interval, never a narrower one."""
    patients = generated.subject_id if generated.subject_id is not None else [""] * len(generated.ecg)
    clusters = []
    for i, (patient, report, prompt) in enumerate(zip(patients, generated.reports, generated.prompts, strict=True)):
        if patient:
            clusters.append(f"patient {patient}")
        elif report or prompt:
            clusters.append(f"condition {'|'.join(report)} / {prompt} / sex {int(generated.sex[i])} / "
                            f"age {float(generated.age[i]):g} / {float(generated.heart_rate[i]):g} bpm")
        else:
            clusters.append(f"sample {i}")
    return np.asarray(clusters, dtype=object)


def evaluate_generated(
    generated: Any,
    clip: tuple[Any, Any],
    dataset: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    proto: Protocol = PROTOCOLS["fast"],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    rules: RuleSet | None = None,
    embedder: Any = None,
    n_boot: int = 1000,
    workers: int | RecordPool = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Score another generator's samples (`io.generated.GeneratedSet`) against a prepared split, no model needed.

    The real split is the reference distribution (signal level); heart rate and the clinical metrics compare each
    sample with its own condition; the CLIP score needs each sample's text embedding: the one it carries, the
    split's embedding of the same prompt, or `embedder` (the CLIP's training embedder); samples with none are left
    out of the CLIP score and counted. With `rules`, conditions come from the samples' own reports.
    """
    generated = finite_only(generated)
    real = read_reference_split(dataset, split, data_dir=data_dir, limit=limit)
    non_finite = _check_finite_records(real, split)
    usable = np.flatnonzero(real["finite"])  # the reference records; every record's prompt still gives its text
    module, variables = clip
    with record_pool(workers) as pool:  # one set of measuring processes for both sets
        real_m = {"position": np.arange(len(usable)),
                  **measure(real["ecg"][usable], clip, proto.heart_rate_method, pool)}
        gen_m = {"position": np.arange(len(generated.ecg)),
                 **measure(generated.ecg, clip, proto.heart_rate_method, pool)}
    embeddings = generated.text_embedding
    missing_text = 0
    if embeddings is None:
        table = dict(zip(real["prompt"], real["text_embedding"], strict=True))
        texts = list(generated.prompts)
        if generated.statements:
            # Samples that carry report statements but no prompt (an NPZ's `report` alone) have the statements
            # joined with '|' as theirs, which is no prompt style: the split's record with the same statements
            # holds the embedding of their prompt in the split's style.
            prompt_of = {tuple(lines): p for lines, p in zip(real["report_lines"], real["prompt"], strict=True)}
            texts = [p if p in table else prompt_of.get(tuple(lines), p)
                     for p, lines in zip(texts, generated.reports, strict=True)]
        unknown = sorted({p for p in texts if p and p not in table})
        if unknown and embedder is not None:
            table.update(zip(unknown, np.asarray(embedder.embed(unknown), np.float32), strict=True))
        have = np.asarray([p in table for p in texts])
        missing_text = int((~have).sum())
        embeddings = np.stack([table[p] for p, ok in zip(texts, have, strict=True) if ok]) if have.any() else None
    else:
        have = np.ones(len(generated.ecg), bool)
    text_features = None if embeddings is None else clip_text_features(module, variables, embeddings)
    # Per sample `(n, d)`: NaN rows for the samples without a text, which a condition's CLIP score leaves out.
    sample_text = None
    if text_features is not None:
        sample_text = np.full((len(have), text_features.shape[1]), np.nan, np.float32)
        sample_text[have] = text_features
    # Every level but the CLIP score is computed over every sample; the CLIP score over those with a text, and not
    # at all when none has one (scoring an empty selection only to drop it printed numpy's warnings).
    summary = score(real_m, gen_m, pairs=None, condition_hr=generated.heart_rate,
                    text_features=None if missing_text else text_features, subject_ids=sample_clusters(generated),
                    proto=proto, seed=seed, n_boot=n_boot, cluster_unit=GENERATED_CLUSTERS)
    if missing_text:
        summary["diagnostic_level"] = {
            **_diagnostic_level(real_m, _take(gen_m, np.flatnonzero(have)), pairs=None, text_features=text_features),
            "samples_without_text": missing_text}
    report = {"protocol": generated_protocol(proto),
              "settings": {"generated": generated.source, "dataset": str(dataset), "split": split,
                           "samples": len(generated.ecg), "samples_skipped": generated.skipped,
                           "real_records_non_finite": non_finite}, **summary}
    if rules is not None:
        labels = rules.labels(generated.reports)
        report["by_condition"] = score_by_condition(
            real_m, gen_m, labels, pairs=None, condition_hr=generated.heart_rate, text_features=sample_text, proto=proto,
            real_groups=rules.labels([real["report_lines"][i] for i in usable]))
    return write_report(report, out_dir, condition_hr=generated.heart_rate, measured_hr=gen_m["heart_rate"])

