"""The paper's data-augmentation benchmark: does adding generated minority-class ECGs help a classifier?

For each diagnostic task (a whole-word keyword rule over the report, `experiments.keyword_rules`, shipped in
`experiments/data/downstream_rules.json`: normal vs abnormal, atrial fibrillation vs not, PVC vs not, or a user's
rule), a Net1D classifier (`train.classifier`, trained by the generic
loop) is trained in several arms and tested on the same real test records:

- `real`: the real training records (after `minority_fraction` subsampling of the minority class);
- `weighted`: the same records, loss weighted by inverse class frequency;
- `augmented`: the same records plus `round(ratio * n_minority)` generated ECGs of the minority class, made from
  the kept minority records' own conditions (stored text embedding, sex, age, heart rate) through a model
  directory (`pipeline.ECGGenerator`), or drawn from a corpus written by `sample --corpus` (its records labelled
  by the same rule);
- `synthetic` (train on synthetic, test on real): generated ECGs only, one from each kept training record's
  conditions with that record's label (or, from a corpus, every corpus record labelled by the rule).

Protocol (stated in the report): the splits are the prepared dataset's patient-disjoint train / validation /
test, or with `resplit` a patient-disjoint re-split of all records stratified by the task's label (for datasets
too small for their own test split, such as the demo's 40 records). Every arm trains for the config's fixed
number of steps (no early stopping); the final weights are evaluated. The decision threshold maximises F1 on the
real validation records (0.5 when they hold no positive); F1, sensitivity and specificity use it, and F1 at 0.5
is reported too. AUROC and AUPRC (average precision) need no threshold. Each arm runs with several seeds (the
classifier's initialisation, dropout and batch order, the minority subsample and the generation noise); the
report gives the mean +- sd over seeds and a 95 % bootstrap interval of that mean over test patients (all seeds
scored on the same resamples), plus each arm's paired difference to `real`.

Generated ECGs get their own noise per (task, seed): the generator's batch `b` of pair `k` uses noise index
`k * NOISE_STRIDE + b`. Everything a finished part computed is kept in the output folder (per-arm predictions,
generated ECGs), so rerunning the same command after an interruption resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from diffusets_jax.config import SHIPPED_CONFIGS
from diffusets_jax.ecg.units import finite_ecgs
from diffusets_jax.errors import Preempted
from diffusets_jax.experiments.keyword_rules import (
    DOWNSTREAM_RULES,
    KeywordRule,
    RuleSet,
    load_rules,
    parse_rule,
)
from diffusets_jax.io.files import (
    atomic_path,
    read_json,
    remove_temporaries_in,
    write_json_atomic,
    write_text_atomic,
)
from diffusets_jax.metrics.bootstrap import bootstrap_statistic
from diffusets_jax.metrics.classification import (
    average_precision,
    f1_threshold,
    logit_midpoint,
    roc_auc,
    threshold_metrics,
)

log = logging.getLogger(__name__)

ARMS: tuple[str, ...] = ("real", "weighted", "augmented", "synthetic")
GENERATED_ARMS: tuple[str, ...] = ("augmented", "synthetic")
ARM_TITLES = {"real": "real only", "weighted": "real, class-weighted loss", "augmented": "real + generated minority",
              "synthetic": "generated only (train on synthetic, test on real)"}
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# (key, label) of the reported metrics; F1, sensitivity and specificity at the validation-chosen threshold.
METRICS: tuple[tuple[str, str], ...] = (("f1", "F1"), ("f1_at_0.5", "F1 @ 0.5"), ("auroc", "AUROC"),
                                        ("auprc", "AUPRC"), ("sensitivity", "sensitivity"),
                                        ("specificity", "specificity"))
DELTA_METRICS: tuple[str, ...] = ("f1", "auroc", "auprc")
NOISE_STRIDE = 2**20  # generator batches per (task, seed): 67 M ECGs at batch 64 before two pairs could share noise
FIGURE = "downstream.png"
DEFAULT_CONFIG = SHIPPED_CONFIGS / "downstream_net1d.py"
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")  # names become folder names under runs/


def select_tasks(names: Sequence[str] | None, specs: Sequence[str] = (),
                 files: Sequence[str | os.PathLike] = ()) -> RuleSet:
    """The tasks to run: `names` among the shipped tasks (`DOWNSTREAM_RULES`), those of the rule `files`
    (`keyword_rules.load_rules`) and the `specs` (`keyword_rules.parse_rule`, whole words), a later definition of a
    name replacing an earlier one; every spec runs; None: all of them. The `skip_reports_with` phrases of every
    file given hold for every task (those records are left out)."""
    sets = [load_rules(DOWNSTREAM_RULES), *(load_rules(path) for path in files)]
    given = [parse_rule(spec) for spec in specs]
    defined = {rule.name: rule for rules in sets for rule in rules.rules}
    defined.update({rule.name: rule for rule in given})
    chosen = list(defined) if names is None else [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in chosen if n not in defined]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(defined)} (define one with "
                         "--task NAME=keyword1|keyword2[!exclusion])")
    order = list(dict.fromkeys([*chosen, *(rule.name for rule in given)]))
    if not order:
        raise ValueError("--tasks: no task selected")
    bad = [n for n in order if not TASK_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"task name(s) {', '.join(map(repr, bad))}: use lower-case letters, digits, '_' or '-' "
                         "(e.g. af, lbbb); the name becomes a folder name")
    skip = tuple(dict.fromkeys(phrase for rules in sets for phrase in rules.skip_reports_with))
    return RuleSet(tuple(defined[n] for n in order), skip)


# ----------------------------------------------------------------------------------------------------------------
# Records and splits


@dataclasses.dataclass
class Records:
    """Host arrays of labelled ECG records: `ecg` (n, 1024, 12) float32 mV, `report_lines` n tuples of statements,
    `text_embedding` (n, D) float32, `sex` (n,) int, `age` (n,), `heart_rate` (n,) bpm, `subject_id` (n,) int."""

    ecg: np.ndarray
    report_lines: list[tuple[str, ...]]
    text_embedding: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    heart_rate: np.ndarray
    subject_id: np.ndarray

    def __len__(self) -> int:
        return len(self.ecg)

    @classmethod
    def concatenate(cls, parts: Sequence[Records]) -> Records:
        """`parts` one after another, field by field (so a field added to Records is pooled too)."""
        return cls(*([row for p in parts for row in getattr(p, f.name)] if f.name == "report_lines"
                     else np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))

    def take(self, indices: np.ndarray, *, in_place: bool = False) -> Records:
        """The records at `indices`. `in_place` (increasing indices): move the ECG rows forward within this array
        instead of copying them out, so a whole split is never held twice; this Records is not to be used after."""
        indices = np.asarray(indices, dtype=np.int64)
        if in_place:
            for row, index in enumerate(indices):
                if row != index:
                    self.ecg[row] = self.ecg[index]
            ecg = self.ecg[: len(indices)]
        else:
            ecg = self.ecg[indices]
        return Records(ecg, [self.report_lines[i] for i in indices], self.text_embedding[indices],
                       self.sex[indices], self.age[indices], self.heart_rate[indices], self.subject_id[indices])


def load_records(dataset: str | os.PathLike, split: str, *, data_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> tuple[Records, int]:
    """`(records, dropped)`: a split read with `experiments.evaluate.load_split`, without the records whose ECG
    holds a non-finite sample (counted in `dropped`; a NaN would poison the classifier's BatchNorm statistics)."""
    from diffusets_jax.experiments.evaluate import load_split

    arrays = load_split(dataset, split, data_dir=data_dir, limit=limit)
    finite = arrays["finite"]
    # np.asarray: no copy of the ECGs when they are float32 already (they are, as prepared), and the non-finite
    # ones are dropped in place: the split is held once (39 GB for all of MIMIC-IV-ECG; three times before).
    records = Records(np.asarray(arrays["ecg"], np.float32), list(arrays["report_lines"]),
                      np.asarray(arrays["text_embedding"], np.float32), arrays["sex"].astype(np.int64),
                      arrays["age"].astype(np.float64), arrays["heart_rate"].astype(np.float64),
                      arrays["subject_id"].astype(np.int64))
    del arrays
    return (records if finite.all() else records.take(np.flatnonzero(finite), in_place=True)), int((~finite).sum())


def load_pooled_records(dataset: str | os.PathLike, *, limit: int | None = None) -> tuple[Records, int]:
    """`load_records` of every split of `dataset` pooled, for `--resplit`: the whole dataset, or with `limit` the
    first `limit` records of each split (as `--limit` reads them without `--resplit`; the first `limit` of the
    pooled records were all training records, and the test split's never came)."""
    if limit is None:
        return load_records(dataset, "all")
    from diffusets_jax.data import pipeline

    parts = [load_records(dataset, split, limit=limit) for split in pipeline.load_builder(dataset).info.splits]
    return Records.concatenate([part for part, _ in parts]), sum(dropped for _, dropped in parts)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """`'0.6:0.2:0.2'` -> train, validation, test fractions (positive, normalised to sum 1)."""
    parts = str(text).replace(",", ":").split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--resplit {text!r}: give three positive train:validation:test fractions, e.g. 0.5:0.25:0.25")
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def stratified_group_split(groups: np.ndarray, labels: np.ndarray, fractions: Sequence[float], seed: int
                           ) -> tuple[np.ndarray, ...]:
    """Record indices of each split: patients (`groups`) are dealt whole, so the splits are patient-disjoint,
    separately for patients with a positive record and the others, so each split gets its share of both.

    Within a stratum of m patients split k gets `floor(f_k m)` plus one of the largest remainders; when m is at
    least the number of splits, every split gets at least one (taken from the largest).
    """
    groups, labels = np.asarray(groups), np.asarray(labels).astype(bool)
    patients, patient_of = np.unique(groups, return_inverse=True)
    positive_patient = np.zeros(len(patients), bool)
    np.logical_or.at(positive_patient, patient_of, labels)
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(patients), np.int64)
    fractions = np.asarray(fractions, np.float64)
    for stratum in (np.flatnonzero(positive_patient), np.flatnonzero(~positive_patient)):
        m = len(stratum)
        counts = np.floor(fractions * m).astype(np.int64)
        for k in np.argsort(-(fractions * m - counts), kind="stable")[: m - counts.sum()]:
            counts[k] += 1
        if m >= len(fractions):
            while (counts == 0).any():
                counts[np.argmax(counts)] -= 1
                counts[np.flatnonzero(counts == 0)[0]] += 1
        assignment[rng.permutation(stratum)] = np.repeat(np.arange(len(fractions)), counts)
    return tuple(np.flatnonzero(assignment[patient_of] == k) for k in range(len(fractions)))


