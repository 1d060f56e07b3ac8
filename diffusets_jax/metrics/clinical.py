"""Model-free clinical metrics of generated ECGs, against their paired real ECGs and their conditions.

Learned-feature scores (FID, CLIP) can hide an undertrained generator; these checks cannot, because they measure
what a cardiologist would: does it beat at the conditioned rate, with the paired record's rhythm, beat timing and
intervals, and is it a physically possible 12-lead ECG. Every record is measured once (`measure_ecgs`: beats with
`ecg.qrs.detect_beats`, intervals and ST with `ecg.delineation.delineate`, amplitude and limb-lead identities) and
every metric is a ratio of sums over records with a patient-clustered bootstrap interval
(`metrics.bootstrap.cluster_bootstrap`) and its coverage: the records where it could be measured, out of all.

Metrics (comparison in brackets; "real" rows are the same measurement on the real ECGs, a floor to read against):
- heart rate: MAE (bpm) and % within 10 bpm [generated vs condition, generated vs real, real vs condition];
- beat count MAE [vs real; vs condition: the expected count HR x duration / 60];
- RR Wasserstein-1 distance (ms) between the RR intervals [vs real; vs condition: the point mass 60000 / HR];
- SDNN MAE (ms; SDNN = sample std of the RR intervals, ddof=1) [vs real];
- QRS precision / recall / F1, beats pooled over records, a generated beat matching a real one within
  `qrs_tolerance_s` (150 ms, the AAMI EC57 window) [vs real]. The generator is not conditioned on beat phase, so
  for free generation this is low by design; it is the check for reconstructions and fixed-noise diagnostics;
- limb-lead identity RMSE (mV): Einthoven III - (II - I) and Goldberger aVR + (I + II)/2, aVL - (I - II/2),
  aVF - (II - I/2) [generated, real]: exactly 0 for a physical 12-lead ECG;
- % of records whose |amplitude| exceeds 10 mV anywhere [generated, real];
- PR, QRS, QT, QTc (Bazett) MAE (ms) and ST at J+60 MAE (mV, mean over the 12 leads) [vs real].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

# No JAX import here: worker processes import this module, and should start in a second, not load XLA.
from diffusets_jax.ecg.delineation import delineate
from diffusets_jax.ecg.heart_rate import heart_rate_from_beats
from diffusets_jax.ecg.leads import STANDARD_LEADS
from diffusets_jax.ecg.qrs import detect_beats
from diffusets_jax.ecg.shapes import ECG_RATE_HZ, NUM_LEADS
from diffusets_jax.io.files import json_safe
from diffusets_jax.metrics.bootstrap import cluster_bootstrap
from diffusets_jax.metrics.record_pool import RecordPool, record_pool

QRS_TOLERANCE_S = 0.15  # AAMI EC57 beat-matching window
HR_AGREEMENT_BPM = 10.0
AMPLITUDE_LIMIT_MV = 10.0  # beyond any surface ECG: a generated record exceeding it is broken
INTERVALS: tuple[str, ...] = ("pr_ms", "qrs_ms", "qt_ms", "qtc_ms")
_LEAD = {name: i for i, name in enumerate(STANDARD_LEADS)}


@dataclasses.dataclass(frozen=True)
class ECGMeasurements:
    """Per-record measurements of `n` ECGs (NaN where not measured); `beats_s` holds each record's QRS times (s)."""

    beats_s: list[np.ndarray]
    heart_rate_bpm: np.ndarray  # (n,)
    n_beats: np.ndarray  # (n,) -1 where the record is not finite
    sdnn_ms: np.ndarray  # (n,)
    pr_ms: np.ndarray  # (n,)
    qrs_ms: np.ndarray  # (n,)
    qt_ms: np.ndarray  # (n,)
    qtc_ms: np.ndarray  # (n,)
    st_j60_mv: np.ndarray  # (n, 12)
    max_abs_mv: np.ndarray  # (n,)
    einthoven_rmse_mv: np.ndarray  # (n,)
    goldberger_rmse_mv: np.ndarray  # (n,)
    duration_s: float

    def rr_ms(self, i: int) -> np.ndarray:
        return np.diff(self.beats_s[i]) * 1000.0

    def as_lists(self) -> dict[str, Any]:
        """JSON-ready per-record values (NaN -> None)."""
        out = {field.name: json_safe(getattr(self, field.name)) for field in dataclasses.fields(self)}
        out["beats_s"] = [[round(float(t), 4) for t in beats] for beats in self.beats_s]
        return out

    @classmethod
    def from_lists(cls, data: dict[str, Any]) -> ECGMeasurements:
        """Inverse of `as_lists` (None -> NaN), e.g. for measurements gathered from several hosts."""
        def array(key: str, dtype: type = np.float64) -> np.ndarray:
            values = data[key]
            return np.array([[np.nan if v is None else v for v in row] if isinstance(row, list) else
                             (np.nan if row is None else row) for row in values], dtype=dtype)

        return cls(beats_s=[np.asarray(b, np.float64) for b in data["beats_s"]],
                   heart_rate_bpm=array("heart_rate_bpm"), n_beats=np.asarray(data["n_beats"], np.int64),
                   sdnn_ms=array("sdnn_ms"), pr_ms=array("pr_ms"), qrs_ms=array("qrs_ms"), qt_ms=array("qt_ms"),
                   qtc_ms=array("qtc_ms"), st_j60_mv=array("st_j60_mv").reshape(-1, NUM_LEADS),
                   max_abs_mv=array("max_abs_mv"), einthoven_rmse_mv=array("einthoven_rmse_mv"),
                   goldberger_rmse_mv=array("goldberger_rmse_mv"), duration_s=float(data["duration_s"]))

    def take(self, rows: Sequence[int] | np.ndarray) -> ECGMeasurements:
        """The measurements of records `rows` (repeats allowed: one real record paired with several samples)."""
        rows = np.asarray(rows, np.int64)
        values = {field.name: getattr(self, field.name)[rows] for field in dataclasses.fields(self)
                  if isinstance(getattr(self, field.name), np.ndarray)}
        return dataclasses.replace(self, beats_s=[self.beats_s[i] for i in rows], **values)

    @classmethod
    def concatenate(cls, parts: Sequence[ECGMeasurements]) -> ECGMeasurements:
        """The records of `parts` one after the other (same record duration)."""
        first = parts[0]
        values = {field.name: np.concatenate([getattr(p, field.name) for p in parts])
                  for field in dataclasses.fields(cls) if isinstance(getattr(first, field.name), np.ndarray)}
        return dataclasses.replace(first, beats_s=[b for p in parts for b in p.beats_s], **values)


