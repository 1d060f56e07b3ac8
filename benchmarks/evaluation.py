"""Wall time of a whole evaluation of 1,000 generated/real ECG pairs, every metric of the report (the issue's goal:
< 5 minutes on 2 CPU cores): what `evaluate` does after sampling, through the same `experiments.evaluate.measure`
and `score`.

The real set is the 40 real fixture records (tests/data/ecg, 500 Hz) resampled to (1024, 12) like prepared data,
each used 25 times with a random circular shift and 20 uV of noise; the "generated" set is the same records
shifted, rescaled and noised again, paired row by row, conditioned on the reference heart rates. The feature
extractor is the published-size CLIP (22 M parameters) with random weights: its speed does not depend on them.
Measured per set: CLIP ECG features, the protocol's heart rate, amplitudes and the clinical measurements (QRS
detection, delineation, limb-lead identities); scored: FID, rFID, precision / recall / F1 (k = 3), HR MAE, CLIP
score, amplitudes and every clinical comparison with patient-clustered bootstrap intervals. Prints one JSON
object: total seconds, seconds per stage (compile included: a fresh process pays it) and the coverage of the
interval metrics.

    PYTHONPATH=$PWD python benchmarks/evaluation.py [--num 1000] [--workers 2] [--n-boot 1000] [--protocol paper]
"""

from __future__ import annotations

import json
import os
import sys
import time

import arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECG_DATA = os.path.join(ROOT, "tests", "data", "ecg")


def main() -> None:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--num", type=arguments.count, default=1000, help="generated/real pairs")
    parser.add_argument("--workers", type=arguments.non_negative, default=2,
                        help="processes for the per-record measurements (0 or 1: in this process)")
    parser.add_argument("--n-boot", type=arguments.count, default=1000)
    parser.add_argument("--protocol", default="paper", help="heart-rate method and k of this evaluation protocol")
    args = parser.parse_args()

    import numpy as np
    import wfdb

    from diffusets_jax.ecg.resample import resample_to_length
    from diffusets_jax.experiments import evaluate as ev
    from diffusets_jax.metrics.features import clip_text_features
    from diffusets_jax.metrics.record_pool import RecordPool
    from diffusets_jax.models.clip import CLIP

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe, print_report
    from model_sizes import random_variables

    # The protocols live with the evaluation code (imported just above, nothing compiled yet).
    try:
        proto = ev.protocol(args.protocol)
    except ValueError as err:
        parser.error(str(err))
    if args.num <= proto.k:  # else precision_recall's ValueError, after CLIP and every measurement have run
        parser.error(f"--num {args.num}: precision/recall's k = {proto.k} nearest neighbours need at least "
                     f"{proto.k + 1} pairs; pass --num {proto.k + 1} or more")
    machine = describe()

    truth = json.load(open(os.path.join(ECG_DATA, "truth.json")))
    reference = json.load(open(os.path.join(ECG_DATA, "reference_rr.json")))["records"]
    names = list(truth)
    records = np.stack([
        resample_to_length(np.nan_to_num(wfdb.rdrecord(
            os.path.join(ECG_DATA, "ptbxl", "records500", "00000", f"{i:05d}_hr")).p_signal), 1024)
        for i in range(1, len(names) + 1)
    ]).astype(np.float64)
    rng = np.random.default_rng(0)
    source = np.arange(args.num) % len(names)

    def variant(scale: float) -> np.ndarray:
        shifts = rng.integers(0, 1024, args.num)
        out = np.stack([np.roll(records[s], int(k), axis=0) for s, k in zip(source, shifts, strict=True)])
        return out * scale + 0.02 * rng.standard_normal(out.shape)

    real = variant(1.0)
    generated = variant(1.1)
    condition_hr = np.array([reference[names[s]]["heart_rate_bpm"] for s in source])
    subject_ids = [truth[names[s]]["subject_id"] for s in source]

    text_embeddings = rng.standard_normal((args.num, 1536)).astype(np.float32)

    start = time.perf_counter()
    clip = CLIP()
    variables = random_variables(clip.init, np.zeros((1, 1024, 12), np.float32), text_embeddings[:1])
    initialised = time.perf_counter()
    with RecordPool(args.workers) as pool:  # as `evaluate` does: one set of worker processes for both sets
        generated_m = ev.measure(generated, (clip, variables), proto.heart_rate_method, workers=pool)
        measured_generated = time.perf_counter()
        real_m = ev.measure(real, (clip, variables), proto.heart_rate_method, workers=pool)
        measured_real = time.perf_counter()
    text_features = clip_text_features(clip, variables, text_embeddings)
    report = ev.score(real_m, generated_m, pairs=np.arange(args.num), condition_hr=condition_hr,
                      text_features=text_features, subject_ids=np.asarray(subject_ids), proto=proto,
                      n_boot=args.n_boot)
    done = time.perf_counter()
    clinical = report["clinical"]["metrics"]
    coverage = {f"{row['metric']}/{row['comparison']}": round(row["coverage"], 3) for row in clinical
                if row["metric"] in ("pr_mae", "qrs_mae", "qt_mae", "st_j60_mae", "heart_rate_mae")}
    print_report({
        "benchmark": "evaluation", "records": args.num, "protocol": proto.name, "workers": args.workers, "n_boot": args.n_boot,
        "clinical_metrics": len(clinical),
        "levels": sorted(k for k in report if report[k]),
        "seconds": round(done - start, 2), "under_5_minutes": done - start < 300.0,
        "stages_s": {"init_clip": round(initialised - start, 2),
                     "measure_generated": round(measured_generated - initialised, 2),
                     "measure_real": round(measured_real - measured_generated, 2),
                     "text_features_and_score": round(done - measured_real, 2)},
        "fid": report["signal_level"]["fid"], "coverage": coverage,
    }, machine)


if __name__ == "__main__":
    main()