def subsample_minority(labels: np.ndarray, minority: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices kept: every majority record and `max(1, round(fraction * n_minority))` minority ones."""
    labels = np.asarray(labels).astype(np.int64)
    minority_idx = np.flatnonzero(labels == minority)
    keep = max(1, round(fraction * len(minority_idx)))
    chosen = rng.choice(minority_idx, size=min(keep, len(minority_idx)), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(labels != minority), chosen]))


# ----------------------------------------------------------------------------------------------------------------
# Generated ECGs


def generate_from_records(generator: Any, records: Records, indices: np.ndarray, noise_offset: int,
                          progress: bool = True, desc: str = "generating") -> np.ndarray:
    """ECGs `(len(indices), 1024, 12)` float32 mV, one from each record's conditions (its stored text embedding,
    sex, age and heart rate; `indices` may repeat a record), with noise indices from `noise_offset` on."""
    from diffusets_jax.conditioning.requests import make_condition
    from diffusets_jax.io.progress import progress_bar

    conditions = [make_condition(list(records.report_lines[i]), int(records.sex[i]), float(records.age[i]),
                                 float(records.heart_rate[i]), where=f"training record {i}") for i in indices]
    embeddings = records.text_embedding[np.asarray(indices, np.int64)]
    out = np.zeros((len(conditions), *records.ecg.shape[1:]), np.float32)
    size = generator.batch_size
    with progress_bar(len(conditions), desc=desc, unit="ECG", disable=not progress) as bar:
        starts = range(0, len(conditions), size)
        jobs = ((generator.condition_arrays(conditions[start:start + size], embeddings[start:start + size]),
                 noise_offset + batch) for batch, start in enumerate(starts))
        for start, ecgs in zip(starts, generator.generate_batches(jobs), strict=True):
            out[start:start + len(ecgs)] = ecgs
            bar.update(len(ecgs))
    return out


@dataclasses.dataclass
class Generated:
    """Generated training ECGs of one (task, seed): `augment` (minority class) and `synthetic` with `labels`; an
    arm whose set is None is skipped for `reason[arm]`."""

    augment: np.ndarray | None = None
    synthetic: np.ndarray | None = None
    synthetic_labels: np.ndarray | None = None
    reason: dict[str, str] = dataclasses.field(default_factory=dict)
    note: dict[str, str] = dataclasses.field(default_factory=dict)


def _generated_from_model(generator: Any, train: Records, kept: np.ndarray, labels: np.ndarray, minority: int,
                          n_augment: int, arms: Sequence[str], noise_offset: int, rng: np.random.Generator,
                          cache: Path, progress: bool) -> Generated:
    if cache.exists():
        with np.load(cache) as saved:
            return _without_failed(Generated(saved["augment"] if "augment" in saved else None,
                                             saved["synthetic"] if "synthetic" in saved else None,
                                             saved["synthetic_labels"] if "synthetic_labels" in saved else None))
    sources = []
    if "augmented" in arms:
        minority_records = kept[labels[kept] == minority]
        # Every kept minority record in turn, in a seeded order, until n_augment: each is used ratio times +- 1.
        cycle = np.concatenate([rng.permutation(minority_records) for _ in range(-(-n_augment // len(minority_records)))])
        sources.append(("augment", cycle[:n_augment]))
    if "synthetic" in arms:
        sources.append(("synthetic", kept))
    indices = np.concatenate([s for _, s in sources])
    ecgs = generate_from_records(generator, train, indices, noise_offset, progress, desc=f"generating ({cache.stem})")
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, source in sources:
        out[name] = ecgs[start:start + len(source)]
        start += len(source)
    if "synthetic" in out:
        out["synthetic_labels"] = labels[kept].astype(np.int8)
    with atomic_path(cache, suffix=".npz") as temporary:
        np.savez(temporary, **out)
    return _without_failed(Generated(out.get("augment"), out.get("synthetic"), out.get("synthetic_labels")))


def _without_failed(generated: Generated) -> Generated:
    """`generated` without its ECGs with NaN or inf samples (failed generations, which would poison a classifier's
    BatchNorm statistics as a non-finite real record would), each arm noting how many it lost; an arm that lost
    all of them is skipped with the reason. The cache keeps them, so the note is the same on a resume."""
    for arm, name in (("augmented", "augment"), ("synthetic", "synthetic")):
        ecgs = getattr(generated, name)
        if ecgs is None:
            continue
        finite = finite_ecgs(ecgs)
        if finite.all():
            continue
        failed = f"{int((~finite).sum())} of its {len(ecgs)} generated ECGs had NaN or inf samples"
        if not finite.any():
            generated.reason[arm] = failed
            setattr(generated, name, None)
            continue
        generated.note[arm] = failed + " and were left out"
        setattr(generated, name, ecgs[finite])
        if name == "synthetic":
            generated.synthetic_labels = generated.synthetic_labels[finite]
    return generated


def _generated_from_corpus(corpus: Records, corpus_labels: np.ndarray, minority: int, n_augment: int,
                           arms: Sequence[str], rng: np.random.Generator) -> Generated:
    generated = Generated()
    if "augmented" in arms:
        pool = np.flatnonzero(corpus_labels == minority)
        if len(pool) == 0:
            generated.reason["augmented"] = (f"the corpus holds no record of the minority class "
                                             f"({'positive' if minority else 'negative'})")
        else:
            take = rng.choice(pool, size=min(n_augment, len(pool)), replace=False)
            generated.augment = corpus.ecg[np.sort(take)]
            if len(pool) < n_augment:
                generated.note["augmented"] = f"the corpus holds only {len(pool)} of the {n_augment} minority ECGs asked for"
    if "synthetic" in arms:
        if corpus_labels.all() or not corpus_labels.any():
            generated.reason["synthetic"] = "the corpus holds records of one class only"
        else:
            generated.synthetic, generated.synthetic_labels = corpus.ecg, corpus_labels.astype(np.int8)
    return generated


# ----------------------------------------------------------------------------------------------------------------
# Training and scoring one arm


def _arm_data(arm: str, train: Records, kept: np.ndarray, labels: np.ndarray, minority: int,
              generated: Generated) -> dict[str, np.ndarray]:
    from diffusets_jax.train.classifier import balanced_weights

    real_ecg, real_labels = train.ecg[kept], labels[kept].astype(np.float32)
    if arm in ("real", "weighted"):
        ecg, y = real_ecg, real_labels
    elif arm == "augmented":
        ecg = np.concatenate([real_ecg, generated.augment])
        y = np.concatenate([real_labels, np.full(len(generated.augment), minority, np.float32)])
    else:
        ecg, y = generated.synthetic, generated.synthetic_labels.astype(np.float32)
    weight = balanced_weights(y) if arm == "weighted" else np.ones(len(y), np.float32)
    return {"ecg": ecg, "label": y, "weight": weight}


def _train_arm(compiled: Any, config: Any, workdir: Path, data: Mapping[str, np.ndarray], seed: int,
               val_ecg: np.ndarray, test_ecg: np.ndarray, predict: Any) -> tuple[np.ndarray, np.ndarray]:
    """Train from scratch (resuming a checkpoint of an interrupted run) with the shared compiled programs
    (`loop.CompiledSteps`); `(validation logits, test logits)`. No periodic validation: the predictions on the
    validation records are made once, at the end, by `predict`."""
    from diffusets_jax.train.classifier import array_batches
    from diffusets_jax.train.loop import train

    config = config.copy_and_resolve_references()
    config.train.seed = seed
    result = train(compiled.task, config, workdir, array_batches(data, int(config.train.global_batch_size), seed),
                   mesh=compiled.mesh, compiled=compiled)
    if result.preempted:
        raise Preempted(f"preempted (SIGTERM) at step {result.step} of {workdir}; checkpoint saved, rerun to resume")
    variables = {"params": result.state.eval_params(), **result.state.model_state}
    return predict(variables, val_ecg), predict(variables, test_ecg)


def seed_metrics(labels: np.ndarray, logits: np.ndarray, threshold: float) -> dict[str, float]:
    """The reported metrics of one classifier from its `logits` `(n,)` on these records: F1, sensitivity and
    specificity at `threshold`, a logit (`logit >= threshold` is positive; probability 0.5 is logit 0). Everything
    is on the logits themselves, because float64 rounds the probability of every logit above ~37 to exactly 1.0,
    tying records the classifier ranks apart (AUROC and AUPRC fell towards chance, thresholds could not part them)."""
    logits = np.asarray(logits, np.float64)
    at = threshold_metrics(labels, logits, threshold)
    return {"f1": at.f1, "f1_at_0.5": threshold_metrics(labels, logits, 0.0).f1,
            "auroc": roc_auc(labels, logits), "auprc": average_precision(labels, logits),
            "sensitivity": at.sensitivity, "specificity": at.specificity}


def summarize_arms(labels: np.ndarray, groups: np.ndarray, logits: Mapping[str, Sequence[np.ndarray]],
                   thresholds: Mapping[str, Sequence[float]], *, n_boot: int, seed: int) -> dict[str, Any]:
    """Per arm: each seed's metrics, their mean and sd, the 95 % bootstrap interval of the seed mean over test
    patients (`groups`), and, for arms other than `real`, the paired difference to `real` with its interval.

    `logits[arm]`: one `(n,)` array per seed; `thresholds[arm]`: one threshold per seed, a logit.
    """
    metric_keys = [key for key, _ in METRICS]

    def seed_mean(arm: str, idx: np.ndarray) -> dict[str, float]:
        rows = [seed_metrics(labels[idx], z[idx], t) for z, t in zip(logits[arm], thresholds[arm], strict=True)]
        return {k: float(np.mean([r[k] for r in rows])) for k in metric_keys}

    def values(idx: np.ndarray) -> dict[str, float]:
        means = {arm: seed_mean(arm, idx) for arm in logits}
        out = {f"{arm}/{k}": v for arm, m in means.items() for k, v in m.items()}
        if "real" in means:
            out.update({f"{arm}-real/{k}": means[arm][k] - means["real"][k]
                        for arm in means if arm != "real" for k in DELTA_METRICS})
        return out

    intervals = bootstrap_statistic(values, groups, n_boot=n_boot, seed=seed)
    summary: dict[str, Any] = {}
    for arm in logits:
        per_seed = [seed_metrics(labels, z, t) for z, t in zip(logits[arm], thresholds[arm], strict=True)]
        summary[arm] = {
            "seeds": [{"threshold": float(expit(t)), "threshold_logit": float(t), **{k: _finite(v) for k, v in m.items()}}
                      for t, m in zip(thresholds[arm], per_seed, strict=True)],
            "metrics": {k: {"mean": _finite(np.mean([m[k] for m in per_seed])),
                            "sd": _finite(np.std([m[k] for m in per_seed], ddof=1)) if len(per_seed) > 1 else None,
                            "ci": intervals[f"{arm}/{k}"].to_json()} for k in metric_keys},
        }
        if arm != "real" and "real" in logits:
            summary[arm]["difference_to_real"] = {k: intervals[f"{arm}-real/{k}"].to_json() for k in DELTA_METRICS}
    return summary


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def settings_of(*, dataset: str | os.PathLike, data_dir: str | os.PathLike | None, rules: RuleSet,
                arms: Sequence[str], seeds: int, ratio: float, minority_fraction: float, config: Any,
                model_dir: str | os.PathLike | None, generated_corpus: str | os.PathLike | None, sampler: Any,
                resplit: tuple[float, float, float] | None, limit: int | None, n_boot: int,
                generation_batch_size: int) -> dict[str, Any]:
    """Everything that determines the report (the output folder's fingerprint)."""
    from diffusets_jax.config import config_to_dict
    from diffusets_jax.data.card import card_fingerprint

    config_dict = config_to_dict(config)
    config_dict["train"].pop("progress_bar", None)  # how it looks, not what it computes: --no-progress may resume
    settings: dict[str, Any] = {
        "dataset": os.path.abspath(dataset), "data_dir": None if data_dir is None else os.path.abspath(data_dir),
        "dataset_card": card_fingerprint(dataset),  # another build at this path is another input, not a resume
        "tasks": [r.to_json() for r in rules.rules], "skip_reports_with": list(rules.skip_reports_with),
        "arms": list(arms), "seeds": int(seeds), "ratio": float(ratio),
        "minority_fraction": float(minority_fraction), "resplit": None if resplit is None else list(resplit),
        "limit": limit, "n_boot": int(n_boot), "config": config_dict}
    if limit is not None and resplit is not None:
        # With --resplit, --limit took the first N pooled records until it took N of each split: a folder of the
        # earlier reading is another input, not one to resume.
        settings["limit_per_split"] = True
    if model_dir is not None:
        from diffusets_jax.diffusion.samplers import resolve_for_model
        from diffusets_jax.models import model_dir as model_dirs

        index = model_dirs.read_index(model_dir)
        settings["generator"] = {"model_dir": os.path.abspath(model_dir),
                                 # The generating parts only: adding a CLIP to the folder changes no ECG.
                                 "components": {n: index.components.get(n, {}).get("uid") for n in ("vae", "unet")},
                                 # As the generator resolves it from the model (its latent std sets the grid).
                                 "sampler": resolve_for_model(sampler, index.diffusion).record(),
                                 "batch_size": int(generation_batch_size)}
    if generated_corpus is not None:
        from diffusets_jax.data.card import read_card
        from diffusets_jax.experiments.evaluate import ecg_dataset

        corpus_builder = ecg_dataset(generated_corpus, flag="--generated-corpus", kind="corpus")
        if "train" not in corpus_builder.info.splits:
            raise ValueError(f"--generated-corpus {generated_corpus}: no train split (it has "
                             f"{sorted(corpus_builder.info.splits)}); give the folder `sample --corpus` wrote")
        card = read_card(os.fspath(generated_corpus))
        settings["generated_corpus"] = {"path": os.path.abspath(generated_corpus), "splits": card.get("splits"),
                                        "derived_from": card.get("derived_from", {}),
                                        "card": card_fingerprint(corpus_builder)}
    return settings


def check_arguments(*, arms: Sequence[str], seeds: int, ratio: float, minority_fraction: float, n_boot: int,
                    model_dir: str | os.PathLike | None, generated_corpus: str | os.PathLike | None,
                    limit: int | None) -> None:
    """One line for any bad argument, before anything is loaded."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"--arms: {', '.join(arms)} names an arm twice")
    if model_dir is not None and generated_corpus is not None:
        raise ValueError("give either --model-dir (generate now) or --generated-corpus (read generated ECGs), not both")
    needs = [a for a in arms if a in GENERATED_ARMS]
    if needs and model_dir is None and generated_corpus is None:
        raise ValueError(f"arm(s) {', '.join(needs)} need generated ECGs: pass --model-dir MODEL or "
                         "--generated-corpus DIR, or leave them out (--arms real,weighted)")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive number of training seeds, got {seeds}")
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"--ratio must be a positive number of generated ECGs per minority record, got {ratio}")
    if not (math.isfinite(minority_fraction) and 0 < minority_fraction <= 1):
        raise ValueError(f"--minority-fraction must be in (0, 1], got {minority_fraction}")
    if n_boot < 100:
        raise ValueError(f"--n-boot must be at least 100 resamples for a 95 % interval, got {n_boot}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of records, got {limit}")
    for flag, path in (("--model-dir", model_dir), ("--generated-corpus", generated_corpus)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such directory")


def run_downstream(
    dataset: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rules: RuleSet,
    config: Any,
    arms: Sequence[str] | None = None,
    seeds: int = 3,
    ratio: float = 1.0,
    minority_fraction: float = 1.0,
    data_dir: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    generated_corpus: str | os.PathLike | None = None,
    sampler: Any = None,
    generation_batch_size: int = 64,
    resplit: tuple[float, float, float] | None = None,
    limit: int | None = None,
    n_boot: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) into `out_dir`; returns the report (also `report.json`,
    `report.md` and `downstream.png` there).

    `config`: the classifier config (`configs/downstream_net1d.py`, model_kind "classifier"). `arms` default:
    real and weighted, plus augmented when a generator (`model_dir`) or a corpus (`generated_corpus`) is given.
    `sampler`: the generator's `SamplerConfig` (default DPM-Solver++(2M), 20 steps).
    """
    from diffusets_jax import parallel
    from diffusets_jax.data.card import read_card
    from diffusets_jax.data.location import dataset_folder
    from diffusets_jax.diffusion.samplers import check_steps, sampler_config
    from diffusets_jax.experiments.evaluate import ecg_dataset
    from diffusets_jax.io.run_dir import check_output_path, output_dir, reading
    from diffusets_jax.train.classifier import build_classifier, classifier_task, make_predictor
    from diffusets_jax.train.loop import CompiledSteps
    from diffusets_jax.train.run import check_train_section

    if arms is None:
        arms = ("real", "weighted") + (("augmented",) if model_dir is not None or generated_corpus is not None else ())
    arms = tuple(arms)
    check_arguments(arms=arms, seeds=seeds, ratio=ratio, minority_fraction=minority_fraction, n_boot=n_boot,
                    model_dir=model_dir, generated_corpus=generated_corpus, limit=limit)
    if not rules.rules:
        raise ValueError("no task to run")
    reads = [("--dataset", dataset_folder(dataset)), ("--data-dir", data_dir), ("--model-dir", model_dir),
             ("--generated-corpus", generated_corpus)]
    check_output_path(out_dir, overwrite=overwrite, reads=reads)
    model = build_classifier(config)
    # Net1D checks its widths (filters against blocks_per_stage, against base_filters, the groups) when it is first
    # traced: traced here, shapes only, so that a bad --config.model value is one line before --out is claimed, not
    # after the minority ECGs were generated (hours with the published sampler) and in a folder a fixed rerun is
    # then refused.
    import jax

    from diffusets_jax.ecg.shapes import ECG_LENGTH

    jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, ECG_LENGTH, model.in_channels), np.float32)))
    num_steps = int(config.train.num_steps)
    if num_steps < 1:
        raise ValueError(f"train.num_steps must be a positive number of steps (--steps), got {num_steps}")
    check_train_section(config, "the classifier config")
    if data_dir is None and not Path(dataset).is_dir():
        raise FileNotFoundError(f"--dataset {dataset}: no such directory (give a prepared dataset's directory, the "
                                "one holding dataset_info.json, or a TFDS name with --data-dir)")
    builder = ecg_dataset(dataset, data_dir, kind="prepared")
    card = read_card(builder)
    missing = [s for s in SPLITS if s not in builder.info.splits] if resplit is None else []
    if missing:
        raise ValueError(f"dataset {builder.name!r} has no {', '.join(missing)} split(s) (it has "
                         f"{sorted(builder.info.splits)}): pass --resplit TRAIN:VALIDATION:TEST to split it by patient")
    generator_needed = model_dir is not None and any(a in GENERATED_ARMS for a in arms)
    sampler = sampler if sampler is not None else sampler_config("dpmpp_2m")
    if model_dir is not None:
        from diffusets_jax.models import model_dir as model_dirs

        index = model_dirs.read_index(model_dir)
        model_dirs.require(index, model_dir, "vae", "unet")
        if generator_needed:  # its generator is built once --out is claimed and the records are read
            check_steps(sampler, index.diffusion.schedule.num_timesteps, "--sampling-steps")
        from diffusets_jax.data.card import check_embeddings_fit

        check_embeddings_fit(index.conditioning, card, model=f"the U-Net of --model-dir {model_dir}",
                             data=f"--dataset {builder.data_dir}",
                             remedy="use a dataset prepared with the model's embedder, or write a corpus with "
                                    "`diffusets-jax sample --corpus` and pass --generated-corpus")
    settings = settings_of(dataset=builder.data_dir, data_dir=None, rules=rules, arms=arms, seeds=seeds, ratio=ratio,
                           minority_fraction=minority_fraction, config=config, model_dir=model_dir,
                           generated_corpus=generated_corpus, sampler=sampler, resplit=resplit, limit=limit,
                           n_boot=n_boot, generation_batch_size=generation_batch_size)

    with output_dir(out_dir, command="downstream", settings=settings, overwrite=overwrite, reads=reads) as run:
        out = run.path
        # -- data ---------------------------------------------------------------------------------------------
        dropped: dict[str, int] = {}
        # Held across the three splits' reads, not each alone: a `prepare --overwrite` between two of them would
        # give a train split of one build and a test split of another.
        with reading(builder.data_dir):
            if resplit is None:
                split_records = {}
                for split in SPLITS:
                    split_records[split], dropped[split] = load_records(builder.data_dir, split, limit=limit)
            else:
                pooled, dropped["all"] = load_pooled_records(builder.data_dir, limit=limit)
        corpus = corpus_dropped = None
        if generated_corpus is not None:
            corpus, corpus_dropped = load_records(generated_corpus, "train")
        # A rule file's skip_reports_with (e.g. "warning:") leaves those records out of every task.
        skipped: dict[str, int] = {}
        if resplit is None:
            for split in SPLITS:
                split_records[split], skipped[split] = _without_skipped(split_records[split], rules)
        else:
            pooled, skipped["all"] = _without_skipped(pooled, rules)
        if corpus is not None:
            corpus, skipped["corpus"] = _without_skipped(corpus, rules)
        generator = None
        if generator_needed:
            from diffusets_jax.pipeline import ECGGenerator

            generator = ECGGenerator(model_dir, sampler, batch_size=generation_batch_size, seed=0)
            # Built long after the index was read for the settings: a training or convert that finished into the
            # directory since would generate the arms with parts other than the ones the run records.
            loaded = {name: generator.settings()["components"].get(name) for name in ("vae", "unet")}
            if loaded != settings["generator"]["components"]:
                raise ValueError(f"--model-dir {model_dir}: its vae/ or unet/ was replaced since this run read it "
                                 f"(uids {settings['generator']['components']} -> {loaded}: a training or convert "
                                 "wrote into it): run the command again")
        mesh = parallel.mesh_from_config(config.mesh)
        # One compile of the init and train step for every arm and seed of every task.
        compiled = CompiledSteps(classifier_task(config, num_steps), mesh)
        predict = make_predictor(model, mesh, int(config.train.global_batch_size))

        tasks: dict[str, Any] = {}
        for task_index, rule in enumerate(rules.rules):
            began = time.perf_counter()
            if resplit is None:
                records = split_records
            else:
                parts = stratified_group_split(pooled.subject_id, rule.mask(pooled.report_lines), resplit, seed=0)
                records = {split: pooled.take(idx) for split, idx in zip(SPLITS, parts, strict=True)}
            entry = _run_task(rule, task_index, records, arms=arms, seeds=seeds, ratio=ratio,
                              minority_fraction=minority_fraction, config=config, compiled=compiled, predict=predict,
                              generator=generator, corpus=corpus, n_boot=n_boot, out=out, progress=progress)
            entry["seconds"] = round(time.perf_counter() - began, 1)
            tasks[rule.name] = entry
        report = {"settings": _readable_settings(settings), "protocol": _protocol(config, resplit),
                  "records_dropped_non_finite": {**dropped, **({"corpus": corpus_dropped} if corpus is not None else {})},
                  "records_skipped_by_rules": skipped,
                  "tasks": tasks, "figure": None}
        # Every generated set is saved, so a temporary left beside them is a killed run's half-written set (the
        # synthetic arm's holds an ECG per training record: gigabytes for MIMIC-IV-ECG): ours, in this claimed folder.
        remove_temporaries_in(out / "generated")
        report["figure"] = _figure(report, out)
        write_json_atomic(out / "report.json", report)
        write_text_atomic(out / "report.md", render_markdown(report))
        run.mark_complete(tasks={name: t["status"] for name, t in tasks.items()})
    return report