def limb_identity_rmse(ecg: np.ndarray) -> tuple[float, float]:
    """(Einthoven, Goldberger) RMSE (mV) of `ecg` `(samples, 12)` in standard lead order: 0 for a physical ECG."""
    lead = {name: ecg[:, i] for name, i in _LEAD.items()}
    einthoven = lead["III"] - (lead["II"] - lead["I"])
    goldberger = np.stack([lead["aVR"] + (lead["I"] + lead["II"]) / 2, lead["aVL"] - (lead["I"] - lead["II"] / 2),
                           lead["aVF"] - (lead["II"] - lead["I"] / 2)])
    return float(np.sqrt(np.mean(einthoven**2))), float(np.sqrt(np.mean(goldberger**2)))


def _measure_one(ecg: np.ndarray, fs: float) -> dict[str, Any]:
    nan = float("nan")
    if not np.all(np.isfinite(ecg)):
        return {"beats_s": np.zeros(0), "heart_rate_bpm": nan, "n_beats": -1, "sdnn_ms": nan,
                **{k: nan for k in INTERVALS}, "st_j60_mv": np.full(NUM_LEADS, nan), "max_abs_mv": nan,
                "einthoven_rmse_mv": nan, "goldberger_rmse_mv": nan}
    beats = detect_beats(ecg, fs)
    rr = np.diff(beats) / fs * 1000.0
    rate = heart_rate_from_beats(beats, fs)
    found = delineate(ecg, fs, beats)
    einthoven, goldberger = limb_identity_rmse(ecg)
    return {
        "beats_s": beats / fs, "heart_rate_bpm": nan if rate is None else rate, "n_beats": int(beats.size),
        "sdnn_ms": float(np.std(rr, ddof=1)) if rr.size >= 2 else nan,
        "pr_ms": found.pr_ms, "qrs_ms": found.qrs_ms, "qt_ms": found.qt_ms, "qtc_ms": found.qtc_ms,
        "st_j60_mv": found.st_mv, "max_abs_mv": float(np.max(np.abs(ecg))),
        "einthoven_rmse_mv": einthoven, "goldberger_rmse_mv": goldberger,
    }


