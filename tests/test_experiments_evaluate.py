"""The evaluation: the paper's levels (signal = FID / precision-recall, feature = heart rate, diagnostic = CLIP
score), clinical metrics in every report, per-condition tables, scoring another generator's samples, comparisons."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from diffusets_jax.ecg.units import finite_ecgs
from diffusets_jax.errors import RunFailed
from diffusets_jax.experiments import evaluate as ev
from diffusets_jax.experiments.keyword_rules import load_rules
from diffusets_jax.io.generated import read_generated
from diffusets_jax.models.clip import CLIP
from diffusets_jax.parallel import jit_run_once
from tests.helpers import tiny_ecg_dataset
from tests.helpers.synthetic_ecg import regular_beats, synthetic_ecg


def synthetic_set(rng, rates):
    """ECGs beating exactly at `rates` (bpm), each with its own start phase and a little noise."""
    return np.stack([synthetic_ecg(regular_beats(rate, first_s=rng.uniform(0.3, 0.6)), noise_mv=0.01,
                                   seed=int(rng.integers(1 << 30))).astype(np.float32) for rate in rates])


@pytest.fixture(scope="module")
def clip():
    module = CLIP(base_filters=8, filters=(8, 16), blocks_per_stage=(1, 1), group_width=8,
                  text_dim=tiny_ecg_dataset.EMBEDDING_DIM, text_hidden_dim=16, embed_dim=8)
    variables = jit_run_once(module.init, jax.random.PRNGKey(0), np.zeros((2, 1024, 12), np.float32),
                             np.zeros((2, tiny_ecg_dataset.EMBEDDING_DIM), np.float32))
    return module, variables


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_ecg_dataset.build(str(tmp_path_factory.mktemp("tfds")))


def test_a_split_read_without_its_ecgs_has_the_same_conditions(dataset):
    """Choosing records (turing-conditions) needs the conditions, not the split's ECGs (39 GB for MIMIC-IV-ECG)."""
    full = ev.load_split(dataset.data_dir, "validation", limit=9)
    light = ev.load_split(dataset.data_dir, "validation", limit=9, with_ecg=False)
    assert light["ecg"] is None and full["ecg"].shape == (9, 1024, 12)
    for key in ev.SPLIT_COLUMNS[1:]:
        assert np.array_equal(np.asarray(light[key], dtype=object), np.asarray(full[key], dtype=object)), key
    assert light["finite"] is None and full["finite"].tolist() == finite_ecgs(full["ecg"]).tolist()