def _without_skipped(records: Records, rules: RuleSet) -> tuple[Records, int]:
    skipped = rules.skipped_mask(records.report_lines)
    return records.take(np.flatnonzero(~skipped)), int(skipped.sum())


def _run_task(rule: KeywordRule, task_index: int, records: Mapping[str, Records], *, arms: Sequence[str], seeds: int,
              ratio: float, minority_fraction: float, config: Any, compiled: Any, predict: Any, generator: Any,
              corpus: Records | None, n_boot: int, out: Path, progress: bool) -> dict[str, Any]:
    labels = {split: rule.mask(records[split].report_lines).astype(np.int64) for split in SPLITS}
    counts = {split: {"records": int(len(labels[split])), "positive": int(labels[split].sum())} for split in SPLITS}
    entry: dict[str, Any] = {"rule": rule.to_json(), "counts": counts, "status": "skipped", "reason": None, "arms": {}}
    for split in ("train", "test"):
        n, n_pos = counts[split]["records"], counts[split]["positive"]
        if n_pos == 0 or n_pos == n:
            entry["reason"] = (f"the {split} split has {'no positive' if n_pos == 0 else 'no negative'} record "
                               f"({n_pos} of {n} match the rule)")
            return entry
    train, val, test = records["train"], records["validation"], records["test"]
    n_train_pos = counts["train"]["positive"]
    minority = 1 if n_train_pos <= counts["train"]["records"] - n_train_pos else 0
    val_labels = labels["validation"]
    if val_labels.sum() == 0:
        entry["note"] = "the validation split has no positive record: the decision threshold is 0.5"
    corpus_labels = None if corpus is None else rule.mask(corpus.report_lines).astype(np.int64)
    if corpus is not None:
        entry["corpus"] = {"records": int(len(corpus_labels)), "positive": int(corpus_labels.sum())}

    logits: dict[str, list[np.ndarray]] = {arm: [] for arm in arms}
    thresholds: dict[str, list[float]] = {arm: [] for arm in arms}
    arm_info: dict[str, dict[str, Any]] = {arm: {"title": ARM_TITLES[arm], "status": "done", "train_records": []}
                                           for arm in arms}
    kept_minority = []
    name_seed = zlib.crc32(rule.name.encode())
    for seed in range(seeds):
        rng = np.random.default_rng([seed, name_seed])
        kept = subsample_minority(labels["train"], minority, minority_fraction, rng)
        n_minority = int(np.sum(labels["train"][kept] == minority))
        kept_minority.append(n_minority)
        n_augment = max(1, round(ratio * n_minority))
        generated = Generated()
        todo = [a for a in arms if not (out / "runs" / rule.name / f"seed{seed}" / a / "result.json").exists()]
        if any(a in GENERATED_ARMS for a in todo):
            if generator is not None:
                generated = _generated_from_model(
                    generator, train, kept, labels["train"], minority, n_augment, [a for a in arms if a in GENERATED_ARMS],
                    (task_index * seeds + seed) * NOISE_STRIDE, rng, out / "generated" / f"{rule.name}-seed{seed}.npz",
                    progress)
            else:
                generated = _generated_from_corpus(corpus, corpus_labels, minority, n_augment, arms, rng)
        for arm in arms:
            workdir = out / "runs" / rule.name / f"seed{seed}" / arm
            result_path = workdir / "result.json"
            if result_path.exists():
                result = read_json(result_path, "arm result")
                # A run stopped between saving the predictions and removing its checkpoints left them: ours, and
                # no longer needed (an arm's are as large as its classifier and optimizer state).
                shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
            elif arm in generated.reason:
                result = {"skipped": generated.reason[arm]}
            else:
                data = _arm_data(arm, train, kept, labels["train"], minority, generated)
                if len(np.unique(data["label"])) < 2:
                    result = {"skipped": "its training set holds one class only"}
                else:
                    began = time.perf_counter()
                    val_logits, test_logits = _train_arm(compiled, config, workdir, data, seed, val.ecg, test.ecg,
                                                         predict)
                    result = {"train_records": int(len(data["label"])), "train_positive": int(data["label"].sum()),
                              "generated": int(len(data["label"]) - len(kept)) if arm == "augmented" else (
                                  int(len(data["label"])) if arm == "synthetic" else 0),
                              "note": generated.note.get(arm), "seconds": round(time.perf_counter() - began, 1),
                              "validation_logits": val_logits.tolist(), "test_logits": test_logits.tolist()}
                    write_json_atomic(result_path, result)
                    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # ours; the predictions are saved
            if "skipped" in result:
                arm_info[arm].update(status="skipped", reason=result["skipped"])
                continue
            # Chosen on the logits, halfway in probability between the two validation records it parts (as on
            # the probabilities, which tie at 1.0 for a confident classifier); probability 0.5 without a positive.
            val_logits = np.asarray(result["validation_logits"], np.float64)
            thresholds[arm].append(f1_threshold(val_labels, val_logits, midpoint=logit_midpoint)
                                   if val_labels.sum() else 0.0)
            logits[arm].append(np.asarray(result["test_logits"], np.float64))
            arm_info[arm]["train_records"].append(result["train_records"])
            arm_info[arm].setdefault("train_positive", []).append(result["train_positive"])
            arm_info[arm].setdefault("generated", []).append(result["generated"])
            if result.get("note"):
                arm_info[arm]["note"] = result["note"]
    done = [arm for arm in arms if arm_info[arm]["status"] == "done"]
    entry.update(status="done" if done else "skipped", minority="positive" if minority else "negative",
                 minority_train=counts["train"]["positive"] if minority else
                 counts["train"]["records"] - counts["train"]["positive"],
                 minority_kept=kept_minority, arms=arm_info)
    if not done:
        entry["reason"] = "every arm was skipped"
        return entry
    summary = summarize_arms(labels["test"], test.subject_id, {a: logits[a] for a in done},
                             {a: thresholds[a] for a in done}, n_boot=n_boot, seed=0)
    for arm in done:
        arm_info[arm].update(summary[arm])
    return entry


