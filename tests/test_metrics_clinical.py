"""Clinical metrics on synthetic ECGs with known answers, checked against independent NumPy/SciPy/wfdb computations."""

import json

import numpy as np
import pytest
import scipy.stats
from wfdb.processing import compare_annotations

from diffusets_jax.ecg.shapes import ECG_RATE_HZ
from diffusets_jax.metrics.clinical import (
    clinical_metrics,
    limb_identity_rmse,
    match_beats,
    metric_value,
    render_clinical_markdown,
)
from tests.helpers.synthetic_ecg import SyntheticBeat, regular_beats, synthetic_ecg

FS = ECG_RATE_HZ


@pytest.fixture(scope="module")
def pair():
    """Real: 60 and 90 bpm; generated: 66 bpm (beats shifted) and an exact copy of the 90 bpm record."""
    real = np.stack([synthetic_ecg(regular_beats(60.0)), synthetic_ecg(regular_beats(90.0, first_s=0.3))])
    gen = np.stack([synthetic_ecg(regular_beats(66.0, first_s=0.5), SyntheticBeat(pr_ms=200.0)), real[1].copy()])
    gen[1, :, 2] += 0.05  # lead III off by 0.05 mV: Einthoven residual exactly 0.05
    gen[1, 100, 7] = 12.0  # one sample over 10 mV
    return gen, real, np.array([60.0, 95.0])


@pytest.fixture(scope="module")
def result(pair):
    gen, real, hr = pair
    return clinical_metrics(gen, real, hr, subject_ids=["a", "b"], n_boot=200, seed=0)


def test_heart_rate_and_rhythm_metrics_against_direct_computation(pair, result):
    gen, real, hr = pair
    g60, g90 = regular_beats(66.0, first_s=0.5), regular_beats(90.0, first_s=0.3)
    r60 = regular_beats(60.0)
    hr_gen = np.array([60 / np.mean(np.diff(g60)), 60 / np.mean(np.diff(g90))])
    hr_real = np.array([60 / np.mean(np.diff(r60)), 60 / np.mean(np.diff(g90))])
    row = metric_value(result, "heart_rate_mae", "generated_vs_condition")
    assert row["value"] == pytest.approx(np.mean(np.abs(hr_gen - hr)), abs=0.3)
    assert (row["n_measured"], row["coverage"]) == (2, 1.0)
    assert metric_value(result, "heart_rate_within_10bpm", "generated_vs_condition")["value"] == pytest.approx(100.0)
    assert metric_value(result, "heart_rate_mae", "generated_vs_real")["value"] == pytest.approx(
        np.mean(np.abs(hr_gen - hr_real)), abs=0.3)
    assert metric_value(result, "beat_count_mae", "generated_vs_real")["value"] == pytest.approx(
        np.mean([abs(g60.size - r60.size), 0]))
    expected_counts = hr * 10.0 / 60.0
    assert metric_value(result, "beat_count_mae", "generated_vs_condition")["value"] == pytest.approx(
        np.mean(np.abs([g60.size, g90.size] - expected_counts)))
    w = scipy.stats.wasserstein_distance(np.diff(g60) * 1000, np.diff(r60) * 1000)
    assert metric_value(result, "rr_wasserstein", "generated_vs_real")["value"] == pytest.approx(w / 2, abs=5)
    assert metric_value(result, "sdnn_mae", "generated_vs_real")["value"] == pytest.approx(0.0, abs=10)


def test_qrs_matching_against_wfdb(pair, result):
    gen, real, _ = pair
    g = np.round(regular_beats(66.0, first_s=0.5) * FS).astype(int)
    r = np.round(regular_beats(60.0) * FS).astype(int)
    tolerance = int(0.15 * FS)
    wfdb_tp = compare_annotations(r, g, tolerance).tp
    assert match_beats(g / FS, r / FS, tolerance / FS) == wfdb_tp
    n90 = regular_beats(90.0, first_s=0.3).size
    tp = wfdb_tp + n90  # the copied 90 bpm record matches every beat
    n_gen, n_real = g.size + n90, r.size + n90
    precision = metric_value(result, "qrs_precision", "generated_vs_real")["value"]
    recall = metric_value(result, "qrs_recall", "generated_vs_real")["value"]
    assert precision == pytest.approx(tp / n_gen)
    assert recall == pytest.approx(tp / n_real)
    assert metric_value(result, "qrs_f1", "generated_vs_real")["value"] == pytest.approx(
        2 * precision * recall / (precision + recall))