def _measure_chunk(ecgs: np.ndarray, fs: float) -> list[dict[str, Any]]:
    return [_measure_one(ecg, fs) for ecg in ecgs]


def _checked_ecgs(ecgs: ArrayLike) -> np.ndarray:
    """`ecgs` as float64 `(batch, samples, 12)` (fetched from a device), or a ValueError naming the shape."""
    ecgs = np.asarray(ecgs, dtype=np.float64)
    if ecgs.ndim != 3 or ecgs.shape[2] != NUM_LEADS:
        raise ValueError(f"ecgs: expected shape (batch, samples, {NUM_LEADS}) in standard lead order, got {ecgs.shape}")
    return ecgs


def measure_ecgs(ecgs: ArrayLike, fs: float = ECG_RATE_HZ, workers: int | RecordPool = 1) -> ECGMeasurements:
    """Measure every ECG of `ecgs` `(batch, samples, 12)` (mV, standard lead order) sampled at `fs` Hz.

    `workers`: a number of processes for this call (beat detection and delineation are CPU-bound), or a
    `RecordPool` shared by several calls.
    """
    ecgs = _checked_ecgs(ecgs)
    with record_pool(workers) as pool:
        rows = pool.map(_measure_chunk, ecgs, fs)

    def column(key: str, dtype: type = np.float64) -> np.ndarray:
        return np.array([row[key] for row in rows], dtype=dtype)

    return ECGMeasurements(
        beats_s=[row["beats_s"] for row in rows], heart_rate_bpm=column("heart_rate_bpm"),
        n_beats=column("n_beats", np.int64), sdnn_ms=column("sdnn_ms"), pr_ms=column("pr_ms"),
        qrs_ms=column("qrs_ms"), qt_ms=column("qt_ms"), qtc_ms=column("qtc_ms"),
        st_j60_mv=column("st_j60_mv").reshape(len(rows), NUM_LEADS), max_abs_mv=column("max_abs_mv"),
        einthoven_rmse_mv=column("einthoven_rmse_mv"), goldberger_rmse_mv=column("goldberger_rmse_mv"),
        duration_s=ecgs.shape[1] / fs,
    )


def match_beats(detected_s: np.ndarray, reference_s: np.ndarray, tolerance_s: float = QRS_TOLERANCE_S) -> int:
    """Number of one-to-one matches between two beat-time lists (s) within `tolerance_s`, closest pairs first."""
    detected_s, reference_s = np.asarray(detected_s, float), np.asarray(reference_s, float)
    if detected_s.size == 0 or reference_s.size == 0:
        return 0
    gap = np.abs(detected_s[:, None] - reference_s[None, :])
    pairs = np.argwhere(gap <= tolerance_s)
    used_d, used_r, matches = set(), set(), 0
    for d, r in sorted(map(tuple, pairs), key=lambda p: gap[p[0], p[1]]):
        if d not in used_d and r not in used_r:
            used_d.add(d)
            used_r.add(r)
            matches += 1
    return matches


