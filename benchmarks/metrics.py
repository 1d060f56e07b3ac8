"""Throughput of the evaluation metrics on the current JAX backend, on random 64-d CLIP-sized features.

Prints one JSON object: seconds for FID (feature statistics of both sets + the float64 Fréchet step) and for
manifold precision/recall (k = 3; four blocked k-NN passes), plus pairwise distances per second. Each is
timed after a warm-up call on the same shapes, so compile time is reported separately.

    PYTHONPATH=$PWD python benchmarks/metrics.py [--num 20000] [--dim 64] [--row-block 1024] [--col-block 4096]
        [--mesh]   # split precision/recall rows over all local devices
"""

from __future__ import annotations

import time

import arguments

# Precision/recall's k: the radius of a vector is its distance to its k-th nearest neighbour among the others.
K = 3


def main() -> None:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--num", type=arguments.count, default=20000,
                        help="feature vectors per set (real and generated)")
    parser.add_argument("--dim", type=arguments.count, default=64)
    parser.add_argument("--row-block", type=arguments.count, default=1024)
    parser.add_argument("--col-block", type=arguments.count, default=4096)
    parser.add_argument("--mesh", action="store_true", help="shard precision/recall rows over all devices")
    args = parser.parse_args()
    if args.num <= K:  # else precision_recall's ValueError, after FID has compiled and run
        parser.error(f"--num {args.num}: precision/recall's k = {K} nearest neighbours need at least {K + 1} "
                     f"feature vectors per set; pass --num {K + 1} or more")

    import numpy as np
    from machine import describe, print_report

    from diffusets_jax import parallel
    from diffusets_jax.metrics.fid import fid
    from diffusets_jax.metrics.precision_recall import precision_recall

    machine = describe()
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.num, args.dim)).astype(np.float32)
    generated = (rng.normal(size=(args.num, args.dim)) * 1.1 + 0.05).astype(np.float32)
    mesh = parallel.make_mesh() if args.mesh else None

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    _, fid_first = timed(lambda: fid(real, generated))
    fid_value, fid_seconds = timed(lambda: fid(real, generated))
    pr_call = lambda: precision_recall(
        real, generated, k=K, row_block=args.row_block, col_block=args.col_block, mesh=mesh
    )
    _, pr_first = timed(pr_call)
    pr, pr_seconds = timed(pr_call)
    distances = 4 * args.num * args.num  # two radius passes + two membership passes
    print_report({
        "benchmark": "metrics",
        "devices": machine["device_count"] if args.mesh else 1,
        "num_per_set": args.num,
        "dim": args.dim,
        "fid_seconds": round(fid_seconds, 4),
        "fid_compile_and_first_call_seconds": round(fid_first, 3),
        "fid": round(fid_value, 6),
        "precision_recall_seconds": round(pr_seconds, 3),
        "precision_recall_compile_and_first_call_seconds": round(pr_first, 3),
        "pairwise_distances_per_second": round(distances / pr_seconds),
        "precision": pr.precision,
        "recall": pr.recall,
    }, machine)


if __name__ == "__main__":
    main()