def test_match_beats_by_hand():
    assert match_beats([1.0, 2.0, 3.0], [1.05, 2.2, 2.95], 0.1) == 2
    assert match_beats([1.0, 1.08], [1.04], 0.1) == 1  # one-to-one
    assert match_beats([], [1.0], 0.1) == 0


def test_limb_identities_amplitude_and_intervals(pair, result):
    gen, real, _ = pair
    assert limb_identity_rmse(real[0]) == pytest.approx((0.0, 0.0), abs=1e-12)
    einthoven, _ = limb_identity_rmse(gen[1])
    assert einthoven == pytest.approx(0.05)
    assert metric_value(result, "einthoven_rmse", "generated")["value"] == pytest.approx(
        (limb_identity_rmse(gen[0])[0] + 0.05) / 2)
    assert metric_value(result, "einthoven_rmse", "real")["value"] == pytest.approx(0.0, abs=1e-12)
    assert metric_value(result, "over_10mv", "generated")["value"] == pytest.approx(50.0)
    assert metric_value(result, "over_10mv", "real")["value"] == pytest.approx(0.0)
    pr = metric_value(result, "pr_mae", "generated_vs_real")
    assert pr["n_measured"] == 2 and pr["value"] == pytest.approx(40.0 / 2, abs=8)  # PR 200 vs 160 on record 0
    assert metric_value(result, "st_j60_mae", "generated_vs_real")["value"] == pytest.approx(0.0, abs=0.02)


def test_coverage_counts_unmeasurable_records():
    good = synthetic_ecg(regular_beats(75.0))
    gen = np.stack([good, np.zeros_like(good), np.full_like(good, np.nan)])
    res = clinical_metrics(gen, None, [75.0, 75.0, 75.0], n_boot=50)
    row = metric_value(res, "heart_rate_mae", "generated_vs_condition")
    assert (row["n_measured"], row["n"]) == (1, 3) and row["coverage"] == pytest.approx(1 / 3)
    assert metric_value(res, "beat_count_mae", "generated_vs_condition")["n_measured"] == 2  # flat: 0 beats
    assert res["per_record"]["generated"]["heart_rate_bpm"][1] is None
    with pytest.raises(KeyError, match="no metric 'qrs_f1'"):
        metric_value(res, "qrs_f1", "generated_vs_real")


def test_qrs_coverage_counts_the_pairs_that_give_the_ratio_a_denominator():
    """A flat generated ECG has no beat, so no QRS precision: its pair was counted as measured, and a set of flat
    ECGs read "QRS precision n/a, coverage 2/2". Recall is measured on it (0 of the real beats found)."""
    good = synthetic_ecg(regular_beats(75.0))
    flat = np.zeros_like(good)
    res = clinical_metrics(np.stack([flat, good]), np.stack([good, good]), n_boot=50)
    precision = metric_value(res, "qrs_precision", "generated_vs_real")
    recall = metric_value(res, "qrs_recall", "generated_vs_real")
    assert (precision["n_measured"], recall["n_measured"]) == (1, 2)
    assert precision["value"] == pytest.approx(1.0) and recall["value"] == pytest.approx(0.5, abs=0.05)
    both_flat = clinical_metrics(np.stack([flat, flat]), np.stack([flat, good]), n_boot=50)
    for metric, measured in (("qrs_precision", 0), ("qrs_recall", 1), ("qrs_f1", 1)):
        row = metric_value(both_flat, metric, "generated_vs_real")
        assert row["n_measured"] == measured and (row["value"] is None) == (measured == 0)


