"""How close the VAE decoder runs to the backend's convolution ceiling (prints one JSON object).

The VAE is almost all k3 convolutions. This measures (1) the faithful decoder at `--batch`: XLA's own FLOP
count (compiled cost analysis), the time and so the GFLOP/s achieved; and (2) one lone k3 "same" convolution
at the decoder's widest shapes, in float32 and bfloat16: what the backend's convolution reaches at best. When
(1) is close to (2) the decoder is compute-bound, and only fewer operations (not better scheduling) can make
it faster.

    PYTHONPATH=$PWD python benchmarks/vae_ceiling.py [--batch 16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from diffusets_jax.models.vae import VAE  # noqa: E402


def best_seconds(compiled, *args, repeats: int) -> float:
    """Minimum wall time of `repeats` calls after one warm-up call."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def conv_same_k3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    vae = VAE()
    latent = jnp.zeros((args.batch, 128, vae.latent_channels))
    variables = jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 1024, vae.in_channels)), jax.random.key(1))
    decode = jax.jit(lambda v, z: vae.apply(v, z, method=VAE.decode)).lower(variables, latent).compile()
    decode_flops = flops_of(decode)
    decode_s = best_seconds(decode, variables, latent, repeats=args.repeats)

    rng = np.random.default_rng(0)
    convs = []
    # The decoder's widest levels: 512 channels at length 256 and 128 channels at length 1024.
    for length, channels in ((256, 512), (1024, 128)):
        x = rng.standard_normal((args.batch, length, channels)).astype(np.float32)
        kernel = (rng.standard_normal((3, channels, channels)) / np.sqrt(3 * channels)).astype(np.float32)
        row = {"shape": [args.batch, length, channels], "gflop": 2 * args.batch * length * channels * channels * 3 / 1e9}
        for dtype in ("float32", "bfloat16"):
            xs, ks = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
            compiled = jax.jit(conv_same_k3).lower(xs, ks).compile()
            seconds = best_seconds(compiled, xs, ks, repeats=args.repeats)
            row[dtype] = {"seconds": round(seconds, 5), "gflop_per_s": round(row["gflop"] / seconds, 1)}
        row["gflop"] = round(row["gflop"], 3)
        convs.append(row)

    print(json.dumps({
        "benchmark": "vae_ceiling",
        "machine": describe(),
        "decoder": {"batch": args.batch, "gflop": round(decode_flops / 1e9, 2), "seconds": round(decode_s, 4),
                    "gflop_per_s": round(decode_flops / 1e9 / decode_s, 1)},
        "lone_k3_conv": convs,
    }))


if __name__ == "__main__":
    main()
