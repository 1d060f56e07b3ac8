"""Data-preparation throughput on the MIMIC-IV-ECG fixture layout repeated to >= 2,000 records.

Makes a MIMIC-IV-ECG-shaped manual dir whose records are symlinks to the 40 real fixture records (each copy
under new subject/study ids, so splits and chunks behave as on real data), then prints one JSON object:

- `decode_records_per_s`: WFDB read + checks + heart rate + resampling in `--workers` processes (the part
  that scales with cores), measured without any cache;
- `build_records_per_s`: a whole `prepare` (listing, embedding the distinct prompts with the local MiniLM,
  decoding, writing TFRecords) into an empty data dir;
- `rebuild_seconds`: the same build again after deleting the TFRecords (as after an interruption), when every
  decoded chunk comes from the decode cache.

    PYTHONPATH=$PWD python benchmarks/prepare.py [--records 2000] [--workers N] [--keep DIR]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import arguments

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "data", "ecg", "mimic_iv_ecg")


def make_repeated_mimic(target: str, records: int) -> int:
    """Write a MIMIC-IV-ECG manual dir of >= `records` records (symlinked fixture files); returns the count."""
    tables = {}
    for name in ("record_list.csv", "machine_measurements.csv", "patients.csv"):
        with open(os.path.join(FIXTURES, name), newline="") as handle:
            reader = csv.DictReader(handle)
            tables[name] = (reader.fieldnames, list(reader))
    copies = math.ceil(records / len(tables["record_list.csv"][1]))
    out: dict[str, list[dict]] = {name: [] for name in tables}
    for copy in range(copies):
        offset = copy * 1_000_000  # new subject and study ids for each copy

        for row in tables["record_list.csv"][1]:
            new_subject, new_study = str(int(row["subject_id"]) + offset), str(int(row["study_id"]) + offset)
            path = f"files/p{new_subject[:4]}/p{new_subject}/s{new_study}/{row['file_name']}"
            os.makedirs(os.path.join(target, os.path.dirname(path)), exist_ok=True)
            for ext in (".hea", ".dat"):
                os.symlink(os.path.abspath(os.path.join(FIXTURES, row["path"] + ext)), os.path.join(target, path + ext))
            out["record_list.csv"].append({**row, "subject_id": new_subject, "study_id": new_study, "path": path})
        for row in tables["machine_measurements.csv"][1]:
            out["machine_measurements.csv"].append(
                {**row, "subject_id": str(int(row["subject_id"]) + offset), "study_id": str(int(row["study_id"]) + offset)}
            )
        for row in tables["patients.csv"][1]:
            out["patients.csv"].append({**row, "subject_id": str(int(row["subject_id"]) + offset)})
    for name, (fields, _) in tables.items():
        with open(os.path.join(target, name), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(out[name])
    return len(out["record_list.csv"])


def main() -> None:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--records", type=arguments.count, default=2000)
    # At least one: the decode is timed in a pool of exactly this many processes.
    parser.add_argument("--workers", type=arguments.count, default=os.cpu_count() or 1)
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args()
    if args.keep and os.path.exists(args.keep) and (not os.path.isdir(args.keep) or os.listdir(args.keep)):
        parser.error(f"--keep {args.keep}: exists and is not an empty folder; name a new one (nothing in it is "
                     "replaced)")

    import tensorflow as tf
    from machine import describe, print_report

    tf.config.set_visible_devices([], "GPU")
    machine = describe()
    from diffusets_jax.data import records as records_lib
    from diffusets_jax.data.builder import auto_chunk_size
    from diffusets_jax.data.sources import make_builder, prepare

    work = args.keep or tempfile.mkdtemp(prefix="prepare-bench-")
    manual_dir, data_dir = os.path.join(work, "manual"), os.path.join(work, "data")
    count = make_repeated_mimic(manual_dir, args.records)

    candidates = make_builder("mimic-iv-ecg", data_dir).list_candidates(manual_dir)
    size = auto_chunk_size(len(candidates))
    tasks = [(manual_dir, candidates[i : i + size], records_lib.DecodeOptions(), None) for i in range(0, len(candidates), size)]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        decoded = sum(len(r.ok_index) for r in pool.map(records_lib.decode_chunk_task, tasks))
    decode_s = time.perf_counter() - start

    # TFDS announces each build on stdout; it goes to stderr so that stdout carries only the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
        start = time.perf_counter()
        report = prepare("mimic-iv-ecg", manual_dir, data_dir, workers=args.workers)
        build_s = time.perf_counter() - start
        shutil.rmtree(os.path.join(data_dir, "mimic_iv_ecg"))  # built just above, by this run
        start = time.perf_counter()
        again = prepare("mimic-iv-ecg", manual_dir, data_dir, workers=args.workers)
        rebuild_s = time.perf_counter() - start
    print_report({
        "benchmark": "prepare", "source": "mimic-iv-ecg (fixtures repeated)", "records": count,
        "workers": args.workers,
        "decode_records_per_s": round(count / decode_s, 1), "decoded_usable": decoded,
        "build_seconds": round(build_s, 2), "build_records_per_s": round(count / build_s, 1),
        "examples_written": report["examples_written"], "skipped_by_reason": report["skipped_by_reason"],
        "rebuild_seconds": round(rebuild_s, 2), "rebuild_chunks_reused": again["decode_chunks"]["reused"],
    }, machine)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