def _mean_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) of a mean over the finite entries of `values` `(n,)`."""
    finite = np.isfinite(values)
    return np.where(finite, values, 0.0), finite.astype(np.float64)


@dataclasses.dataclass
class _Rows:
    keys: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (metric, comparison, unit)
    numerators: list[np.ndarray] = dataclasses.field(default_factory=list)
    denominators: list[np.ndarray] = dataclasses.field(default_factory=list)
    measured: list[np.ndarray] = dataclasses.field(default_factory=list)
    totals: list[int] = dataclasses.field(default_factory=list)  # the records a metric is over (its n)

    def add(self, metric: str, comparison: str, unit: str, num: np.ndarray, den: np.ndarray,
            measured: np.ndarray, counted: np.ndarray | None = None) -> None:
        """`counted` `(n,)` bool: the rows the metric is over (None: all); the others add nothing to it."""
        if counted is not None:
            num, den, measured = np.where(counted, num, 0.0), np.where(counted, den, 0.0), measured & counted
        self.keys.append((metric, comparison, unit))
        self.numerators.append(num)
        self.denominators.append(den)
        self.measured.append(measured.astype(bool))
        self.totals.append(len(num) if counted is None else int(counted.sum()))

    def add_mean(self, metric: str, comparison: str, unit: str, values: np.ndarray,
                 counted: np.ndarray | None = None) -> None:
        num, den = _mean_of(values)
        self.add(metric, comparison, unit, num, den, den > 0, counted)


def _heart_rate_rows(rows: _Rows, measured_hr: np.ndarray, target_hr: np.ndarray, comparison: str,
                     counted: np.ndarray | None = None) -> None:
    error = np.abs(measured_hr - target_hr)
    rows.add_mean("heart_rate_mae", comparison, "bpm", error, counted)
    within = np.where(np.isfinite(error), (error <= HR_AGREEMENT_BPM) * 100.0, np.nan)
    rows.add_mean("heart_rate_within_10bpm", comparison, "%", within, counted)


def _check_comparison(n: int, condition_hr: ArrayLike | None, subject_ids: Sequence[object] | np.ndarray | None,
                      n_boot: int, level: float) -> np.ndarray | None:
    """The comparison's inputs for `n` ECGs checked (ValueError naming the bad one); the condition rates `(n,)`."""
    hr_c = None
    if condition_hr is not None:
        hr_c = np.asarray(condition_hr, dtype=np.float64).reshape(-1)
        if hr_c.shape[0] != n:
            raise ValueError(f"condition_hr: {hr_c.shape[0]} values for {n} ECGs; give one heart rate per ECG")
    if subject_ids is not None and len(subject_ids) != n:
        raise ValueError(f"subject_ids: {len(subject_ids)} ids for {n} ECGs; give one patient id per ECG")
    if n_boot < 1:
        raise ValueError(f"n_boot: expected at least 1 resample, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a coverage in (0, 1), got {level}")
    return hr_c


