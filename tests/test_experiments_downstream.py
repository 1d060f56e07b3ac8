"""`diffusets-jax downstream`: splits, minority subsampling, the per-arm summary against direct computations, the
bad inputs (one line, exit 2, nothing written) and the whole benchmark end to end on a tiny dataset and model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit

from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
from diffusets_jax.experiments.downstream import (
    METRICS,
    Records,
    parse_fractions,
    seed_metrics,
    select_tasks,
    stratified_group_split,
    subsample_minority,
    summarize_arms,
)
from tests.helpers import tiny_report_dataset
from tests.helpers.cli import exit_code
from tests.helpers.tiny_models import tiny_model_dir

TINY_CLASSIFIER = ["--config.model.base_filters=8", "--config.model.filters=8,16", "--config.model.blocks_per_stage=1,1",
                   "--config.model.group_width=8", "--config.model.kernel_size=8", "--config.train.global_batch_size=8",
                   "--config.train.progress_bar=false"]


def test_stratified_group_split_is_patient_disjoint_and_stratified():
    groups = np.repeat(np.arange(40), 2)  # two records per patient
    labels = np.zeros(80, bool)
    labels[::10] = True  # 8 positive patients
    train, val, test = stratified_group_split(groups, labels, (0.5, 0.25, 0.25), seed=0)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(80))
    patients = [set(groups[s].tolist()) for s in (train, val, test)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    # 8 positive patients -> 4 / 2 / 2; 32 negative ones -> 16 / 8 / 8.
    assert [len({g for g in groups[s][labels[s]]}) for s in (train, val, test)] == [4, 2, 2]
    assert [len(s) for s in (train, val, test)] == [40, 20, 20]
    # A stratum too small for its fractions still reaches every split.
    few = np.zeros(80, bool)
    few[[0, 20, 40]] = True
    assert all(few[s].any() for s in stratified_group_split(groups, few, (0.8, 0.1, 0.1), seed=1))
    again = stratified_group_split(groups, labels, (0.5, 0.25, 0.25), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))


def test_subsample_minority_keeps_the_majority_and_a_seeded_share():
    labels = np.array([1] * 10 + [0] * 30)
    kept = subsample_minority(labels, 1, 0.3, np.random.default_rng(0))
    assert (labels[kept] == 1).sum() == 3 and (labels[kept] == 0).sum() == 30
    assert np.array_equal(kept, subsample_minority(labels, 1, 0.3, np.random.default_rng(0)))
    assert (labels[subsample_minority(labels, 1, 0.01, np.random.default_rng(0))] == 1).sum() == 1  # at least one
    assert len(subsample_minority(labels, 0, 1.0, np.random.default_rng(0))) == 40


@pytest.mark.parametrize("text", ["1:2", "a:b:c", "1:0:1", "1:-1:1", "nan:1:1"])
def test_bad_resplit_fractions(text):
    with pytest.raises(ValueError, match="--resplit"):
        parse_fractions(text)


def test_resplit_fractions_are_normalised():
    assert parse_fractions("2:1:1") == (0.5, 0.25, 0.25)


def test_task_selection_from_shipped_files_and_specs(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"whole_words": True, "skip_reports_with": ["warning:"], "rules": [
        {"name": "lbbb", "any": ["left bundle branch block", "lbbb"], "none": ["incomplete"]}]}))
    chosen = select_tasks(["pvc", "LBBB"], ["stemi=st elevation"], [path])
    assert [r.name for r in chosen.rules] == ["pvc", "lbbb", "stemi"]
    assert chosen.rules[1].none_of == ("incomplete",) and chosen.skip_reports_with == ("warning:",)
    assert [r.name for r in select_tasks(None).rules] == ["normal", "af", "pvc"]
    assert select_tasks(None).skip_reports_with == ()
    assert [r.name for r in select_tasks(None, files=[path]).rules] == ["normal", "af", "pvc", "lbbb"]
    redefined = select_tasks(["af"], ["af=afib|atrial fibrillation"])
    assert [r.any_of for r in redefined.rules] == [("afib", "atrial fibrillation")]
    with pytest.raises(ValueError, match="unknown task.*nope"):
        select_tasks(["nope"])
    with pytest.raises(ValueError, match="folder name"):
        select_tasks(None, ["a/b=x"])
    with pytest.raises(ValueError, match="no task selected"):
        select_tasks([" "])
    with pytest.raises(FileNotFoundError):
        select_tasks(None, files=[tmp_path / "missing.json"])


def test_records_taken_in_place_are_the_records_taken_by_copy():
    """A split is read once (39 GB for MIMIC-IV-ECG); dropping its non-finite records moves the kept ECG rows
    forward in the same array instead of copying them out."""

    def records() -> Records:
        n = 6
        ecg = np.random.default_rng(0).standard_normal((n, 1024, 12)).astype(np.float32)
        return Records(ecg, [(f"r{i}",) for i in range(n)], np.arange(n * 4, dtype=np.float32).reshape(n, 4),
                       np.arange(n) % 2, np.arange(n) + 40.0, np.arange(n) + 60.0, np.arange(n) // 2)

    copied = records().take([0, 2, 3, 5])
    source = records()
    moved = source.take([0, 2, 3, 5], in_place=True)
    assert np.shares_memory(moved.ecg, source.ecg)  # no second array of ECGs
    for field in ("ecg", "text_embedding", "sex", "age", "heart_rate", "subject_id"):
        np.testing.assert_array_equal(getattr(moved, field), getattr(copied, field))
    assert moved.report_lines == copied.report_lines == [("r0",), ("r2",), ("r3",), ("r5",)]


def test_seed_metrics_hand_worked():
    labels = np.array([1, 1, 0, 0, 0])
    probabilities = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    logits = logit(probabilities)  # seed_metrics takes the classifier's logits
    m = seed_metrics(labels, logits, threshold=0.0)  # probability 0.5
    # At 0.5: TP 1 (0.9), FN 1 (0.4), FP 1 (0.6), TN 2.
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(5 / 6)  # 0.4 loses only to 0.6
    assert m["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert seed_metrics(labels, logits, threshold=logit(0.3))["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_summary_against_direct_computation():
    rng = np.random.default_rng(0)
    n = 60
    labels = (np.arange(n) % 5 == 0).astype(int)
    groups = np.arange(n) // 3
    logits = {arm: [logit(np.clip(labels * shift + rng.normal(0.3, 0.2, n), 0.01, 0.99)) for _ in range(3)]
              for arm, shift in (("real", 0.2), ("augmented", 0.5))}
    thresholds = {"real": [0.0, -0.4, -0.2], "augmented": [0.0, 0.0, 0.4]}  # logits
    summary = summarize_arms(labels, groups, logits, thresholds, n_boot=300, seed=0)
    for arm in logits:
        direct = [seed_metrics(labels, z, t) for z, t in zip(logits[arm], thresholds[arm], strict=True)]
        for key, _ in METRICS:
            values = [d[key] for d in direct]
            reported = summary[arm]["metrics"][key]
            assert reported["mean"] == pytest.approx(np.mean(values))
            assert reported["sd"] == pytest.approx(np.std(values, ddof=1))
            assert reported["ci"]["value"] == pytest.approx(np.mean(values))
            assert reported["ci"]["low"] <= reported["ci"]["value"] <= reported["ci"]["high"]
        assert [s["threshold_logit"] for s in summary[arm]["seeds"]] == thresholds[arm]
        assert [s["threshold"] for s in summary[arm]["seeds"]] == pytest.approx(expit(thresholds[arm]))
    difference = summary["augmented"]["difference_to_real"]["auprc"]
    assert difference["value"] == pytest.approx(summary["augmented"]["metrics"]["auprc"]["mean"]
                                                - summary["real"]["metrics"]["auprc"]["mean"])
    assert difference["low"] > 0  # the augmented scores separate the classes far better on every resample
    assert "difference_to_real" not in summary["real"]


def _scored_from_saved_logits(tmp_path, validation: tuple[list[int], list[float]],
                              test: tuple[list[int], list[float]]) -> dict:
    """`_run_task`'s entry for one `real` arm whose saved predictions (validation and test (labels, logits)) are read
    back as on a resume, so no classifier is trained."""
    from diffusets_jax.experiments.downstream import _run_task
    from diffusets_jax.experiments.keyword_rules import parse_rule

    def split(labels: list[int], first_patient: int) -> Records:
        n = len(labels)
        reports = [("atrial fibrillation",) if y else ("sinus rhythm",) for y in labels]
        return Records(np.zeros((n, 8, 12), np.float32), reports, np.zeros((n, 4), np.float32), np.zeros(n, np.int64),
                       np.full(n, 60.0), np.full(n, 70.0), np.arange(first_patient, first_patient + n))

    records = {"train": split([1, 0, 0, 0], 0), "validation": split(validation[0], 10), "test": split(test[0], 20)}
    rule = parse_rule("af=atrial fibrillation")
    arm_dir = tmp_path / "runs" / rule.name / "seed0" / "real"
    arm_dir.mkdir(parents=True)
    (arm_dir / "result.json").write_text(json.dumps({
        "train_records": 4, "train_positive": 1, "generated": 0, "note": None, "seconds": 0.0,
        "validation_logits": validation[1], "test_logits": test[1]}))
    return _run_task(rule, 0, records, arms=("real",), seeds=1, ratio=1.0, minority_fraction=1.0, config=None,
                     compiled=None, predict=None, generator=None, corpus=None, n_boot=100, out=tmp_path,
                     progress=False)


# A confident classifier: logits whose probabilities are all exactly 1.0 in float64.
SATURATED_TEST = ([1, 0, 1, 0, 1, 0], [60.0, 50.0, 55.0, 41.0, 45.0, 40.0])


def test_rank_metrics_use_the_logits_where_probabilities_round_to_one(tmp_path):
    """A confident classifier's logits above ~37 all become probability 1.0 in float64, which would tie records
    it ranks apart: AUROC and AUPRC must rank the saved logits themselves."""
    test_labels, test_logits = map(np.array, SATURATED_TEST)
    assert np.all(1.0 / (1.0 + np.exp(-test_logits)) == 1.0)
    entry = _scored_from_saved_logits(tmp_path, ([1, 0], [3.0, -3.0]), SATURATED_TEST)

    positives, negatives = test_logits[test_labels == 1], test_logits[test_labels == 0]
    # Mann-Whitney: P(a positive's logit > a negative's), ties 1/2.
    auroc = np.mean([(p > q) + 0.5 * (p == q) for p in positives for q in negatives])
    # Average precision from its definition: precision at each positive, ranked by logit, averaged.
    ranked = test_labels[np.argsort(-test_logits)]
    auprc = np.mean([ranked[: i + 1].mean() for i in np.flatnonzero(ranked)])
    metrics = entry["arms"]["real"]["metrics"]
    assert metrics["auroc"]["mean"] == pytest.approx(auroc)  # 8/9, not the 0.5 of six tied probabilities
    assert metrics["auprc"]["mean"] == pytest.approx(auprc)


def test_the_f1_threshold_parts_validation_records_whose_probabilities_round_to_one(tmp_path):
    """Validation logits 60, 50 (positive) and 40 (negative) all had probability 1.0: the threshold came out 1.0
    and every test record was called positive. The best cut parts 50 from 40, halfway in probability: logit
    40 + log 2 - log(1 + e^-10) (the probabilities' mean is 1 - (e^-50 + e^-40) / 2 to first order)."""
    entry = _scored_from_saved_logits(tmp_path, ([1, 1, 0], [60.0, 50.0, 40.0]), SATURATED_TEST)
    seed = entry["arms"]["real"]["seeds"][0]
    expected = 40.0 + np.log(2.0) - np.log1p(np.exp(-10.0))
    assert seed["threshold_logit"] == pytest.approx(expected, abs=1e-9)
    labels, logits = map(np.array, SATURATED_TEST)
    predicted = logits >= expected
    tp, fp, fn = np.sum(predicted & (labels == 1)), np.sum(predicted & (labels == 0)), np.sum(~predicted & (labels == 1))
    assert seed["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 0.75: 41 and 45 lie above, 40 below
    assert seed["f1"] == pytest.approx(0.75)


def test_failed_generations_are_left_out_of_the_classifiers_training_sets():
    """A generated ECG with NaN or inf samples would poison a classifier's BatchNorm statistics, as a non-finite real
    record would (those are dropped when the split is read): each arm loses it and says so."""
    from diffusets_jax.experiments.downstream import Generated, _without_failed

    rng = np.random.default_rng(0)
    augment = rng.normal(size=(5, 1024, 12)).astype(np.float32)
    synthetic = rng.normal(size=(4, 1024, 12)).astype(np.float32)
    augment[1, 3, 4], synthetic[2, 0, 0] = np.nan, np.inf
    kept = _without_failed(Generated(augment.copy(), synthetic.copy(), np.array([0, 1, 1, 0], np.int8)))
    np.testing.assert_array_equal(kept.augment, augment[[0, 2, 3, 4]])
    np.testing.assert_array_equal(kept.synthetic, synthetic[[0, 1, 3]])
    assert kept.synthetic_labels.tolist() == [0, 1, 0] and not kept.reason
    assert kept.note == {"augmented": "1 of its 5 generated ECGs had NaN or inf samples and were left out",
                         "synthetic": "1 of its 4 generated ECGs had NaN or inf samples and were left out"}
    augment[:, 0, 0] = np.nan
    failed = _without_failed(Generated(augment, synthetic[[0, 1]], np.array([0, 1], np.int8)))
    assert failed.augment is None and failed.reason == {"augmented": "5 of its 5 generated ECGs had NaN or inf samples"}
    assert len(failed.synthetic) == 2 and not failed.note


def test_model_must_be_conditioned_like_the_dataset():
    from diffusets_jax.data.card import check_embeddings_fit

    card = {"conditioning": ConditioningSpec(EmbedderSpec("local", "all-MiniLM-L6-v2", 384)).to_json()}
    names = dict(model="the U-Net", data="--dataset d", remedy="use --generated-corpus")
    check_embeddings_fit(ConditioningSpec(EmbedderSpec("local", "all-MiniLM-L6-v2", 384), "ordered", "faithful"),
                         card, **names)
    for other in (ConditioningSpec(EmbedderSpec("openai", "text-embedding-ada-002", 1536)),
                  ConditioningSpec(EmbedderSpec("local", "all-MiniLM-L6-v2", 384), "free_text")):
        with pytest.raises(ValueError, match="--generated-corpus"):
            check_embeddings_fit(other, card, **names)


# ---------------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    dataset = Path(tiny_report_dataset.build(str(root / "tfds")).data_dir)
    from diffusets_jax.conditioning.spec import ConditioningSpec
    from tests.helpers.gaussian_latents import write_gaussian_latent_dataset
    from tests.helpers.tiny_models import openai_conditioning

    latents = write_gaussian_latent_dataset(  # what `encode` writes, given where a corpus is asked for
        root / "latents", splits={"train": 4}, vae_uid=None, latent_scale=1.0, channel_mean=(0.0,) * 4,
        channel_std=(1.0,) * 4, conditioning=ConditioningSpec(openai_conditioning(8).embedder, "ordered"))
    from tests.helpers.dataset_kind import as_corpus

    return {"root": root, "dataset": dataset, "latents": latents, "corpus": as_corpus(dataset, root / "corpus")}


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    return tiny_model_dir(tiny_data["root"] / "model", text_dim=tiny_report_dataset.EMBEDDING_DIM)


def _run(capsys, *args):
    code = exit_code(["downstream", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, message", [
    (["--arms", "real,bogus"], "unknown arm"),
    (["--arms", "real,augmented"], "need generated ECGs"),
    (["--ratio", "0"], "--ratio"),
    (["--minority-fraction", "1.5"], "--minority-fraction"),
    (["--seeds", "0"], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--n-boot", "10"], "--n-boot"),
    (["--task", "bad rule"], "NAME=keyword"),
    (["--tasks", "pvc,nope"], "unknown task"),
    (["--resplit", "1:2"], "--resplit"),
    (["--model-dir", "/no/such/model"], "no such directory"),
    (["--generated-corpus", "/no/such/corpus", "--arms", "real,augmented"], "no such directory"),
    (["--generated-corpus", "{latents}", "--arms", "real,augmented"], "not a prepared ECG dataset (a latent dataset"),
    # The two kinds share one schema; only the card tells recorded ECGs from generated ones.
    (["--generated-corpus", "{dataset}", "--arms", "real,augmented"],
     "is a prepared dataset of recorded ECGs, but --generated-corpus takes generated ECGs"),
    (["--dataset", "{corpus}"], "is a corpus of generated ECGs (`sample --corpus` wrote it), but --dataset takes "
                                "recorded ECGs"),
    (["--config.model.num_classes=3"], "num_classes must be 1"),
    (["--config.train.no_such_key=1"], "unknown config key"),
    # Net1D's own checks, found when it was first traced: after the data was read and the minority ECGs generated.
    (["--config.model.filters=8,16"], "differ in length"),
    (["--config.model.filters=8,16", "--config.model.blocks_per_stage=1,1"], "must not decrease"),
    (["--config.model.base_filters=8", "--config.model.filters=8,16", "--config.model.blocks_per_stage=1,1"],
     "convolution groups"),
])
def test_bad_inputs_are_one_line_and_write_nothing(tiny_data, tmp_path, capsys, extra, message):
    out = tmp_path / "report"
    extra = [str(tiny_data[a[1:-1]]) if a in ("{latents}", "{dataset}", "{corpus}") else a for a in extra]
    code, _, err = _run(capsys, "--dataset", tiny_data["dataset"], "--out", out, *extra)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err and err.startswith("diffusets-jax downstream: error:")
    assert not out.exists()


@pytest.mark.slow  # builds the tiny model directory (two init compiles)
def test_limit_with_resplit_reads_the_first_records_of_each_split(tiny_data):
    """`--limit N` reads the first N records of each split, as documented, also with --resplit, which pools them:
    it took the first N pooled records, all training records, so the re-split never saw a validation or test
    record. A folder of that earlier reading is another input (its fingerprint differs), not one to resume."""
    from diffusets_jax.config import load_config
    from diffusets_jax.experiments.downstream import (
        DEFAULT_CONFIG,
        load_pooled_records,
        load_records,
        settings_of,
    )

    dataset = tiny_data["dataset"]
    pooled, dropped = load_pooled_records(dataset, limit=6)
    splits = [load_records(dataset, split, limit=6) for split in ("train", "validation", "test")]
    assert len(pooled) == sum(len(records) for records, _ in splits)
    assert dropped == sum(d for _, d in splits) and len(pooled) + dropped == 18  # 6 from each of the 3 splits
    np.testing.assert_array_equal(pooled.subject_id, np.concatenate([r.subject_id for r, _ in splits]))
    np.testing.assert_array_equal(pooled.ecg, np.concatenate([r.ecg for r, _ in splits]))
    assert pooled.report_lines == [line for r, _ in splits for line in r.report_lines]
    whole, _ = load_pooled_records(dataset)
    assert len(whole) == 47  # every record but the non-finite one
    config = load_config(DEFAULT_CONFIG, [])

    def settings(limit, resplit):
        return settings_of(dataset=dataset, data_dir=None, rules=select_tasks(["pvc"]), arms=["real"], seeds=1,
                           ratio=1.0, minority_fraction=1.0, config=config, model_dir=None, generated_corpus=None,
                           sampler=None, resplit=resplit, limit=limit, n_boot=100, generation_batch_size=8)

    assert settings(6, (0.5, 0.25, 0.25))["limit_per_split"] is True
    assert "limit_per_split" not in settings(6, None) and "limit_per_split" not in settings(None, (0.5, 0.25, 0.25))


def test_bad_dataset_output_and_model(tiny_data, tiny_model, tmp_path, capsys):
    code, _, err = _run(capsys, "--dataset", tmp_path / "missing", "--out", tmp_path / "a")
    assert code == 2 and "no such directory" in err
    (tmp_path / "file").write_text("mine")
    code, _, err = _run(capsys, "--dataset", tiny_data["dataset"], "--out", tmp_path / "file")
    assert code == 2 and "existing file" in err
    # A model conditioned on another embedder cannot take the dataset's vectors: refused before any work.
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    index["conditioning"]["embedder"].update(model="other-embedding", embedder_id="")
    (other / "model_index.json").write_text(json.dumps(index))
    code, _, err = _run(capsys, "--dataset", tiny_data["dataset"], "--model-dir", other, "--out", tmp_path / "b")
    assert code == 2 and "'other-embedding'" in err and not (tmp_path / "b").exists(), err
    # More sampling steps than the model's schedule has, found when the generator was built: after --out was
    # claimed and the records read, in a line naming --steps, which here is the classifiers' training steps.
    code, _, err = _run(capsys, "--dataset", tiny_data["dataset"], "--model-dir", tiny_model, "--sampling-steps",
                        "2000", "--out", tmp_path / "c")
    assert code == 2 and "(--sampling-steps)" in err and not (tmp_path / "c").exists(), err
    # A user's folder is never written into.
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep")
    code, _, err = _run(capsys, "--dataset", tiny_data["dataset"], "--out", tmp_path / "user", "--tasks", "pvc",
                        "--seeds", "1", "--steps", "1", *TINY_CLASSIFIER)
    assert code == 2 and "not empty" in err
    assert [n for n in os.listdir(tmp_path / "user") if not n.startswith(".diffusets-run")] == ["notes.txt"]
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep"


def test_a_model_replaced_while_the_records_load_does_not_generate_the_arms(tiny_data, tiny_model, tmp_path, capsys,
                                                                          monkeypatch):
    """The run's settings record the parts' uids from the index read at the start; its generator is built after the
    records are read. A U-Net retrained into the directory in between generated the arms, recorded as the old one."""
    import shutil

    from diffusets_jax.experiments import downstream as ds
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import replace_unet

    model = shutil.copytree(tiny_model, tmp_path / "model")
    without = ds._without_skipped

    def read_while_another_run_exports(*args, **kwargs):
        replace_unet(model, tiny_report_dataset.EMBEDDING_DIM)
        return without(*args, **kwargs)

    monkeypatch.setattr(ds, "_without_skipped", read_while_another_run_exports)
    out = tmp_path / "report"
    code, _, err = _run(capsys, "--dataset", tiny_data["dataset"], "--model-dir", model, "--out", out, "--tasks", "pvc",
                        "--arms", "real,synthetic", "--seeds", "1", "--steps", "1", "--sampling-steps", "2",
                        "--generation-batch-size", "8", "--no-progress", *TINY_CLASSIFIER)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--model-dir {model}: its vae/ or unet/ was replaced since this run read it" in err
    assert model_dirs.read_index(model).components["unet"]["provenance"]["source"] == "retrained"
    assert not out.exists()


@pytest.mark.slow
def test_benchmark_end_to_end_with_a_model_then_a_corpus(tiny_data, tiny_model, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--dataset", tiny_data["dataset"], "--model-dir", tiny_model, "--out", out, "--tasks", "pvc,af",
            "--task", "any_ecg=ecg", "--arms", "real,weighted,augmented,synthetic", "--seeds", "2", "--steps", "3",
            "--ratio", "1.5", "--n-boot", "200", "--sampling-steps", "2", "--generation-batch-size", "8",
            "--no-progress", *TINY_CLASSIFIER]
    code, stdout, err = _run(capsys, *args)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["records_dropped_non_finite"] == {"train": 1, "validation": 0, "test": 0}
    af, any_ecg, pvc = report["tasks"]["af"], report["tasks"]["any_ecg"], report["tasks"]["pvc"]
    assert af["status"] == "skipped" and "no positive" in af["reason"]
    assert any_ecg["status"] == "skipped" and "no negative" in any_ecg["reason"]
    # 23 finite training records, 5 with PVCs (index 5, a PVC record, holds the NaN); 3 of 12 in each other split.
    assert pvc["counts"] == {"train": {"records": 23, "positive": 5}, "validation": {"records": 12, "positive": 3},
                             "test": {"records": 12, "positive": 3}}
    assert pvc["status"] == "done" and pvc["minority"] == "positive" and pvc["minority_kept"] == [5, 5]
    for arm in ("real", "weighted", "augmented", "synthetic"):
        info = pvc["arms"][arm]
        assert info["status"] == "done" and len(info["seeds"]) == 2
        for key, _ in METRICS:
            assert set(info["metrics"][key]) == {"mean", "sd", "ci"}
        assert info["metrics"]["auroc"]["ci"]["valid"] == 200 or info["metrics"]["auroc"]["ci"]["valid"] > 150
        if arm != "real":
            assert set(info["difference_to_real"]) == {"f1", "auroc", "auprc"}
    assert pvc["arms"]["augmented"]["generated"] == [8, 8]  # round(1.5 * 5) generated PVC ECGs per seed
    assert pvc["arms"]["augmented"]["train_records"] == [31, 31]
    assert pvc["arms"]["synthetic"]["train_records"] == [23, 23]
    with np.load(out / "generated" / "pvc-seed0.npz") as generated:
        assert generated["augment"].shape == (8, 1024, 12) and generated["synthetic"].shape == (23, 1024, 12)
        assert np.isfinite(generated["augment"]).all()
        assert int(generated["synthetic_labels"].sum()) == 5
        first = generated["augment"].copy()
    with np.load(out / "generated" / "pvc-seed1.npz") as generated:
        assert not np.allclose(first, generated["augment"])  # each seed has its own noise
    result = out / "runs" / "pvc" / "seed1" / "augmented" / "result.json"
    assert len(json.loads(result.read_text())["test_logits"]) == 12
    assert not (result.parent / "checkpoints").exists()  # deleted once the predictions were saved
    markdown = (out / "report.md").read_text()
    assert "**Skipped**: the train split has no positive record" in markdown
    for arm in ("real", "weighted", "augmented", "synthetic"):
        assert f"| {arm} | " in markdown
    assert "Difference to `real`" in markdown and "![metrics per arm](downstream.png)" in markdown
    assert (out / "downstream.png").read_bytes()[:4] == b"\x89PNG"
    assert "pvc: AUPRC (seed mean) real" in stdout and "af: skipped" in stdout

    # The same command again resumes a finished run: nothing is retrained. The checkpoints a run stopped between
    # saving an arm's predictions and removing them left (a Ctrl-C, a kill) are removed then.
    stamp = result.stat().st_mtime_ns
    left = result.parent / "checkpoints" / "2"
    left.mkdir(parents=True)
    (left / "state").write_bytes(b"x" * 1024)
    # ... and so is the temporary a run killed while saving a generated set left beside the sets.
    half = out / "generated" / ".pvc-seed1.npz.tmp-4242-0123456789ab.npz"
    half.write_bytes(b"half a set")
    code, _, err = _run(capsys, *args)
    assert code == 0, err
    assert result.stat().st_mtime_ns == stamp
    assert not (result.parent / "checkpoints").exists() and not half.exists()
    assert sorted(p.name for p in (out / "generated").iterdir()) == ["pvc-seed0.npz", "pvc-seed1.npz"]
    # Other settings into the same folder are refused.
    code, _, err = _run(capsys, *[a if a != "1.5" else "2" for a in args])
    assert code == 2 and "other settings" in err

    # Generated ECGs from a corpus (here the prepared dataset relabelled as one), on a patient re-split of all records.
    corpus_out = tmp_path / "corpus_report"
    code, _, err = _run(capsys, "--dataset", tiny_data["dataset"], "--generated-corpus", tiny_data["corpus"],
                        "--out", corpus_out, "--tasks", "pvc", "--arms", "real,augmented,synthetic", "--seeds", "1",
                        "--steps", "2", "--minority-fraction", "0.5", "--ratio", "2", "--resplit", "0.5:0.25:0.25",
                        "--n-boot", "100", "--no-progress", *TINY_CLASSIFIER)
    assert code == 0, err
    report = json.loads((corpus_out / "report.json").read_text())
    pvc = report["tasks"]["pvc"]
    assert report["records_dropped_non_finite"] == {"all": 1, "corpus": 1}
    assert pvc["corpus"] == {"records": 23, "positive": 5}
    total = sum(c["records"] for c in pvc["counts"].values())
    assert total == 47 and all(c["positive"] > 0 for c in pvc["counts"].values())
    kept = pvc["minority_kept"][0]
    assert kept == max(1, round(0.5 * pvc["counts"]["train"]["positive"]))
    assert pvc["arms"]["augmented"]["generated"] == [min(2 * kept, 5)]
    assert pvc["arms"]["synthetic"]["train_records"] == [23]  # every corpus record, labelled by the rule
    assert "re-split by patient" in report["protocol"]["splits"]
