"""Throughput of the local Flax sentence encoder (all-MiniLM-L6-v2) on the current JAX backend.

Prints one JSON object: prompts/s at the given batch size (default 64) over realistic ordered prompts built
from common MIMIC-IV-ECG machine statements, after a warm-up pass that compiles every padded length.

    PYTHONPATH=$PWD python benchmarks/embedding.py [--batch-size 64] [--num-prompts 2048] [--dtype bfloat16]
"""

from __future__ import annotations

import itertools
import time

import arguments

STATEMENTS = [
    "Sinus rhythm", "Sinus bradycardia", "Sinus tachycardia", "Atrial fibrillation",
    "Atrial fibrillation with rapid ventricular response", "Atrial flutter with variable AV block",
    "Normal ECG", "Abnormal ECG", "Borderline ECG", "Left axis deviation", "Right bundle branch block",
    "Left bundle branch block", "Left ventricular hypertrophy", "Possible left atrial enlargement",
    "Low QRS voltages in limb leads", "Nonspecific T wave abnormality", "Inferior infarct - age undetermined",
    "Anterior ST elevation - probably early repolarization", "Prolonged QT interval", "Premature ventricular contractions",
    "1st degree AV block", "Poor R wave progression - probable normal variant", "Lateral ST-T changes may be due to myocardial ischemia",
]


def benchmark_prompts(count: int) -> list[str]:
    """`count` distinct ordered prompts of 1-5 statements, deterministic."""
    from diffusets_jax.conditioning.prompts import ordered_prompt

    reports = (
        combo for size in (3, 2, 4, 1, 5) for combo in itertools.permutations(STATEMENTS, size)
    )
    prompts = [ordered_prompt(list(r)) for r in itertools.islice(reports, 0, count * 7, 7)]
    if len(prompts) < count:
        raise ValueError(f"only {len(prompts)} distinct prompts available")
    return prompts


def main() -> None:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--batch-size", type=arguments.count, default=64)
    parser.add_argument("--num-prompts", type=arguments.count, default=2048)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=arguments.count, default=3, help="timed passes; the best is reported")
    args = parser.parse_args()

    from machine import describe, print_report

    from diffusets_jax.conditioning.embedders import LocalEmbedder

    machine = describe()

    prompts = benchmark_prompts(args.num_prompts)
    start = time.perf_counter()
    embedder = LocalEmbedder(batch_size=args.batch_size, dtype=args.dtype)
    load_s = time.perf_counter() - start
    lengths = embedder.token_counts(prompts).tolist()

    start = time.perf_counter()
    embedder.embed(prompts)  # compiles every padded length these prompts need
    warmup_s = time.perf_counter() - start
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        embedder.embed(prompts)
        timings.append(time.perf_counter() - start)
    best = min(timings)
    print_report({
        "benchmark": "local_text_encoder_throughput",
        "embedder_id": embedder.embedder_id,
        "dtype": args.dtype,
        "batch_size": embedder.batch_size,
        "num_prompts": len(prompts),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "max_tokens": max(lengths),
        "load_s": round(load_s, 2),
        "warmup_with_compile_s": round(warmup_s, 2),
        "best_s": round(best, 3),
        "prompts_per_s": round(len(prompts) / best, 1),
    }, machine)


if __name__ == "__main__":
    main()