def clinical_metrics(
    generated: ArrayLike,
    real: ArrayLike | None = None,
    condition_hr: ArrayLike | None = None,
    subject_ids: Sequence[object] | np.ndarray | None = None,
    *,
    fs: float = ECG_RATE_HZ,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    qrs_tolerance_s: float = QRS_TOLERANCE_S,
    workers: int | RecordPool = 1,
) -> dict[str, Any]:
    """Every model-free clinical metric of `generated` `(n, samples, 12)` (mV, standard lead order, `fs` Hz).

    `real` `(n, samples, 12)`: the paired real ECGs (row i is the record whose conditions made generated row i);
    `condition_hr` `(n,)`: the conditioning heart rates (bpm); `subject_ids` `(n,)`: patient of each row, for the
    clustered bootstrap (None: rows are independent patients). Returns a JSON-ready dict: `metrics` (a list of
    rows: metric, comparison, unit, value, ci_low, ci_high, n_measured, n, coverage), `per_record` (the
    measurements of both sets, the QRS match counts, the conditions) and the settings. NaN is written as None.
    `measure_ecgs` + `compare_measurements`, for callers that measure the real set once for several models.
    """
    # The shape first: a single (1024, 12) record read as 1024 ECGs blamed condition_hr's length.
    generated = _checked_ecgs(generated)
    if real is not None and np.shape(real) != generated.shape:
        raise ValueError(f"real: shape {np.shape(real)} differs from generated {generated.shape}; pair them row by row")
    # Before measuring (~0.15 s a record): a condition or setting that cannot be used failed only after every record
    # of both sets was measured.
    _check_comparison(len(generated), condition_hr, subject_ids, n_boot, level)
    with record_pool(workers) as pool:  # one set of worker processes for both sets
        gen = measure_ecgs(generated, fs, pool)
        real_m = None if real is None else measure_ecgs(real, fs, pool)
    return compare_measurements(gen, real_m, condition_hr, subject_ids, n_boot=n_boot, seed=seed, level=level,
                                qrs_tolerance_s=qrs_tolerance_s, fs=fs)


