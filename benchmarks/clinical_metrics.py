"""Wall time of every model-free clinical metric on 1,000 generated/real ECG pairs (the issue's goal: < 5 minutes
on 2 CPU cores).

The real set is the 40 real fixture records (tests/data/ecg, 500 Hz) resampled to (1024, 12) like prepared data,
each used 25 times with a random circular shift and 20 uV of noise; the "generated" set is the same records
shifted, rescaled and noised again, paired row by row, conditioned on the reference heart rates. Prints one JSON
object: total seconds and per stage (measuring each set: QRS detection, delineation, amplitude, identities; the
comparisons and the patient-clustered bootstrap), with the coverage of the interval metrics.

    PYTHONPATH=$PWD python benchmarks/clinical_metrics.py [--num 1000] [--workers 2] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECG_DATA = os.path.join(ROOT, "tests", "data", "ecg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=1000, help="generated/real pairs")
    parser.add_argument("--workers", type=int, default=2, help="processes for the per-record measurements")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()

    import numpy as np
    import wfdb

    from diffusets_jax.ecg.resample import resample_to_length
    from diffusets_jax.metrics.clinical import compare_measurements, measure_ecgs

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

    start = time.perf_counter()
    generated_m = measure_ecgs(generated, workers=args.workers)
    measured_generated = time.perf_counter()
    real_m = measure_ecgs(real, workers=args.workers)
    measured_real = time.perf_counter()
    result = compare_measurements(generated_m, real_m, condition_hr, subject_ids, n_boot=args.n_boot, seed=0)
    done = time.perf_counter()
    coverage = {f"{row['metric']}/{row['comparison']}": round(row["coverage"], 3) for row in result["metrics"]
                if row["metric"] in ("pr_mae", "qrs_mae", "qt_mae", "st_j60_mae", "heart_rate_mae")}
    print(json.dumps({
        "records": args.num, "workers": args.workers, "n_boot": args.n_boot, "metrics": len(result["metrics"]),
        "seconds": round(done - start, 2), "under_5_minutes": done - start < 300.0,
        "stages_s": {"measure_generated": round(measured_generated - start, 2),
                     "measure_real": round(measured_real - measured_generated, 2),
                     "compare_and_bootstrap": round(done - measured_real, 2)},
        "coverage": coverage, "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
