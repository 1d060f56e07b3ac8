"""Posterior sampling cost: seconds per step and compiled memory, against plain sampling, on the current backend.

Runs the published-size U-Net and VAE (random weights: cost does not depend on them; `--size demo` the demo's) through
`jit_posterior_generate` (twisted SMC: U-Net and decoder forward and backward for every particle at every
step) and `jit_generate` (plain ancestral steps, decode once), batch sharded over every device, and prints
one JSON object. Per-step time comes from two chain lengths, t(n) = fixed + n * per_step, so a 100-step
run's time is fixed + 100 * per_step. `temp_bytes` is XLA's compiled temporary memory (activations kept
for the backward pass included), per device.

    PYTHONPATH=$PWD python benchmarks/posterior.py                         # CPU: batch 1, K = 1 and 4
    PYTHONPATH=$PWD python benchmarks/posterior.py --batch 8 --particles 1 8 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arguments  # noqa: E402
from model_sizes import add_size_argument, build, random_variables  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arguments.parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=arguments.count, default=None, help="ECGs per call (default: the device count)")
    parser.add_argument("--particles", type=arguments.count, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=arguments.count, nargs=2, default=[2, 4], help="two chain lengths to time")
    parser.add_argument("--repeats", type=arguments.count, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_size_argument(parser)
    args = parser.parse_args(argv)
    if args.steps[0] == args.steps[1]:  # per step = (t(n2) - t(n1)) / (n2 - n1)
        parser.error(f"--steps {args.steps[0]} {args.steps[1]}: give two different chain lengths, e.g. --steps 2 4")
    return args


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import describe, print_report  # noqa: E402

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.diffusion.observations import make_observation  # noqa: E402
from diffusets_jax.diffusion.posterior import PosteriorConfig, jit_posterior_generate  # noqa: E402
from diffusets_jax.diffusion.samplers import SamplerConfig, jit_generate  # noqa: E402
from diffusets_jax.diffusion.schedule import make_schedule  # noqa: E402


def _block(x: Any) -> Any:
    return jax.tree.map(lambda a: a.block_until_ready(), x)


def _measure(make, args, steps: tuple[int, int], repeats: int) -> dict[str, float]:
    """Compile and time `make(n)(*args)` at two chain lengths; per-step time by the difference."""
    timings, compile_s, temp_bytes = [], 0.0, None
    for n in steps:
        fn = make(n)
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = max(compile_s, time.perf_counter() - start)
        analysis = compiled.memory_analysis()
        temp_bytes = None if analysis is None else int(analysis.temp_size_in_bytes)
        _block(compiled(*args))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            _block(compiled(*args))
            runs.append(time.perf_counter() - start)
        timings.append(float(np.median(runs)))
    per_step = (timings[1] - timings[0]) / (steps[1] - steps[0])
    fixed = timings[0] - steps[0] * per_step
    return {"per_step_s": per_step, "fixed_s": fixed, "seconds_for_100_steps": fixed + 100 * per_step,
            "compile_s": compile_s, "temp_bytes": temp_bytes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = describe()
    batch = args.batch or machine["device_count"]
    if batch % machine["device_count"]:  # the batch is sharded over every device
        arguments.fail(f"--batch {batch} is not a multiple of the {machine['device_count']} devices")
    mesh = parallel.make_mesh()
    sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    compute_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    unet, vae = build("unet", args.size), build("vae", args.size)
    text_dim = unet.text_dim
    unet_vars = jax.device_put(random_variables(unet.init, jnp.zeros((1, 128, 4)), jnp.zeros((1,), jnp.int32),
                                          jnp.zeros((1, text_dim)), jnp.ones((1,)), jnp.ones((1,)), jnp.ones((1,))),
                               replicated)
    vae_vars = jax.device_put(random_variables(vae.init, jnp.zeros((1, 1024, 12)), jax.random.key(1)), replicated)
    keys = jax.random.split(jax.random.key(2), 4)
    cond = jax.device_put({"text_embedding": 0.02 * jax.random.normal(keys[0], (batch, text_dim)),
                           "sex": jnp.ones((batch,)), "age": jnp.full((batch,), 60.0),
                           "heart_rate": jnp.full((batch,), 70.0)}, sharding)
    t = np.arange(1024) / 102.4
    reference = (0.5 * np.sin(2 * np.pi * 1.2 * t))[None, :, None] * np.ones((batch, 1, 12))
    observation = jax.device_put(make_observation(reference, noise_std=0.05, leads="I,II"), sharding)
    schedule = make_schedule()
    chain = lambda n: SamplerConfig(sampler="ddpm", steps=n, clip_sample=True)
    results: dict[str, Any] = {"benchmark": "posterior", "models": args.size, "batch": batch,
                               "dtype": args.dtype, "timed_steps": args.steps}
    results["generate"] = _measure(
        lambda n: jit_generate(unet, vae, schedule, chain(n), batch_sharding=sharding, compute_dtype=compute_dtype),
        (unet_vars, vae_vars, cond, jax.random.key(3)), tuple(args.steps), args.repeats)
    for k in args.particles:
        results[f"posterior_k{k}"] = _measure(
            lambda n, k=k: jit_posterior_generate(unet, vae, schedule, PosteriorConfig(sampler=chain(n), particles=k),
                                                  batch_sharding=sharding, compute_dtype=compute_dtype),
            (unet_vars, vae_vars, cond, observation, jax.random.key(3)), tuple(args.steps), args.repeats)
    print_report(results, machine, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