def compare_measurements(
    gen: ECGMeasurements,
    real_m: ECGMeasurements | None = None,
    condition_hr: ArrayLike | None = None,
    subject_ids: Sequence[object] | np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    qrs_tolerance_s: float = QRS_TOLERANCE_S,
    fs: float = ECG_RATE_HZ,
    cluster_unit: str = "patient",
    real_records: ArrayLike | None = None,
) -> dict[str, Any]:
    """The metrics of `clinical_metrics` from measurements already made with `measure_ecgs` (same arguments).

    `real_records` `(n,)`: which real record each row of `real_m` is, where one record is paired with several
    generated rows (evaluate's `--samples-per-record`): the real ECGs' own metrics (real vs condition, the real
    limb-lead identities and amplitudes) are over the distinct records, counted once each (their n counted each
    record once per sample), and without `subject_ids` the bootstrap clusters the rows of one record together.

    `cluster_unit`: what a `subject_ids` entry names, for the report ("patient"; evaluate's unpaired samples are
    clustered by patient where known, else by the condition they were generated from)."""
    n = len(gen.beats_s)
    if real_m is not None and len(real_m.beats_s) != n:
        raise ValueError(f"real: {len(real_m.beats_s)} records measured for {n} generated; pair them row by row")
    hr_c = _check_comparison(n, condition_hr, subject_ids, n_boot, level)
    once = None  # the rows that stand for their real record in the real ECGs' own metrics (None: every row)
    if real_records is not None:
        real_records = np.asarray(real_records).reshape(-1)
        if real_m is None or real_records.shape[0] != n:
            raise ValueError(f"real_records: {real_records.shape[0]} ids for {n} ECGs; give the paired real "
                             "record of each row, with `real_m`")
        once = np.zeros(n, bool)
        once[np.unique(real_records, return_index=True)[1]] = True
        if subject_ids is None:  # a record's samples share its patient, unknown or not: one cluster
            subject_ids, cluster_unit = real_records, "real record"

    rows = _Rows()
    finite_gen = gen.n_beats >= 0
    if hr_c is not None:
        _heart_rate_rows(rows, gen.heart_rate_bpm, hr_c, "generated_vs_condition")
        expected_beats = hr_c * gen.duration_s / 60.0
        rows.add_mean("beat_count_mae", "generated_vs_condition", "beats",
                      np.where(finite_gen, np.abs(gen.n_beats - expected_beats), np.nan))
        rr_vs_condition = np.array([np.mean(np.abs(gen.rr_ms(i) - 60000.0 / hr_c[i])) if gen.n_beats[i] >= 2
                                    else np.nan for i in range(n)])
        rows.add_mean("rr_wasserstein", "generated_vs_condition", "ms", rr_vs_condition)
    tp = fp = fn = None
    if real_m is not None:
        _heart_rate_rows(rows, gen.heart_rate_bpm, real_m.heart_rate_bpm, "generated_vs_real")
        both = finite_gen & (real_m.n_beats >= 0)
        rows.add_mean("beat_count_mae", "generated_vs_real", "beats",
                      np.where(both, np.abs(gen.n_beats - real_m.n_beats).astype(float), np.nan))
        rr_w = np.array([scipy.stats.wasserstein_distance(gen.rr_ms(i), real_m.rr_ms(i))
                         if gen.n_beats[i] >= 2 and real_m.n_beats[i] >= 2 else np.nan for i in range(n)])
        rows.add_mean("rr_wasserstein", "generated_vs_real", "ms", rr_w)
        rows.add_mean("sdnn_mae", "generated_vs_real", "ms", np.abs(gen.sdnn_ms - real_m.sdnn_ms))
        tp = np.array([match_beats(gen.beats_s[i], real_m.beats_s[i], qrs_tolerance_s) for i in range(n)], float)
        fp = np.where(both, np.maximum(gen.n_beats, 0) - tp, 0.0)
        fn = np.where(both, np.maximum(real_m.n_beats, 0) - tp, 0.0)
        tp = np.where(both, tp, 0.0)
        # Measured where the record gives the ratio a denominator: precision needs a generated beat, recall a real
        # one. A pair without them adds nothing to the pooled ratio, and counted as measured it showed full
        # coverage beside a value of n/a (flat generated ECGs).
        rows.add("qrs_precision", "generated_vs_real", "", tp, tp + fp, both & (tp + fp > 0))
        rows.add("qrs_recall", "generated_vs_real", "", tp, tp + fn, both & (tp + fn > 0))
        rows.add("qrs_f1", "generated_vs_real", "", 2 * tp, 2 * tp + fp + fn, both & (2 * tp + fp + fn > 0))
        for interval in INTERVALS:
            rows.add_mean(f"{interval[:-3]}_mae", "generated_vs_real", "ms",
                          np.abs(getattr(gen, interval) - getattr(real_m, interval)))
        st_error = np.abs(gen.st_j60_mv - real_m.st_j60_mv)
        leads_measured = np.isfinite(st_error).sum(axis=1)
        st_mae = np.where(leads_measured > 0, np.where(np.isfinite(st_error), st_error, 0.0).sum(axis=1)
                          / np.maximum(leads_measured, 1), np.nan)
        rows.add_mean("st_j60_mae", "generated_vs_real", "mV", st_mae)
        if hr_c is not None:
            _heart_rate_rows(rows, real_m.heart_rate_bpm, hr_c, "real_vs_condition", once)
    for name, measured, counted in (("generated", gen, None), ("real", real_m, once)):
        if measured is None:
            continue
        rows.add_mean("einthoven_rmse", name, "mV", measured.einthoven_rmse_mv, counted)
        rows.add_mean("goldberger_rmse", name, "mV", measured.goldberger_rmse_mv, counted)
        over = np.where(np.isfinite(measured.max_abs_mv), (measured.max_abs_mv > AMPLITUDE_LIMIT_MV) * 100.0, np.nan)
        rows.add_mean("over_10mv", name, "%", over, counted)

    clusters = None if subject_ids is None else np.asarray([str(s) for s in subject_ids])
    value, low, high = cluster_bootstrap(np.stack(rows.numerators, axis=1), np.stack(rows.denominators, axis=1),
                                         clusters, n_boot=n_boot, seed=seed, level=level)
    metrics = []
    for j, (metric, comparison, unit) in enumerate(rows.keys):
        n_measured, total = int(rows.measured[j].sum()), rows.totals[j]
        metrics.append({
            "metric": metric, "comparison": comparison, "unit": unit, "value": json_safe(value[j]),
            "ci_low": json_safe(low[j]), "ci_high": json_safe(high[j]), "n_measured": n_measured, "n": total,
            "coverage": n_measured / total if total else None,
        })
    per_record: dict[str, Any] = {"generated": gen.as_lists()}
    if real_m is not None:
        per_record["real"] = real_m.as_lists()
        per_record["qrs_matches"] = {"tp": json_safe(tp), "fp": json_safe(fp), "fn": json_safe(fn)}
    if hr_c is not None:
        per_record["condition_hr_bpm"] = json_safe(hr_c)
    if clusters is not None:
        per_record["subject_id"] = clusters.tolist()
    return {
        "n_records": n, **({} if once is None else {"n_real_records": int(once.sum())}),
        "n_patients": int(np.unique(clusters).size) if clusters is not None else n,
        **({} if cluster_unit == "patient" else {"cluster_unit": cluster_unit}), "fs": fs,
        "n_boot": n_boot, "seed": seed, "level": level, "qrs_tolerance_ms": qrs_tolerance_s * 1000.0,
        "metrics": metrics, "per_record": per_record,
    }