def _readable_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings for the report: the classifier config summarised to what a reader compares."""
    config = settings["config"]
    return {**{k: v for k, v in settings.items() if k != "config"},
            "classifier": {"model": config["model"], "steps": config["train"]["num_steps"],
                           "global_batch_size": config["train"]["global_batch_size"],
                           "optimizer": config["optimizer"]}}


def _protocol(config: Any, resplit: tuple[float, float, float] | None) -> dict[str, str]:
    return {
        "splits": ("the prepared dataset's patient-disjoint train / validation / test splits" if resplit is None else
                   f"all records re-split by patient, stratified by each task's label, train:validation:test = "
                   f"{resplit[0]:.2f}:{resplit[1]:.2f}:{resplit[2]:.2f} (seed 0)"),
        "model_selection": f"fixed length: the weights after {int(config.train.num_steps)} steps, no early stopping",
        "threshold": ("F1, sensitivity and specificity at the threshold maximising F1 on the real validation records "
                      "(0.5 when they hold no positive); F1 @ 0.5 at probability 0.5"),
        "intervals": ("mean +- sd over seeds; [95 % percentile bootstrap interval of the seed mean, resampling test "
                      "patients]; differences to 'real' paired on the same resamples"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Report


def _figure(report: Mapping[str, Any], out: Path) -> str | None:
    from diffusets_jax.io.plot import plot_metric_intervals

    panels = []
    for name, task in report["tasks"].items():
        if task["status"] != "done":
            continue
        values = {}
        for arm, info in task["arms"].items():
            if info["status"] != "done":
                continue
            values[arm] = {k: tuple(np.nan if info["metrics"][k]["ci"][f] is None else info["metrics"][k]["ci"][f]
                                    for f in ("value", "low", "high")) for k, _ in METRICS}
        panels.append((f"{name}: {task['rule']['description'] or task['rule']['name']} (test: "
                       f"{task['counts']['test']['positive']} positive of {task['counts']['test']['records']})", values))
    if not panels:
        return None
    plot_metric_intervals(panels, METRICS, path=out / FIGURE, ylabel="seed mean, 95 % CI")
    return FIGURE


def _cell(metric: Mapping[str, Any]) -> str:
    mean, sd, ci = metric["mean"], metric["sd"], metric["ci"]
    if mean is None:
        return "n/a"
    text = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    if ci["low"] is not None:
        text += f" [{ci['low']:.3f}, {ci['high']:.3f}]"
    return text


def _difference(interval: Mapping[str, Any]) -> str:
    if interval["value"] is None:
        return "n/a"
    text = f"{interval['value']:+.3f}"
    return text + (f" [{interval['low']:+.3f}, {interval['high']:+.3f}]" if interval["low"] is not None else "")


def _rule_sentence(rule: Mapping[str, Any]) -> str:
    phrases = lambda key: " or ".join(map(repr, rule[key]))
    if rule["whole_words"]:
        return (f"Rule: positive when a statement holds {phrases('any')} as whole words"
                + (f" and no statement holds {phrases('none')}" if rule["none"] else "") + ".")
    return (f"Rule: positive when the lower-cased report contains {phrases('any')}"
            + (f" and not {phrases('none')}" if rule["none"] else "") + ".")


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: protocol, then per task its counts, one row per arm and the paired differences."""
    s = report["settings"]
    lines = ["# Downstream benchmark: generated ECGs as data augmentation for imbalanced diagnosis", ""]
    source = ("model directory " + s["generator"]["model_dir"] if "generator" in s else
              "corpus " + s["generated_corpus"]["path"] if "generated_corpus" in s else "none")
    lines += [f"- dataset: {s['dataset']}", f"- generated ECGs: {source}",
              f"- arms: {', '.join(s['arms'])}; seeds: {s['seeds']}; ratio: {s['ratio']:g} generated per kept "
              f"minority record; minority fraction kept: {s['minority_fraction']:g}",
              f"- classifier: Net1D, {s['classifier']['steps']} steps, batch {s['classifier']['global_batch_size']}"]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in report["protocol"].items()]
    dropped = {k: v for k, v in report["records_dropped_non_finite"].items() if v}
    if dropped:
        lines.append(f"- records left out for a non-finite ECG sample: {dropped}")
    skipped = {k: v for k, v in report.get("records_skipped_by_rules", {}).items() if v}
    if skipped:
        lines.append(f"- records left out for a report holding {' or '.join(map(repr, s['skip_reports_with']))}: "
                     f"{skipped}")
    lines += ["", "Cells: mean ± sd over seeds [95 % bootstrap CI of the mean over test patients].", ""]
    for name, task in report["tasks"].items():
        rule = task["rule"]
        lines += [f"## {name}: {rule['description'] or name}", "",
                  _rule_sentence(rule), ""]
        counts = task["counts"]
        lines.append("Records (positive): " + ", ".join(f"{split} {c['records']} ({c['positive']})"
                                                        for split, c in counts.items()) + ".")
        if task["status"] != "done":
            lines += ["", f"**Skipped**: {task['reason']}.", ""]
            continue
        kept = task["minority_kept"]
        lines.append(f"Minority class: {task['minority']} ({task['minority_train']} training records; kept per seed: "
                     f"{', '.join(map(str, kept))}).")
        if task.get("note"):
            lines.append(f"Note: {task['note']}.")
        if "corpus" in task:
            lines.append(f"Corpus records matching the rule: {task['corpus']['positive']} of {task['corpus']['records']}.")
        lines += ["", "| arm | train records (generated) | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for arm, info in task["arms"].items():
            if info["status"] != "done":
                lines.append(f"| {arm} | skipped: {info['reason']} |" + " |" * len(METRICS))
                continue
            trained = f"{info['train_records'][0]}" + (f" ({info['generated'][0]})" if any(info["generated"]) else "")
            lines.append(f"| {arm} | {trained} | " + " | ".join(_cell(info["metrics"][k]) for k, _ in METRICS) + " |")
        differences = {arm: info["difference_to_real"] for arm, info in task["arms"].items()
                       if info["status"] == "done" and "difference_to_real" in info}
        if differences:
            lines += ["", "Difference to `real` (seed means, paired bootstrap 95 % CI):", "",
                      "| arm | " + " | ".join(f"Δ {dict(METRICS)[k]}" for k in DELTA_METRICS) + " |",
                      "|---|" + "---|" * len(DELTA_METRICS)]
            lines += [f"| {arm} | " + " | ".join(_difference(d[k]) for k in DELTA_METRICS) + " |"
                      for arm, d in differences.items()]
        notes = [f"{arm}: {info['note']}" for arm, info in task["arms"].items() if info.get("note")]
        lines += [""] + [f"Note: {n}." for n in notes] + ([""] if notes else [])
    if report.get("figure"):
        lines += ["## Figure", "", f"![metrics per arm]({report['figure']})", ""]
    return "\n".join(lines) + "\n"
