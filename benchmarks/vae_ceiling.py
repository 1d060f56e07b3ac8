"""How close the VAE runs to the backend's convolution ceiling, and what Winograd convolutions gain (prints one JSON
object).

The VAE is almost all k3 convolutions. This measures (1) the published decoder at `--batch` with the direct
convolution: XLA's own FLOP count (compiled cost analysis), the time and so the GFLOP/s achieved; (2) one lone
k3 "same" convolution at the decoder's widest shapes, in float32 and bfloat16: what the backend's convolution
reaches at best; (3) the decoder forward and the whole training gradient (encoder, decoder, reconstruction
loss) with `conv_algorithm` "direct" and "auto" (Winograd F(6, 3) / F(6, 2) where it pays, on the CPU), and
the decoder with Winograd forced everywhere (what "auto" declines, e.g. at batch 1), run alternately so all
see the same load; (4) the gradient of GroupNorm + SiLU alone at the VAE's activation shapes, as
`nn.GroupNorm` then SiLU and as the fused `GroupNormSiLU` the VAE uses, alternately. When (1) is close to (2)
the convolutions are compute-bound, and only fewer operations, which (3) measures, can make them faster.

    PYTHONPATH=$PWD python benchmarks/vae_ceiling.py [--batch 16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import arguments  # noqa: E402


def parse_args() -> argparse.Namespace:
    return arguments.parse_batch_and_repeats(__doc__.splitlines()[0], batch=16, repeats=10)


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import describe, print_report  # noqa: E402
from model_sizes import random_variables  # noqa: E402

from diffusets_jax.models.group_norm import GroupNormSiLU  # noqa: E402
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
    """XLA's count of the floating-point operations of a lowered or compiled program (its cost analysis)."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def compare_algorithms(variables, latent: jax.Array, ecg: jax.Array, repeats: int) -> dict:
    """Decoder forward (direct, "auto", Winograd everywhere) and training gradient (direct, "auto"), timed
    alternately: minimum seconds, and speed-ups over direct."""
    programs = {}
    for algorithm in ("direct", "auto", "winograd"):
        vae = VAE(conv_algorithm=algorithm)
        programs[("decode", algorithm)] = (jax.jit(lambda v, z, vae=vae: vae.apply(v, z, method=VAE.decode))
                                           .lower(variables, latent).compile(), latent)
        if algorithm == "winograd":
            continue  # forced everywhere only shows where "auto" declines; the decode says it

        def loss(v, x, vae=vae):
            reconstruction, _, _ = vae.apply(v, x, jax.random.key(0))
            return jnp.sum(jnp.square(reconstruction - x))

        programs[("train_gradient", algorithm)] = (jax.jit(jax.grad(loss)).lower(variables, ecg).compile(), ecg)
    for compiled, data in programs.values():
        jax.block_until_ready(compiled(variables, data))  # warm-up
    times = {key: [] for key in programs}
    for _ in range(repeats):
        for key, (compiled, data) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(variables, data))
            times[key].append(time.perf_counter() - start)
    result = {}
    for (measure, algorithm), seconds in times.items():
        row = result.setdefault(measure, {})
        row[f"{algorithm}_s"] = round(min(seconds), 4)
        if algorithm != "direct":
            row[f"{algorithm}_speedup"] = round(min(times[(measure, "direct")]) / min(seconds), 3)
    return result


def compare_group_norms(batch: int, repeats: int) -> list[dict]:
    """Gradient of sum(GroupNorm(32) + SiLU) at the VAE's activation shapes: `nn.GroupNorm` then `nn.silu`
    against the fused `GroupNormSiLU`, timed alternately; minimum milliseconds and the speed-up."""
    flax_norm = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False)
    ways = {"flax": lambda p, x: nn.silu(flax_norm.apply({"params": p}, x)),
            "fused": lambda p, x: GroupNormSiLU(32).apply({"params": p}, x)}
    rows = []
    for length, channels in ((1024, 128), (512, 256), (256, 512), (128, 512)):
        x = jax.random.normal(jax.random.key(4), (batch, length, channels))
        params = {"scale": jnp.ones(channels), "bias": jnp.zeros(channels)}
        programs = {name: jax.jit(jax.grad(lambda p, x, f=f: jnp.sum(f(p, x)), argnums=(0, 1)))
                    .lower(params, x).compile() for name, f in ways.items()}
        times = {name: [] for name in programs}
        for compiled in programs.values():
            jax.block_until_ready(compiled(params, x))
        for _ in range(repeats):
            for name, compiled in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, x))
                times[name].append(time.perf_counter() - start)
        flax_ms, fused_ms = (1e3 * min(times[name]) for name in ("flax", "fused"))
        rows.append({"shape": [batch, length, channels], "flax_ms": round(flax_ms, 2), "fused_ms": round(fused_ms, 2),
                     "speedup": round(flax_ms / fused_ms, 2)})
    return rows


def conv_same_k3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC"))


def main() -> None:
    args = parse_args()
    machine = describe()

    vae = VAE(conv_algorithm="direct")
    latent = 0.18 * jax.random.normal(jax.random.key(2), (args.batch, 128, vae.latent_channels))
    ecg = jax.random.normal(jax.random.key(3), (args.batch, 1024, vae.in_channels))
    variables = random_variables(vae.init, ecg[:1], jax.random.key(1))
    decode = jax.jit(lambda v, z: vae.apply(v, z, method=VAE.decode)).lower(variables, latent).compile()
    decode_flops = flops_of(decode)
    decode_s = best_seconds(decode, variables, latent, repeats=args.repeats)
    algorithms = compare_algorithms(variables, latent, ecg, args.repeats)

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

    print_report({
        "benchmark": "vae_ceiling",
        "decoder": {"batch": args.batch, "gflop": round(decode_flops / 1e9, 2), "seconds": round(decode_s, 4),
                    "gflop_per_s": round(decode_flops / 1e9 / decode_s, 1)},
        "lone_k3_conv": convs,
        "conv_algorithms": algorithms,
        "group_norm_silu_gradient": compare_group_norms(args.batch, args.repeats),
    }, machine)


if __name__ == "__main__":
    main()