def test_evaluate_tells_recorded_from_generated_datasets_by_their_cards(dataset, tmp_path, capsys):
    """The kinds share one schema: a corpus as the real reference, or the real split as the generated set, used to
    be scored as if it were the other (both refused before the CLIP loads: --clip here does not exist)."""
    from diffusets_jax.cli import main
    from tests.helpers.dataset_kind import as_corpus

    corpus = as_corpus(dataset.data_dir, tmp_path / "corpus")
    for flags, message in (
        (["--dataset", str(corpus), "--generated", str(corpus)], f"--dataset {corpus} is a corpus of generated ECGs"),
        (["--dataset", str(dataset.data_dir), "--generated", str(dataset.data_dir)],
         f"--generated {dataset.data_dir} is a prepared dataset of recorded ECGs, but --generated takes generated"),
    ):
        assert main(["evaluate", *flags, "--split", "test", "--clip", str(tmp_path / "no_clip"), "--out",
                     str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_split_read_for_some_rows_holds_only_their_ecgs(dataset):
    """Choosing records, then reading only theirs: the other columns still cover the whole split."""
    full = ev.load_split(dataset.data_dir, "validation", limit=9)
    some = ev.load_split(dataset.data_dir, "validation", limit=9, ecg_rows=[6, 0, 3])
    np.testing.assert_array_equal(some["ecg"], full["ecg"][[6, 0, 3]])
    assert some["finite"].tolist() == full["finite"].tolist() and some["prompt"] == full["prompt"]
    assert ev.load_split(dataset.data_dir, "validation", limit=9, ecg_rows=[])["ecg"].shape == (0, 1024, 12)
    with pytest.raises(ValueError, match="has 9 examples, no row 9"):
        ev.load_split(dataset.data_dir, "validation", limit=9, ecg_rows=[2, 9])


def test_a_split_is_not_read_while_its_dataset_is_being_replaced(dataset, tmp_path, capsys):
    """A `prepare --overwrite` holds the dataset's readers lock while it moves the folder away: evaluate, downstream,
    reconstruct-eval and the Turing commands (all through `load_split`) read it regardless. Refused in one line; the
    lock is held only while the split is read, so a prepare may replace the dataset once it has been read."""
    from diffusets_jax.cli import main
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock

    add_readers_lock(dataset.data_dir)  # as `prepare` leaves it
    out = tmp_path / "conditions.csv"
    with exclusive_lock(dataset.data_dir, "busy", name=READERS_LOCK):
        assert main(["turing-conditions", "--dataset", str(dataset.data_dir), "--split", "test", "-n", "2", "--seed",
                     "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{dataset.data_dir} is being replaced now" in err and err.count("\n") == 1, err
    assert not out.exists()
    ev.load_split(dataset.data_dir, "test", limit=2, with_ecg=False)
    with exclusive_lock(dataset.data_dir, "busy", name=READERS_LOCK):  # released once read
        pass


def test_models_evaluated_together_are_scored_against_one_build(clip, dataset, tmp_path, monkeypatch):
    """Each model reads the split when its turn comes, hours apart with the paper's DDPM: a `prepare --overwrite`
    in between scored (and compared) the models on different builds. The dataset is held across them all."""
    from diffusets_jax.cli import main
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_model_dir

    a = tiny_model_dir(tmp_path / "a", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    model_dirs.write_component(a, "clip", clip[0], clip[1], provenance={"source": "test"})
    b = shutil.copytree(a, tmp_path / "b")  # a second model: its weights do not matter here
    add_readers_lock(dataset.data_dir)  # as `prepare` leaves it
    replaced = []

    def evaluate_after_a_replacement_tried(*args, **kwargs):
        try:  # what `prepare --overwrite` takes before it moves the folder
            with exclusive_lock(dataset.data_dir, "busy", name=READERS_LOCK):
                replaced.append(True)
        except ValueError:
            replaced.append(False)
        return {"settings": {}}

    monkeypatch.setattr(ev, "evaluate_split", evaluate_after_a_replacement_tried)
    assert main(["evaluate", "--model-dir", str(a), str(b), "--dataset", dataset.data_dir, "--split", "validation",
                 "--out", str(tmp_path / "eval")]) == 0
    assert replaced == [False, False]
    with exclusive_lock(dataset.data_dir, "busy", name=READERS_LOCK):  # released once every model is scored
        pass


@pytest.mark.multiprocess
def test_a_host_refused_its_reference_split_stops_every_host(dataset, tmp_path):
    """Each host of an `evaluate` run reads the reference split from its own disk: one finding it being replaced (a
    `prepare --overwrite` holds the readers lock) is refused, and the other stops with that line instead of waiting
    at the next collective until the coordination service ends it (run_worker_pair fails a process still waiting)."""
    import json
    import shutil

    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock
    from tests.helpers.two_processes import run_worker_pair

    own_disk = tmp_path / "process1" / "tiny_ecg"
    shutil.copytree(dataset.data_dir, own_disk)
    add_readers_lock(own_disk)
    results = [tmp_path / f"process{i}.json" for i in range(2)]
    with exclusive_lock(own_disk, "busy", name=READERS_LOCK):
        run_worker_pair("evaluate_two_process_worker.py",
                        lambda i: [dataset.data_dir if i == 0 else own_disk, results[i]], timeout=90)
    first, second = (json.loads(path.read_text()) for path in results)
    assert second == {"error": f"{own_disk} is being replaced now (a prepare or encode with --overwrite): wait for "
                               "it to finish, then start again"}, second
    assert first == {"error": f"process 1 of 2 stopped: {second['error']}"}, first


def test_score_puts_each_metric_at_the_papers_level(clip):
    rng = np.random.default_rng(0)
    rates = rng.uniform(55, 110, 12)
    real, generated = synthetic_set(rng, rates), synthetic_set(rng, rates)
    proto = ev.PROTOCOLS["fast"]
    real_m, gen_m = ev.measure(real, clip, proto.heart_rate_method), ev.measure(generated, clip, proto.heart_rate_method)
    text = clip[0].apply(clip[1], rng.standard_normal((12, tiny_ecg_dataset.EMBEDDING_DIM)).astype(np.float32),
                         method=CLIP.encode_text)
    result = ev.score(real_m, gen_m, pairs=np.arange(12), condition_hr=rates, text_features=np.asarray(text),
                      subject_ids=np.arange(12), proto=proto, n_boot=50)
    signal, feature = result["signal_level"], result["feature_level"]
    assert set(signal) >= {"fid", "rfid", "precision", "recall", "f1"} and signal["k"] == 3
    assert set(feature) >= {"heart_rate_mae_bpm", "measured", "unmeasurable", "method"}
    # The feature level is exactly the MAE of the measured rates against the conditions.
    ok = np.isfinite(gen_m["heart_rate"])
    assert feature["heart_rate_mae_bpm"] == pytest.approx(np.mean(np.abs(gen_m["heart_rate"][ok] - rates[ok])))
    assert feature["heart_rate_mae_bpm"] < 3 and feature["unmeasurable"] == 0  # synthetic ECGs beat at their rate
    assert -1 <= result["diagnostic_level"]["clip_score_generated"] <= 1
    metrics = {(m["metric"], m["comparison"]) for m in result["clinical"]["metrics"]}
    assert {("heart_rate_mae", "generated_vs_condition"), ("qrs_f1", "generated_vs_real"),
            ("einthoven_rmse", "generated")} <= metrics
    # Identical sets: every generated point lies on the real manifold and vice versa.
    same = ev.score(real_m, real_m, pairs=np.arange(12), condition_hr=rates, text_features=None, subject_ids=None,
                    proto=proto, n_boot=20)
    assert same["signal_level"]["precision"] == same["signal_level"]["recall"] == 1.0
    assert same["signal_level"]["fid"] == pytest.approx(0.0, abs=1e-6)


def test_constant_real_features_leave_rfid_undefined_not_the_run_failed(tmp_path):
    """A collapsed CLIP gives every ECG one feature vector: the real-vs-real FID is 0 and rFID undefined, which
    stopped the evaluation with no report after every ECG was generated and measured."""
    from diffusets_jax.metrics.clinical import measure_ecgs

    rng = np.random.default_rng(3)
    rates = np.array([60.0, 70.0, 80.0, 90.0, 100.0, 110.0])
    ecgs = synthetic_set(rng, rates)
    measured = {"heart_rate": rates, "lead_std": ecgs.std(axis=1), "abs_amplitude": np.abs(ecgs).mean(axis=(1, 2)),
                "clinical": measure_ecgs(ecgs)}
    real = {**measured, "features": np.ones((6, 8), np.float32)}
    generated = {**measured, "features": rng.normal(size=(6, 8)).astype(np.float32)}
    proto = ev.PROTOCOLS["fast"]
    report = {"protocol": {"name": "fast", "description": proto.description}, "settings": {},
              **ev.score(real, generated, pairs=np.arange(6), condition_hr=rates, text_features=None,
                         subject_ids=None, proto=proto, n_boot=10)}
    signal = report["signal_level"]
    assert signal["rfid"] is None and signal["real_vs_real_fid"] == pytest.approx(0.0, abs=1e-12)
    # FID itself is defined: |mu_g - 1|^2 + tr(S_g), the real covariance being 0.
    features = generated["features"].astype(np.float64)
    expected = np.sum((features.mean(axis=0) - 1.0) ** 2) + np.trace(np.cov(features, rowvar=False))
    assert signal["fid"] == pytest.approx(expected, rel=1e-5)
    assert "real-vs-real FID is 0" in ev.render_markdown(report)


def test_per_condition_rows_and_the_written_report(clip, tmp_path):
    rng = np.random.default_rng(1)
    rates = np.array([60.0] * 6 + [120.0] * 6)
    real, generated = synthetic_set(rng, rates), synthetic_set(rng, np.repeat(rates, 2))
    proto = ev.PROTOCOLS["fast"]
    real_m, gen_m = ev.measure(real, clip, proto.heart_rate_method), ev.measure(generated, clip, proto.heart_rate_method)
    pairs = np.repeat(np.arange(12), 2)  # two samples per record
    report = {"protocol": {"name": "fast", "description": proto.description}, "settings": {"n": 24},
              **ev.score(real_m, gen_m, pairs=pairs, condition_hr=rates[pairs], text_features=None, subject_ids=None,
                         proto=proto, n_boot=20)}
    groups = {"snb": np.flatnonzero(rates[pairs] == 60), "snt": np.flatnonzero(rates[pairs] == 120), "af": []}
    report["by_condition"] = ev.score_by_condition(real_m, gen_m, groups, pairs=pairs, condition_hr=rates[pairs],
                                                   text_features=None, proto=proto)
    rows = {r["condition"]: r for r in report["by_condition"]}
    assert rows["snb"]["records"] == 6 and rows["snb"]["samples"] == 12 and "f1" in rows["snb"]
    # The real ECGs' own clinical rows are over the 12 records, each once (they counted each once per sample).
    n_of = {(m["metric"], m["comparison"]): m["n"] for m in report["clinical"]["metrics"]}
    assert n_of[("heart_rate_mae", "real_vs_condition")] == n_of[("einthoven_rmse", "real")] == 12
    assert n_of[("heart_rate_mae", "generated_vs_condition")] == n_of[("einthoven_rmse", "generated")] == 24
    assert rows["snt"]["heart_rate_mae_bpm"] < 3 and rows["af"]["note"] == "no record of this condition"
    # Unpaired samples (another generator's): a condition no sample has may still have records in the split, which
    # the row counted as 0 under "no record of this condition".
    unpaired = ev.score_by_condition(real_m, gen_m, {"af": [], "snb": groups["snb"]}, pairs=None,
                                     condition_hr=rates[pairs], text_features=None, proto=proto,
                                     real_groups={"af": [0, 3, 5], "snb": list(range(6))})
    assert unpaired[0] == {"condition": "af", "records": 3, "samples": 0, "note": "no sample of this condition"}
    assert unpaired[1]["records"] == 6 and unpaired[1]["samples"] == 12
    written = ev.write_report(report, tmp_path, condition_hr=rates[pairs], measured_hr=gen_m["heart_rate"],
                              examples=[(real[0], generated[0], {"prompt": "x", "heart_rate": 60.0})])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["signal_level"]["fid"] == written["signal_level"]["fid"] and "per_record" not in on_disk["clinical"]
    assert len(json.loads((tmp_path / "clinical_per_record.json").read_text())["generated"]["heart_rate_bpm"]) == 24
    markdown = (tmp_path / "report.md").read_text()
    assert "| signal | FID" in markdown and "| feature | heart-rate MAE" in markdown
    assert "Model-free clinical metrics" in markdown and "| snb | 6 | 12 |" in markdown
    assert "24 generated records of 12 real records" in markdown
    # A condition's heart-rate MAE says how many of its samples it is over (unmeasurable ones are left out of it).
    snb = rows["snb"]
    snb_line = next(line for line in markdown.splitlines() if line.startswith("| snb |"))
    assert f"({snb['measured']} of {snb['measured'] + snb['unmeasurable']} measured)" in snb_line
    for name in ("heart_rate_scatter.png", "by_condition.png", "pair_00.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    ev.compare_reports([("a", on_disk), ("b", on_disk)], tmp_path)
    assert json.loads((tmp_path / "comparison.json").read_text())["models"][1]["model"] == "b"
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_select_by_condition_is_seeded_and_capped():
    reports = [["Sinus rhythm"]] * 30 + [["Atrial fibrillation"]] * 3
    rules = load_rules().select(["sn", "af"])
    first = ev.select_by_condition(reports, rules, per_condition=10, seed=0)
    assert len(first["sn"]) == 10 and first["af"] == [30, 31, 32]
    assert first == ev.select_by_condition(reports, rules, per_condition=10, seed=0)
    assert first["sn"] != ev.select_by_condition(reports, rules, per_condition=10, seed=1)["sn"]
    # A condition's records are its own: the same with other conditions selected, or in another order.
    assert ev.select_by_condition(reports, load_rules().select(["af", "sn"]), per_condition=10, seed=0) == first
    assert ev.select_by_condition(reports, load_rules().select(["sn"]), per_condition=10, seed=0)["sn"] == first["sn"]
    assert ev.select_by_condition(reports, load_rules(), per_condition=10, seed=0)["sn"] == first["sn"]


def test_scoring_another_generators_samples_needs_no_model(clip, dataset, tmp_path):
    """An NPZ with ECGs at 500 Hz and their conditions, scored against the tiny split (prompts found there)."""
    from scipy.signal import resample

    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(8)]
    ecg_500 = resample(np.stack([e["ecg"] for e in examples]), 5000, axis=1)  # another generator's rate
    np.savez(tmp_path / "other.npz", ecg=ecg_500, prompt=np.array([e["prompt"] for e in examples]),
             sex=np.array([e["sex"] for e in examples]), age=np.array([e["age"] for e in examples]),
             heart_rate=np.array([e["heart_rate"] for e in examples]))
    generated = read_generated(tmp_path / "other.npz")
    assert generated.ecg.shape == (8, 1024, 12)
    report = ev.evaluate_generated(generated, clip, dataset.data_dir, "validation", tmp_path / "out",
                                   rules=load_rules().select(["sn"]), n_boot=20)
    assert report["signal_level"]["n_generated"] == 8 and report["signal_level"]["n_real"] == 13
    assert report["diagnostic_level"]["clip_score_generated"] is not None  # text embeddings found by prompt
    assert report["by_condition"][0]["condition"] == "sn" and report["by_condition"][0]["samples"] == 8
    assert (tmp_path / "out" / "report.md").exists()


def test_another_generators_samples_are_reported_against_the_raw_records_they_were_scored_on(clip, dataset, tmp_path):
    """`evaluate --generated` runs under --protocol paper by default, but samples nothing and has no VAE: the
    report recorded the paper protocol as such ("VAE-reconstructed references, DDPM-1000") while the samples were
    scored against the raw real ECGs. It records what was done, with the protocol's heart-rate method."""
    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(5)]
    np.savez(tmp_path / "other.npz", ecg=np.stack([e["ecg"] for e in examples]),
             heart_rate=np.array([e["heart_rate"] for e in examples]))
    report = ev.evaluate_generated(read_generated(tmp_path / "other.npz"), clip, dataset.data_dir, "validation",
                                   tmp_path / "out", proto=ev.protocol("paper"), n_boot=20)
    assert report["protocol"]["references"] == "raw"
    assert report["protocol"]["sampler"] is None and report["protocol"]["steps"] is None
    assert report["protocol"]["heart_rate_method"] == report["feature_level"]["method"] == "xqrs_first_lead"
    written = (tmp_path / "out" / "report.md").read_text()
    assert "reconstructed" not in written and "DDPM" not in written
    assert "against the raw real ECGs" in written and "first-lead XQRS heart rate" in written
    assert json.loads((tmp_path / "out" / "report.json").read_text())["protocol"]["references"] == "raw"


def test_samples_without_a_condition_heart_rate_are_not_counted_as_unmeasurable(clip, dataset, tmp_path):
    """Another generator's NPZ may give no `heart_rate` (documented: empty or NaN where unknown): its measurable
    ECGs were reported "5 of 5 unmeasurable", as if the generator made broken ECGs. They are counted apart."""
    rng = np.random.default_rng(0)
    ecg = synthetic_set(rng, [60.0, 75.0, 90.0, 105.0, 120.0])
    np.savez(tmp_path / "some.npz", ecg=ecg, heart_rate=np.array([60.0, 75.0, np.nan, np.nan, np.nan]))
    report = ev.evaluate_generated(read_generated(tmp_path / "some.npz"), clip, dataset.data_dir, "validation",
                                   tmp_path / "out", proto=ev.protocol("fast"), n_boot=20)
    feature = report["feature_level"]
    assert (feature["measured"], feature["unmeasurable"], feature["without_condition"]) == (2, 0, 3)
    assert feature["heart_rate_mae_bpm"] < 3  # the two with a condition beat at it
    row = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines()
               if line.startswith("| feature |"))
    assert "(0 of 2 unmeasurable; 3 without a condition heart rate; consensus)" in row


@pytest.mark.slow
def test_real_records_with_nan_samples_are_no_reference(clip, tmp_path):
    """`prepare` keeps a recording with missing samples (resampling spreads them over the lead), so a split may
    hold an ECG with NaN: its CLIP features made FID fail ("non-finite values in the features; check the feature
    extractor") after every ECG was generated and measured. Such records are left out and counted."""
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.pipeline import ECGGenerator
    from tests.helpers import tiny_report_dataset
    from tests.helpers.tiny_models import tiny_model_dir

    data = tiny_report_dataset.build(str(tmp_path / "tfds")).data_dir  # train[5] has a NaN sample
    assert ev.load_split(data, "train")["finite"].sum() == 23  # of 24
    examples = [tiny_report_dataset.example(1000 + i) for i in range(6)]
    np.savez(tmp_path / "other.npz", ecg=np.stack([e["ecg"] for e in examples]),
             heart_rate=np.array([e["heart_rate"] for e in examples]))
    report = ev.evaluate_generated(read_generated(tmp_path / "other.npz"), clip, data, "train", tmp_path / "gen",
                                   rules=load_rules().select(["sn"]), n_boot=20)
    assert report["signal_level"]["n_real"] == 23 and report["signal_level"]["fid"] is not None
    assert report["settings"]["real_records_non_finite"] == 1
    assert "1 real records of the split have NaN or inf samples" in (tmp_path / "gen" / "report.md").read_text()
    model = tiny_model_dir(tmp_path / "model", text_dim=tiny_report_dataset.EMBEDDING_DIM)
    generator = ECGGenerator(model, sampler_config("ddim", steps=2), batch_size=8)
    report = ev.evaluate_split(generator, clip, data, "train", tmp_path / "split", proto=ev.protocol("fast"),
                               n_boot=20, progress=False)
    assert report["settings"]["records"] == 23 and report["settings"]["real_records_non_finite"] == 1
    assert report["signal_level"]["n_real"] == 23 and report["signal_level"]["fid"] is not None
    by_condition = ev.evaluate_split(generator, clip, data, "train", tmp_path / "rules", proto=ev.protocol("fast"),
                                     rules=load_rules().select(["pvc"]), records_per_condition=50, n_boot=20,
                                     progress=False)
    # Six PVC records in 24 (every fourth); train[5], one of them, has the NaN and is not picked.
    assert by_condition["settings"]["records"] == 5 and by_condition["by_condition"][0]["records"] == 5


@pytest.mark.slow
def test_the_report_names_the_sampler_that_ran_not_the_protocols(clip, dataset, tmp_path):
    """--sampler / --steps / --guidance-scale replace the protocol's sampler; the report's protocol (and report.md's
    first line) said "DPM-Solver++ (20 steps)" or "DDPM-1000" of whatever ran."""
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.pipeline import ECGGenerator
    from tests.helpers.tiny_models import tiny_model_dir

    model = tiny_model_dir(tmp_path / "model", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    generator = ECGGenerator(model, sampler_config("ddim", steps=2, guidance_scale=1.5), batch_size=8)
    report = ev.evaluate_split(generator, clip, dataset.data_dir, "validation", tmp_path / "out",
                               proto=ev.protocol("fast"), limit=4, n_boot=5, progress=False)
    recorded = report["protocol"]
    assert (recorded["sampler"], recorded["steps"], recorded["guidance_scale"]) == ("ddim", 2, 1.5)
    assert recorded["references"] == "raw" and recorded["heart_rate_method"] == "consensus"
    first = (tmp_path / "out" / "report.md").read_text().splitlines()[2]
    assert "DDIM (2 steps, guidance scale 1.5)" in first and "in place of the protocol's DPM-Solver++ (20 steps)" in first
    # The protocol's own sampler: its own description, with the steps resolved.
    same = ev.split_protocol(ev.protocol("paper"), sampler_config("ddpm"))
    assert same["description"] == ev.protocol("paper").description and same["steps"] == 1000


def test_failed_generations_are_counted_and_left_out_of_every_metric(clip, dataset, tmp_path, capsys):
    """ECGs with NaN or inf samples (a diverged model, an overflow) would make FID and precision/recall undefined and
    stop the evaluation after all the generating: they are counted in the report and scored by no metric."""
    from diffusets_jax.cli import _print_levels
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.io.generated import finite_only
    from diffusets_jax.pipeline import ECGGenerator
    from tests.helpers.non_finite import NonFiniteAt
    from tests.helpers.tiny_models import tiny_model_dir

    model = tiny_model_dir(tmp_path / "model", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    generator = ECGGenerator(model, sampler_config("ddim", steps=2), batch_size=8)
    proto = ev.protocol("fast")
    clean = ev.evaluate_split(generator, clip, dataset.data_dir, "validation", tmp_path / "clean", proto=proto,
                              n_boot=20, progress=False)
    report = ev.evaluate_split(NonFiniteAt(generator, [0, 5, 12]), clip, dataset.data_dir, "validation",
                               tmp_path / "spoiled", proto=proto, n_boot=20, progress=False)
    assert clean["settings"]["failed_generations"] == 0 and report["settings"]["failed_generations"] == 3
    assert clean["signal_level"]["n_generated"] == 13 and report["signal_level"]["n_generated"] == 10
    assert report["signal_level"]["fid"] is not None and report["signal_level"]["precision"] is not None
    assert report["feature_level"]["measured"] + report["feature_level"]["unmeasurable"] == 10
    assert "3 more generated ECGs had NaN or inf samples" in (tmp_path / "spoiled" / "report.md").read_text()
    _print_levels("spoiled", report)  # the command's output: the levels on stdout, one line on stderr
    assert capsys.readouterr().err == ("diffusets-jax evaluate: warning: 3 of 13 generated ECGs had NaN or inf "
                                       "samples and are in no metric (settings.failed_generations in "
                                       "spoiled/report.json)\n")
    with pytest.raises(RunFailed, match="every one of the 13 generated ECGs has NaN or inf samples"):
        ev.evaluate_split(NonFiniteAt(generator, range(13)), clip, dataset.data_dir, "validation",
                          tmp_path / "all", proto=proto, n_boot=20, progress=False)
    # Another generator's samples: the same, counted beside the records a reader skipped.
    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(8)]
    ecg = np.stack([e["ecg"] for e in examples])
    ecg[2, 10, 0], ecg[6, 500, 11] = np.nan, -np.inf
    np.savez(tmp_path / "other.npz", ecg=ecg, prompt=np.array([e["prompt"] for e in examples]),
             heart_rate=np.array([e["heart_rate"] for e in examples]))
    generated = read_generated(tmp_path / "other.npz")
    report = ev.evaluate_generated(generated, clip, dataset.data_dir, "validation", tmp_path / "other", n_boot=20)
    assert report["signal_level"]["n_generated"] == 6
    assert report["settings"]["samples_skipped"] == {"non-finite samples": 2}
    assert ("2 more samples of the set were skipped and are in no metric (non-finite samples: 2)"
            in (tmp_path / "other" / "report.md").read_text())
    _print_levels("other", report)
    assert capsys.readouterr().err.endswith("2 of 8 samples of " + str(tmp_path / "other.npz") + " were skipped "
                                            "(non-finite samples: 2) and are in no metric\n")
    ecg[:, 0, 0] = np.nan
    np.savez(tmp_path / "all_nan.npz", ecg=ecg)
    with pytest.raises(ValueError, match="every one of its 8 ECGs has NaN or inf samples"):
        finite_only(read_generated(tmp_path / "all_nan.npz"))


def test_protocols_and_their_errors():
    assert ev.protocol("paper").references == "reconstruction" and ev.protocol("paper").steps == 1000
    assert ev.protocol("fast").references == "raw"
    with pytest.raises(ValueError, match="--protocol must be one of"):
        ev.protocol("quick")


@pytest.mark.slow
def test_evaluate_command_paper_protocol_by_condition_and_ablation(clip, dataset, tmp_path, capsys, monkeypatch):
    """`evaluate` end to end: the paper protocol (reconstructed references, DDPM; 2 steps to stay quick), per
    condition, and two model directories (with and without patient information) compared side by side."""
    from diffusets_jax.cli import main
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_model_dir

    with_patient = tiny_model_dir(tmp_path / "with", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    without = tiny_model_dir(tmp_path / "without", text_dim=tiny_ecg_dataset.EMBEDDING_DIM, patient_features="none")
    model_dirs.write_component(with_patient, "clip", clip[0], clip[1], provenance={"source": "test"})
    args = ["evaluate", "--model-dir", str(with_patient), str(without), "--labels", "with", "without",
            "--dataset", dataset.data_dir, "--split", "validation", "--protocol", "paper", "--steps", "2",
            "--by-condition", "--conditions", "sn", "--records-per-condition", "5", "--samples-per-record", "2",
            "--batch-size", "8", "--n-boot", "20", "--workers", "1", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    for label in ("with", "without"):
        report = json.loads((tmp_path / "eval" / label / "report.json").read_text())
        assert report["protocol"]["name"] == "paper" and report["protocol"]["references"] == "reconstruction"
        assert report["signal_level"]["n_generated"] == 10 and report["signal_level"]["n_real"] == 5
        assert report["by_condition"][0]["condition"] == "sn" and report["by_condition"][0]["samples"] == 10
    assert json.loads((tmp_path / "eval" / "comparison.json").read_text())["models"][1]["model"] == "without"
    capsys.readouterr()
    # Bad combinations are one line before anything runs.
    assert main(["evaluate", "--dataset", dataset.data_dir, "--out", str(tmp_path / "x")]) == 2
    assert "either --model-dir" in capsys.readouterr().err
    assert main(["evaluate", "--model-dir", str(with_patient), "--labels", "a", "b", "--dataset", dataset.data_dir,
                 "--out", str(tmp_path / "y")]) == 2
    assert "one label per --model-dir" in capsys.readouterr().err
    # More steps than the models' schedule has: one line naming --steps, found from the model index before the
    # CLIP loads (the generators were built after it).
    with monkeypatch.context() as patched:
        patched.setattr(ev, "load_clip", lambda *_, **__: pytest.fail("the CLIP loaded before --steps was checked"))
        at = args.index("--steps") + 1
        assert main([*args[:at], "2000", *args[at + 1:-1], str(tmp_path / "z")]) == 2
    assert "steps 2000 (--steps) is more than this model's 1000-step schedule" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_an_evaluation_of_several_models_stopped_midway_keeps_the_models_it_scored(clip, dataset, tmp_path, capsys,
                                                                                   monkeypatch):
    """Ctrl-C (or a kill) while the second of two models is scored, then the same command again: the first model's
    report is kept, not generated and scored again (hours each with the paper's 1000-step DDPM), and the reports
    and the comparison are those of an uninterrupted run."""
    from diffusets_jax.cli import main
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_model_dir

    first = tiny_model_dir(tmp_path / "first", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    second = tiny_model_dir(tmp_path / "second", text_dim=tiny_ecg_dataset.EMBEDDING_DIM, patient_features="none")
    model_dirs.write_component(first, "clip", clip[0], clip[1], provenance={"source": "test"})
    args = ["evaluate", "--model-dir", str(first), str(second), "--dataset", dataset.data_dir, "--split",
            "validation", "--protocol", "fast", "--steps", "2", "--limit", "6", "--batch-size", "8", "--n-boot", "20",
            "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    scored = []
    real_evaluate = ev.evaluate_split

    def evaluate_split(generator, *rest, **kwargs):
        scored.append(generator.model_dir)
        if stop and len(scored) == 2:
            raise KeyboardInterrupt
        return real_evaluate(generator, *rest, **kwargs)

    monkeypatch.setattr(ev, "evaluate_split", evaluate_split)
    stop = True
    assert main([*args, "--out", str(tmp_path / "eval")]) == 130
    assert (tmp_path / "eval" / "first" / "report.md").is_file() and not (tmp_path / "eval" / "comparison.json").exists()
    scored.clear()
    stop = False
    assert main([*args, "--out", str(tmp_path / "eval")]) == 0
    assert [str(d) for d in scored] == [str(second)]
    capsys.readouterr()
    for name in ("first/report.json", "second/report.json", "comparison.json"):
        whole, resumed = (json.loads((tmp_path / out / name).read_text()) for out in ("whole", "eval"))
        assert resumed == whole, name


def test_evaluate_says_when_its_batch_size_is_rounded_up_to_the_devices(clip, dataset, tmp_path, capsys,
                                                                        monkeypatch):
    """--batch-size 1 on the suite's 8 CPU devices generated (and fingerprinted) batches of 8 without a word, so the
    same command on a host with another device count was refused as "batch_size: 1 -> 8", a value never given."""
    from diffusets_jax.cli import main
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import tiny_model_dir

    devices = jax.local_device_count()
    models = tiny_model_dir(tmp_path / "models", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    model_dirs.write_component(models, "clip", clip[0], clip[1], provenance={"source": "test"})

    def stop(*_, **__):
        raise ValueError("stopped before the CLIP loads")

    monkeypatch.setattr(ev, "load_clip", stop)  # the note comes before it; nothing need run
    assert main(["evaluate", "--model-dir", str(models), "--dataset", dataset.data_dir,
                 "--split", "validation", "--steps", "2", "--batch-size", "1", "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "stopped before the CLIP loads" in err
    notes = [line for line in err.splitlines() if "rounded up" in line]
    expected = [] if devices == 1 else [
        f"diffusets-jax evaluate: note: batches of 1 ECGs are rounded up to {devices}, a multiple of this host's "
        f"{devices} devices: the generated ECGs (and the run's fingerprint) are those of --batch-size {devices}"]
    assert notes == expected


def test_each_model_gets_its_own_label_and_report_folder(tmp_path):
    """Two model directories named alike (train's default WORKDIR/model) were both labelled `model`: the second
    report was written into the first one's folder. Labels are the shortest path endings that tell them apart."""
    a, b = tmp_path / "runs" / "a" / "model", tmp_path / "runs" / "b" / "model"
    assert ev.model_labels([a, b]) == ["a-model", "b-model"]
    assert ev.model_labels([tmp_path / "with", tmp_path / "without"]) == ["with", "without"]
    assert ev.model_labels([tmp_path / "x" / "model", tmp_path / "y" / "x" / "model"])[1] == "y-x-model"
    assert ev.model_labels([a, b], ["published", "ours"]) == ["published", "ours"]
    for labels, expected in ((["same", "same"], "repeat a name"), (["ok", "a/b"], "give a plain name"),
                             (["ok", ".."], "give a plain name"), (["only-one"], "one label per --model-dir")):
        with pytest.raises(ValueError, match=expected):
            ev.model_labels([a, b], labels)
    with pytest.raises(ValueError, match="is given twice"):
        ev.model_labels([a, tmp_path / "runs" / "a" / ".." / "a" / "model"])


def index_only_models(path, clip_conditioning=None):
    """A model directory whose index records a VAE, a U-Net conditioned as `tiny_model_dir(text_dim=8)`'s (the tiny
    dataset's embedder) and a CLIP, with placeholder weights: what is refused must be refused before any load."""
    from diffusets_jax.diffusion.schedule import DiffusionSpec
    from diffusets_jax.models import model_dir as model_dirs
    from diffusets_jax.models.unet import UNet
    from diffusets_jax.models.vae import VAE
    from tests.helpers.tiny_models import openai_conditioning

    dim, placeholder = tiny_ecg_dataset.EMBEDDING_DIM, {"params": {"w": np.zeros(1, np.float32)}}
    model_dirs.write_component(path, "vae", VAE(widths=(16, 16, 16), groups=4, num_res_blocks=1), placeholder,
                               provenance={"source": "test"})
    unet = UNet(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=16, up_attention_dims=(32, 16),
                num_heads=2, bottleneck_heads=2, text_dim=dim)
    model_dirs.write_component(path, "unet", unet, placeholder, provenance={"source": "test"},
                               conditioning=openai_conditioning(dim), diffusion=DiffusionSpec())
    model_dirs.write_component(path, "clip", CLIP(text_dim=dim), placeholder, provenance={"source": "test"},
                               conditioning=clip_conditioning)
    return path


def with_card_conditioning(dataset, dest, conditioning):
    """A copy of the dataset folder whose card says its text embeddings were made with `conditioning`."""
    import shutil

    from diffusets_jax.data.card import CARD_FILE

    shutil.copytree(dataset, dest)
    card = json.loads((dest / CARD_FILE).read_text())
    (dest / CARD_FILE).write_text(json.dumps({**card, "conditioning": conditioning.to_json()}))
    return dest


def test_a_model_is_not_evaluated_on_embeddings_of_another_embedder(dataset, tmp_path, capsys, monkeypatch):
    """A dataset whose stored text embeddings come from another embedder of the same width (or of prompts in
    another style) used to be evaluated: the U-Net conditioned on, and the CLIP scoring, vectors they never saw.
    Refused in one line before any weights load, as `diagnose` refuses such latents."""
    from diffusets_jax.cli import main
    from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import openai_conditioning

    def no_weights(*_, **__):
        raise AssertionError("weights were loaded before the embeddings were checked")

    monkeypatch.setattr(model_dirs, "load_component", no_weights)
    dim = tiny_ecg_dataset.EMBEDDING_DIM
    other = with_card_conditioning(dataset.data_dir, tmp_path / "other", ConditioningSpec(EmbedderSpec(
        "openai", "text-embedding-3-small", dim, "openai/text-embedding-3-small/8"), "free_text"))
    free_text = with_card_conditioning(dataset.data_dir, tmp_path / "free_text", ConditioningSpec(
        EmbedderSpec("openai", f"fake-embedding-{dim}", dim), "free_text"))
    models = index_only_models(tmp_path / "models")
    for data in (other, free_text):
        assert main(["evaluate", "--model-dir", str(models), "--dataset", str(data), "--split", "validation",
                     "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--dataset {data} holds openai" in err
        assert f"but the U-Net of --model-dir {models} was conditioned on openai 'fake-embedding-{dim}'" in err
    # A CLIP that records what its text tower learnt from is checked too, also with --generated (the split's
    # embeddings of the samples' prompts go through it); one that records nothing cannot be.
    np.savez(tmp_path / "g.npz", ecg=np.zeros((2, 1024, 12), np.float32))
    clip_dir = index_only_models(tmp_path / "clip", clip_conditioning=openai_conditioning(dim))
    assert main(["evaluate", "--generated", str(tmp_path / "g.npz"), "--clip", str(clip_dir), "--dataset",
                 str(other), "--split", "validation", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"but the CLIP of --clip {clip_dir} was conditioned on" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="weights were loaded"):  # the matching dataset goes on to load them
        main(["evaluate", "--generated", str(tmp_path / "g.npz"), "--clip", str(clip_dir), "--dataset",
              str(dataset.data_dir), "--split", "validation", "--out", str(tmp_path / "out")])


def test_a_clip_replaced_while_evaluate_starts_is_not_scored_with_under_the_old_uid(clip, dataset, tmp_path, capsys,
                                                                                 monkeypatch):
    """A `train clip` finishing into the --clip directory between the index read (whose uid the run records and its
    inputs were checked against) and the weights load: the report was scored with the new CLIP, recorded as the
    old one. Refused in one line, before --out is claimed."""
    from diffusets_jax.cli import main
    from diffusets_jax.models import model_dir as model_dirs

    model_dirs.write_component(tmp_path / "clip", "clip", clip[0], clip[1], provenance={"source": "test"})
    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(6)]
    np.savez(tmp_path / "g.npz", ecg=np.stack([e["ecg"] for e in examples]),
             prompt=np.array([e["prompt"] for e in examples]), heart_rate=np.array([e["heart_rate"] for e in examples]))
    check = ev.check_text_embeddings

    def check_then_another_run_writes(*args, **kwargs):
        check(*args, **kwargs)
        retrained = jax.tree.map(lambda x: np.asarray(x) + 1.0, clip[1])
        model_dirs.write_component(tmp_path / "clip", "clip", clip[0], retrained, provenance={"source": "retrained"},
                                   overwrite=True)

    monkeypatch.setattr(ev, "check_text_embeddings", check_then_another_run_writes)
    assert main(["evaluate", "--generated", str(tmp_path / "g.npz"), "--clip", str(tmp_path / "clip"), "--dataset",
                 str(dataset.data_dir), "--split", "validation", "--n-boot", "20", "--workers", "1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its clip/ was replaced since this run read it" in err
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_another_seed_or_edited_rules_is_refused(clip, dataset, tmp_path, capsys):
    """A finished --generated report was replaced by a rerun with another --seed (rFID's draws, the bootstrap
    intervals) or an edited --rules file (recorded by name only): both change the report, so both are another run."""
    from diffusets_jax.cli import main
    from diffusets_jax.models import model_dir as model_dirs

    model_dirs.write_component(tmp_path / "clip", "clip", clip[0], clip[1], provenance={"source": "test"})
    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(6)]
    np.savez(tmp_path / "g.npz", ecg=np.stack([e["ecg"] for e in examples]),
             prompt=np.array([e["prompt"] for e in examples]), heart_rate=np.array([e["heart_rate"] for e in examples]))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"name": "sn", "any": ["sinus"]}]}))
    out = tmp_path / "out"
    args = ["evaluate", "--generated", str(tmp_path / "g.npz"), "--clip", str(tmp_path / "clip"), "--dataset",
            str(dataset.data_dir), "--split", "validation", "--rules", str(rules), "--n-boot", "20", "--workers", "1",
            "--out", str(out)]
    assert main(args) == 0
    report = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with other settings (seed: 0 -> 5)" in err
    rules.write_text(json.dumps({"rules": [{"name": "sn", "any": ["sinus rhythm"]}]}))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with other settings (rules.rules: [{\"any\": [\"sinus\"]" in err
    assert (out / "report.json").read_bytes() == report


def test_samples_with_report_statements_but_no_prompt_find_their_texts(clip, dataset, tmp_path, monkeypatch):
    """An NPZ with `report` but no `prompt` was matched to the split by the statements joined with '|', which is no
    prompt style, so with the split's prompts in the published ordered style no sample had a text and the CLIP
    score was n/a. The split's embedding of the same statements is its embedding of the same prompt."""
    from diffusets_jax.conditioning.prompts import make_prompt

    read_split = ev.read_reference_split

    def ordered_prompts(*args, **kwargs):  # the tiny split's prompts are its statements joined with '|'
        real = read_split(*args, **kwargs)
        return {**real, "prompt": [make_prompt(list(lines), "ordered") for lines in real["report_lines"]]}

    monkeypatch.setattr(ev, "read_reference_split", ordered_prompts)
    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(4)]
    np.savez(tmp_path / "report.npz", ecg=np.stack([e["ecg"] for e in examples]),
             report=np.array(["|".join(e["report_lines"]) for e in examples]),
             heart_rate=np.array([e["heart_rate"] for e in examples]))
    report = ev.evaluate_generated(read_generated(tmp_path / "report.npz"), clip, dataset.data_dir, "validation",
                                   tmp_path / "out", n_boot=20)
    assert "samples_without_text" not in report["diagnostic_level"]
    assert np.isfinite(report["diagnostic_level"]["clip_score_generated"])


def test_samples_without_a_text_are_scored_without_numpy_warnings(clip, dataset, tmp_path):
    """Samples whose prompts the split does not hold have no text for the CLIP score: their empty selection was
    scored at every level, then dropped, and a normal run printed numpy's "Mean of empty slice" and "invalid value
    encountered in divide"."""
    import warnings

    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(6)]
    ecg = np.stack([e["ecg"] for e in examples])
    heart_rate = np.array([e["heart_rate"] for e in examples])
    np.savez(tmp_path / "none.npz", ecg=ecg, prompt=np.array([f"unseen {i}" for i in range(6)]), heart_rate=heart_rate)
    np.savez(tmp_path / "some.npz", ecg=ecg, heart_rate=heart_rate,
             prompt=np.array([e["prompt"] for e in examples[:4]] + ["unseen 0", "unseen 1"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        none = ev.evaluate_generated(read_generated(tmp_path / "none.npz"), clip, dataset.data_dir, "validation",
                                     tmp_path / "none", n_boot=20)
        some = ev.evaluate_generated(read_generated(tmp_path / "some.npz"), clip, dataset.data_dir, "validation",
                                     tmp_path / "some", n_boot=20)
    assert none["diagnostic_level"] == {"samples_without_text": 6} and none["signal_level"]["n_generated"] == 6
    assert some["diagnostic_level"]["samples_without_text"] == 2 and some["signal_level"]["n_generated"] == 6
    # The CLIP score is that of the four samples with a text, alone.
    np.savez(tmp_path / "four.npz", ecg=ecg[:4], heart_rate=heart_rate[:4],
             prompt=np.array([e["prompt"] for e in examples[:4]]))
    four = ev.evaluate_generated(read_generated(tmp_path / "four.npz"), clip, dataset.data_dir, "validation",
                                 tmp_path / "four", n_boot=20)
    assert four["diagnostic_level"]["clip_score_generated"] == pytest.approx(
        some["diagnostic_level"]["clip_score_generated"])
    # report.md says so beside the score, which read as the whole set's (report.json alone held the count).
    clip_row = lambda name: next(line for line in (tmp_path / name / "report.md").read_text().splitlines()
                                 if line.startswith("| diagnostic | CLIP score"))  # noqa: E731
    assert "(over the 4 of 6 samples with a text; 2 have none)" in clip_row("some")
    assert "n/a (over the 0 of 6 samples with a text; 6 have none)" in clip_row("none")
    assert "have none" not in clip_row("four")


def test_a_generated_sets_own_text_embeddings_are_checked_before_the_clip_loads(dataset, tmp_path, capsys,
                                                                                monkeypatch):
    """An NPZ's `text_embedding` went to the CLIP's text tower unchecked: another width failed with a traceback
    after every ECG was measured (or broadcast into a meaningless score), NaNs made a NaN score, and embeddings
    of another embedder were scored as if the CLIP understood them. Each is one line, before any weights load."""
    from diffusets_jax.cli import main
    from diffusets_jax.models import model_dir as model_dirs
    from tests.helpers.tiny_models import openai_conditioning

    def no_weights(*_, **__):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(model_dirs, "load_component", no_weights)
    dim = tiny_ecg_dataset.EMBEDDING_DIM
    conditioning = openai_conditioning(dim)
    clip_dir = index_only_models(tmp_path / "clip", clip_conditioning=conditioning)
    ecg = np.zeros((3, 1024, 12), np.float32)
    finite = np.ones((3, dim), np.float32)
    nan = finite.copy()
    nan[1, 2] = np.nan
    cases = {
        "wide": ({"text_embedding": np.ones((3, dim + 4), np.float32)},
                 f"'text_embedding' is {dim + 4}-d, but the CLIP of --clip {clip_dir} takes {dim}-d"),
        "one_wide": ({"text_embedding": np.ones((3, 1), np.float32)}, "'text_embedding' is 1-d, but the CLIP"),
        "rank3": ({"text_embedding": np.ones((3, 1, dim), np.float32)}, "'text_embedding' has shape (3, 1, 8)"),
        "nan": ({"text_embedding": nan}, "'text_embedding'[1] has NaN or inf entries"),
        "other": ({"text_embedding": finite, "embedder_id": np.array("openai/text-embedding-3-small/8")},
                  "'text_embedding' holds 'openai/text-embedding-3-small/8' embeddings, but the CLIP of --clip"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, ecg=ecg, **arrays)
        assert main(["evaluate", "--generated", str(path), "--clip", str(clip_dir), "--dataset",
                     str(dataset.data_dir), "--split", "validation", "--out", str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and message in err, (name, err)
    assert not (tmp_path / "out").exists()
    # A corpus (`sample --corpus`) records its embedder in its card: checked as a dataset's is.
    from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
    from tests.helpers.dataset_kind import as_corpus

    other = with_card_conditioning(dataset.data_dir, tmp_path / "other", ConditioningSpec(EmbedderSpec(
        "openai", "text-embedding-3-small", dim, "openai/text-embedding-3-small/8"), "ordered"))
    corpus = as_corpus(other, tmp_path / "corpus")
    assert main(["evaluate", "--generated", str(corpus), "--clip", str(clip_dir), "--dataset", str(dataset.data_dir),
                 "--split", "validation", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--generated {corpus} holds openai 'text-embedding-3-small'" in err
    assert f"but the CLIP of --clip {clip_dir} was conditioned on" in err
    with pytest.raises(AssertionError, match="weights were loaded"):
        main(["evaluate", "--generated", str(as_corpus(dataset.data_dir, tmp_path / "same_corpus")), "--clip",
              str(clip_dir), "--dataset", str(dataset.data_dir), "--split", "validation", "--out",
              str(tmp_path / "out")])
    # Embeddings of the CLIP's own width and embedder (or of an unrecorded one) go on to the weights.
    for name, extra in (("same", {"embedder_id": np.array(conditioning.embedder.embedder_id)}), ("unrecorded", {})):
        np.savez(tmp_path / f"{name}.npz", ecg=ecg, text_embedding=finite, **extra)
        with pytest.raises(AssertionError, match="weights were loaded"):
            main(["evaluate", "--generated", str(tmp_path / f"{name}.npz"), "--clip", str(clip_dir), "--dataset",
                  str(dataset.data_dir), "--split", "validation", "--out", str(tmp_path / "out")])


def test_samples_of_one_condition_are_one_cluster_of_the_bootstrap(clip, dataset, tmp_path):
    """`evaluate --generated` took each sample for its own patient: three samples of each of four records
    (`sample -n 3`, a conditions file's count) were twelve independent draws, and the intervals too narrow. Samples
    are clustered by their patient where the set names one, else by the condition they were generated from."""
    rng = np.random.default_rng(3)
    rates = np.repeat([60.0, 75.0, 90.0, 110.0], 3)
    reports = np.repeat(["Sinus rhythm", "Sinus rhythm|Normal ECG", "Sinus tachycardia", "Atrial fibrillation"], 3)
    ecg = synthetic_set(rng, rates + rng.normal(0.0, 4.0, rates.size))
    np.savez(tmp_path / "three_each.npz", ecg=ecg, report=reports, heart_rate=rates, age=np.full(12, 60.0),
             sex=np.array(["M"] * 12))
    report = ev.evaluate_generated(read_generated(tmp_path / "three_each.npz"), clip, dataset.data_dir,
                                   "validation", tmp_path / "out", proto=ev.protocol("fast"), n_boot=200)
    clinical = report["clinical"]
    assert clinical["n_records"] == 12 and clinical["n_patients"] == 4
    hr = next(row for row in clinical["metrics"]
              if (row["metric"], row["comparison"]) == ("heart_rate_mae", "generated_vs_condition"))
    # The interval is the bootstrap of the four conditions, not of twelve independent samples.
    from diffusets_jax.metrics.bootstrap import cluster_bootstrap

    error = np.abs(np.asarray(json.loads((tmp_path / "out" / "clinical_per_record.json").read_text())
                              ["generated"]["heart_rate_bpm"], float) - rates)
    conditions = np.asarray([str(c) for c in ev.sample_clusters(read_generated(tmp_path / "three_each.npz"))])
    assert len(set(conditions)) == 4 and all(len(set(conditions[i : i + 3])) == 1 for i in range(0, 12, 3))
    _, low, high = cluster_bootstrap(error, np.ones(12), conditions, n_boot=200, seed=0)
    _, low_apart, high_apart = cluster_bootstrap(error, np.ones(12), None, n_boot=200, seed=0)
    assert (hr["ci_low"], hr["ci_high"]) == pytest.approx((low, high)) != (low_apart, high_apart)
    assert "12 records in 4 clusters (by patient, else the condition generated from)" in (
        tmp_path / "out" / "report.md").read_text()
    # The patient, where the set names one, joins its records' samples; samples with no text stay apart.
    np.savez(tmp_path / "patients.npz", ecg=ecg, report=reports, heart_rate=rates,
             subject_id=np.array([7] * 6 + [-1] * 6))
    by_patient = ev.sample_clusters(read_generated(tmp_path / "patients.npz"))
    assert len(set(by_patient[:6])) == 1 and len(set(by_patient[6:])) == 2
    np.savez(tmp_path / "bare.npz", ecg=ecg, heart_rate=rates)
    assert len(set(ev.sample_clusters(read_generated(tmp_path / "bare.npz")))) == 12


def test_a_conditions_clip_score_is_over_its_samples_with_a_text(clip, dataset, tmp_path):
    """`--generated --by-condition`: one sample without a text made every condition's CLIP score n/a. Each is over
    the condition's samples with a text, and the table says over how many."""
    examples = [tiny_ecg_dataset.example(1000 + i) for i in range(6)]
    ecg = np.stack([e["ecg"] for e in examples])
    heart_rate = np.array([e["heart_rate"] for e in examples])
    prompts = [e["prompt"] for e in examples[:4]] + ["Sinus rhythm|unseen 0", "Sinus rhythm|unseen 1"]
    np.savez(tmp_path / "some.npz", ecg=ecg, heart_rate=heart_rate, prompt=np.array(prompts))
    np.savez(tmp_path / "four.npz", ecg=ecg[:4], heart_rate=heart_rate[:4], prompt=np.array(prompts[:4]))
    rules = load_rules().select(["sn"])
    some = ev.evaluate_generated(read_generated(tmp_path / "some.npz"), clip, dataset.data_dir, "validation",
                                 tmp_path / "some", rules=rules, n_boot=20)
    four = ev.evaluate_generated(read_generated(tmp_path / "four.npz"), clip, dataset.data_dir, "validation",
                                 tmp_path / "four", rules=rules, n_boot=20)
    sn, alone = some["by_condition"][0], four["by_condition"][0]
    assert sn["samples"] == 6 and sn["clip_score_samples"] == 4
    assert sn["clip_score"] == pytest.approx(alone["clip_score"]) and "clip_score_samples" not in alone
    line = next(row for row in (tmp_path / "some" / "report.md").read_text().splitlines() if row.startswith("| sn |"))
    assert "(over 4 of 6 with a text)" in line