def metric_value(result: dict[str, Any], metric: str, comparison: str) -> dict[str, Any]:
    """The row of `result["metrics"]` for `metric` and `comparison`; KeyError naming what exists otherwise."""
    for row in result["metrics"]:
        if row["metric"] == metric and row["comparison"] == comparison:
            return row
    have = sorted({(row["metric"], row["comparison"]) for row in result["metrics"]})
    raise KeyError(f"no metric {metric!r} for {comparison!r}; the result has {have}")


_TITLES = {
    "heart_rate_mae": "Heart-rate MAE", "heart_rate_within_10bpm": "Heart rate within 10 bpm",
    "beat_count_mae": "Beat-count MAE", "rr_wasserstein": "RR Wasserstein-1", "sdnn_mae": "SDNN MAE",
    "qrs_precision": "QRS precision", "qrs_recall": "QRS recall", "qrs_f1": "QRS F1", "pr_mae": "PR MAE",
    "qrs_mae": "QRS duration MAE", "qt_mae": "QT MAE", "qtc_mae": "QTc (Bazett) MAE", "st_j60_mae": "ST at J+60 MAE",
    "einthoven_rmse": "Einthoven identity RMSE", "goldberger_rmse": "Goldberger identity RMSE",
    "over_10mv": "Records over 10 mV",
}


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def render_clinical_markdown(result: dict[str, Any]) -> str:
    """A Markdown table of `clinical_metrics` output: value, 95% interval and coverage per metric and comparison."""
    level = round(100 * result["level"])
    lines = [
        f"| metric | comparison | value | {level}% CI | coverage |",
        "|---|---|---|---|---|",
    ]
    for row in result["metrics"]:
        unit = f" {row['unit']}" if row["unit"] else ""
        coverage = f"{row['n_measured']}/{row['n']}"
        lines.append(
            f"| {_TITLES.get(row['metric'], row['metric'])} | {row['comparison'].replace('_', ' ')} "
            f"| {_fmt(row['value'])}{unit} | {_fmt(row['ci_low'])} to {_fmt(row['ci_high'])} | {coverage} |"
        )
    unit = result.get("cluster_unit", "patient")
    clusters = (f"from {result['n_patients']} patients; intervals: {result['n_boot']} patient-clustered"
                if unit == "patient" else
                f"in {result['n_patients']} clusters (by {unit}); intervals: {result['n_boot']} clustered")
    records = (f"{result['n_records']} records" if "n_real_records" not in result else
               f"{result['n_records']} generated records of {result['n_real_records']} real records")
    lines += ["", f"{records} {clusters} bootstrap resamples (seed {result['seed']}); QRS matched "
              f"within {result['qrs_tolerance_ms']:g} ms; coverage = records where the metric could be measured."]
    return "\n".join(lines) + "\n"
