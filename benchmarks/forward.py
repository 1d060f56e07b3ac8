"""Jitted forward time of the faithful U-Net and VAE decoder per batch size, plus compile times (JSON).

    python benchmarks/forward.py                      # float32, batches 1, 16, 128
    python benchmarks/forward.py --dtype bfloat16 --batch-sizes 1 128 1024

One U-Net forward is one denoising step, so 1000-step DDPM sampling costs about 1000 x the U-Net time
plus one decoder call per batch. Times are medians over `--repeats` runs after a warm-up run, each ended
with `block_until_ready`; compile time is `jit(...).lower(...).compile()` per batch size. Weights are
random NumPy normals (timing does not depend on their values). `--dtype` is the computation dtype of both models
(parameters stay float32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arguments  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="computation dtype of the U-Net and VAE (parameters stay float32)")
    parser.add_argument("--batch-sizes", type=arguments.count, nargs="+", default=[1, 16, 128])
    parser.add_argument("--repeats", type=arguments.count, default=10,
                        help="timed runs per batch size (median reported)")
    parser.add_argument("--skip-vae", action="store_true", help="benchmark the U-Net only")
    return parser.parse_args(argv)


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import describe, print_report  # noqa: E402
from model_sizes import random_variables  # noqa: E402


def time_forward(fn: Callable, variables, inputs: Sequence, repeats: int) -> dict[str, float]:
    """Compile `fn(variables, *inputs)` and time it: {'compile_s', 'median_s', 'min_s'}."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(variables, *inputs).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, *inputs))  # warm-up: first-run allocations, autotuning
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, *inputs))
        times.append(time.perf_counter() - start)
    return {"compile_s": round(compile_s, 3), "median_s": statistics.median(times), "min_s": min(times)}


def unet_inputs(batch: int, text_dim: int, key: jax.Array) -> tuple:
    keys = jax.random.split(key, 3)
    return (
        jax.random.normal(keys[0], (batch, 128, 4)),
        jax.random.randint(keys[1], (batch,), 0, 1000),
        jax.random.normal(keys[2], (batch, text_dim)) / np.sqrt(text_dim),
        jnp.ones((batch,)), jnp.full((batch,), 60.0), jnp.full((batch,), 75.0),
    )


def benchmark_unet(batch_sizes: Sequence[int], dtype: jnp.dtype, repeats: int) -> dict:
    from diffusets_jax.models.unet import UNet, count_params

    module = UNet(dtype=dtype)
    key = jax.random.key(0)
    variables = random_variables(module.init, *unet_inputs(1, module.text_dim, key))
    out = {"params": count_params(variables["params"]), "batches": {}}
    for batch in batch_sizes:
        result = time_forward(module.apply, variables, unet_inputs(batch, module.text_dim, key), repeats)
        result["steps_per_s"] = 1.0 / result["median_s"]
        result["samples_per_s_1000_steps"] = batch / (1000 * result["median_s"])
        out["batches"][str(batch)] = result
    return out


def benchmark_vae_decoder(batch_sizes: Sequence[int], dtype: jnp.dtype, repeats: int) -> dict:
    try:
        from diffusets_jax.models.vae import VAE
    except ImportError as err:
        return {"skipped": f"diffusets_jax.models.vae not available: {err}"}
    module = VAE(dtype=dtype)
    key = jax.random.key(0)
    z = jax.random.normal(key, (1, 128, module.latent_channels))
    variables = random_variables(lambda k, z: module.init(k, z, method=VAE.decode), z)
    decode = lambda variables, z: module.apply(variables, z, method=VAE.decode)  # noqa: E731
    out = {"batches": {}}
    for batch in batch_sizes:
        z = jax.random.normal(key, (batch, 128, module.latent_channels))
        result = time_forward(decode, variables, (z,), repeats)
        result["ecgs_per_s"] = batch / result["median_s"]
        out["batches"][str(batch)] = result
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = describe()
    report = {
        "benchmark": "forward",
        "dtype": args.dtype,
        "repeats": args.repeats,
        "unet": benchmark_unet(args.batch_sizes, jnp.dtype(args.dtype), args.repeats),
    }
    if not args.skip_vae:
        report["vae_decoder"] = benchmark_vae_decoder(args.batch_sizes, jnp.dtype(args.dtype), args.repeats)
    print_report(report, machine, indent=2)


if __name__ == "__main__":
    main()