def test_report_renders_as_markdown_and_strict_json(result):
    text = render_clinical_markdown(result)
    assert "| Heart-rate MAE | generated vs condition |" in text and "2/2" in text
    assert "2 records from 2 patients" in text
    back = json.loads(json.dumps(result, allow_nan=False))
    assert back["metrics"] == result["metrics"]


def test_bad_inputs(pair):
    gen, real, hr = pair
    with pytest.raises(ValueError, match="real: shape"):
        clinical_metrics(gen, real[:1], hr)
    with pytest.raises(ValueError, match="condition_hr: 1 values for 2 ECGs"):
        clinical_metrics(gen, real, hr[:1])
    with pytest.raises(ValueError, match="subject_ids: 3 ids for 2 ECGs"):
        clinical_metrics(gen, real, hr, subject_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"ecgs: expected shape \(batch, samples, 12\)"):
        clinical_metrics(gen[..., :6])
    with pytest.raises(ValueError, match=r"ecgs: expected shape \(batch, samples, 12\)"):
        clinical_metrics(gen[0], condition_hr=hr[:1])  # one record, not 1024 ECGs with one rate


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"condition_hr": [60.0]}, "condition_hr: 1 values for 2 ECGs"),
    ({"subject_ids": ["a"]}, "subject_ids: 1 ids for 2 ECGs"),
    ({"n_boot": 0}, "n_boot: expected at least 1"),
    ({"level": 95}, r"level: expected a coverage in \(0, 1\)"),
])
def test_bad_settings_are_refused_before_any_record_is_measured(pair, monkeypatch, kwargs, message):
    # Measuring takes ~0.15 s a record: a condition or setting that cannot be used must not wait for all of it.
    def measured(*args, **kw):
        raise AssertionError("records were measured before the inputs were checked")

    monkeypatch.setattr("diffusets_jax.metrics.clinical.measure_ecgs", measured)
    gen, real, _ = pair
    with pytest.raises(ValueError, match=message):
        clinical_metrics(gen, real, **kwargs)


def test_a_real_record_paired_with_several_samples_counts_once_in_its_own_metrics(pair):
    """Three samples per real record: the real ECGs' own rows (real vs condition, their limb identities and
    amplitudes) counted each record three times, "n 6" of two records; they are over the distinct records, the
    paired rows over the samples, and the rows of one record are one cluster of the bootstrap."""
    from diffusets_jax.metrics.clinical import compare_measurements, measure_ecgs

    gen, real, hr = pair
    records = np.array([0, 0, 0, 1, 1, 1])
    gen_m, real_m = measure_ecgs(gen).take(records), measure_ecgs(real)
    res = compare_measurements(gen_m, real_m.take(records), hr[records], real_records=records, n_boot=200)
    once = compare_measurements(measure_ecgs(gen), real_m, hr, n_boot=200)
    for metric, comparison in (("heart_rate_mae", "real_vs_condition"), ("einthoven_rmse", "real"),
                               ("over_10mv", "real")):
        row, alone = metric_value(res, metric, comparison), metric_value(once, metric, comparison)
        assert (row["n"], row["n_measured"], row["value"]) == (2, alone["n_measured"], alone["value"])
    assert metric_value(res, "heart_rate_mae", "generated_vs_real")["n"] == 6
    # Clustered by record: a resample draws a record's three samples together, so with two records every resample
    # holds each record 0, 3 or 6 times and the interval's ends are those of the records' own means.
    row = metric_value(res, "heart_rate_mae", "generated_vs_condition")
    errors = np.abs(np.asarray(res["per_record"]["generated"]["heart_rate_bpm"], float) - hr[records])[[0, 3]]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((errors.min(), errors.max()))
    assert res["n_real_records"] == 2 and res["n_patients"] == 2
    assert "6 generated records of 2 real records in 2 clusters (by real record)" in render_clinical_markdown(res)
