"""Sampling throughput: ECG/s (latent chain + VAE decode, one jitted function) on the current backend.

Runs the faithful U-Net and VAE decoder (random NumPy weights: speed does not depend on them; `--size demo`
the demo's) with
DDPM-1000, DDIM-50 and DPM-Solver++-20, batch sharded over every device, and prints one JSON object.

Long chains are timed on fewer steps and extrapolated: the scan body is identical at every step, so
time(n steps) = fixed (noise draw, decode) + n * per_step. Entries that do this say
`"extrapolated_from_steps": k`. Guidance is measured both ways (doubled batch vs two calls).

    PYTHONPATH=$PWD python benchmarks/sampling.py                       # CPU default: batches 1, 16, 128
    PYTHONPATH=$PWD python benchmarks/sampling.py --dtype bfloat16      # accelerator default adds 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arguments  # noqa: E402
from model_sizes import add_size_argument, build, random_variables  # noqa: E402

from diffusets_jax.cli import finite_float  # noqa: E402

# The names of SAMPLER_CONFIGS (below: building them imports JAX), for the parser.
SAMPLERS = ("ddpm-1000", "ddim-50", "dpmpp_2m-20")


def parse_args() -> argparse.Namespace:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="network compute dtype (sampler arithmetic stays float32)")
    parser.add_argument("--batches", type=arguments.counts, default=None,
                        help="comma-separated global batch sizes (default 1,16,128; plus 1024 on an accelerator)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"subset of {list(SAMPLERS)}")
    parser.add_argument("--ddpm-timed-steps", type=arguments.count, default=None,
                        help="time DDPM on this many steps and extrapolate to 1000 "
                        "(default 10 on CPU, all on accelerators)")
    parser.add_argument("--repeats", type=arguments.count, default=None,
                        help="timed calls per point, median reported (default 3 CPU, 5 accelerator)")
    parser.add_argument("--guidance-scale", type=finite_float, default=3.0,
                        help="scale for the guidance comparison (DPM-Solver++-20)")
    parser.add_argument("--skip-guidance", action="store_true",
                        help="do not measure doubled-batch vs two-call guidance")
    add_size_argument(parser)
    args = parser.parse_args()
    unknown = sorted(set(args.samplers.split(",")) - set(SAMPLERS))
    if unknown:
        parser.error(f"--samplers: unknown {unknown}; choose from {list(SAMPLERS)}")
    return args


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from machine import describe, print_report  # noqa: E402

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.diffusion.guidance import fixed_null_condition  # noqa: E402
from diffusets_jax.diffusion.samplers import SamplerConfig, jit_generate, sampler_config, vae_decode_fn  # noqa: E402
from diffusets_jax.diffusion.schedule import make_schedule  # noqa: E402
from diffusets_jax.models.unet import UNet  # noqa: E402
from diffusets_jax.models.vae import VAE  # noqa: E402

SAMPLER_CONFIGS = {  # keyed by SAMPLERS
    "ddpm-1000": SamplerConfig.faithful(),
    "ddim-50": sampler_config("ddim", data_std=0.18),  # the defaults; speed does not depend on the grid
    "dpmpp_2m-20": sampler_config("dpmpp_2m"),
}


def _block(x: Any) -> Any:
    return jax.tree.map(lambda a: a.block_until_ready(), x)


def _timed(fn, *args, repeats: int) -> float:
    """Median wall time of `repeats` calls (after the compile call the caller already made)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _condition(batch: int, text_dim: int, sharding: NamedSharding) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 4)
    cond = {
        "text_embedding": jax.random.normal(keys[0], (batch, text_dim)) * 0.02,
        "sex": jax.random.bernoulli(keys[1], 0.5, (batch,)).astype(jnp.float32),
        "age": jax.random.uniform(keys[2], (batch,), minval=20, maxval=90),
        "heart_rate": jax.random.uniform(keys[3], (batch,), minval=50, maxval=110),
    }
    return jax.device_put(cond, sharding)


def measure(
    unet: UNet, vae: VAE, variables: tuple[Any, Any], config: SamplerConfig, batch: int, *,
    mesh: jax.sharding.Mesh, timed_steps: int | None, repeats: int, compute_dtype: Any,
) -> dict[str, Any]:
    """Compile and time one (sampler, batch) point; with `timed_steps` the chain is timed that long and
    extrapolated to `config.steps`."""
    schedule = make_schedule()
    batch_sharding = parallel.batch_sharding(mesh)
    cond = _condition(batch, unet.text_dim, batch_sharding)
    null = fixed_null_condition(unet.text_dim)
    key = jax.random.key(1)
    steps = config.steps if timed_steps is None else min(timed_steps, config.steps)
    run_config = SamplerConfig(**{**config.__dict__, "steps": steps})
    fn = jit_generate(unet, vae, schedule, run_config, batch_sharding=batch_sharding, compute_dtype=compute_dtype)
    start = time.perf_counter()
    compiled = fn.lower(*variables, cond, key, null).compile()
    compile_s = time.perf_counter() - start
    _block(compiled(*variables, cond, key, null))
    seconds = _timed(compiled, *variables, cond, key, null, repeats=repeats)
    result: dict[str, Any] = {"batch": batch, "compile_s": round(compile_s, 2)}
    if steps != config.steps:
        # fixed part (initial noise + VAE decode) measured separately, the rest scales with steps
        decode = jax.jit(lambda v, z: vae_decode_fn(vae, v, compute_dtype)(z))
        z = jax.device_put(jnp.zeros((batch, 128, 4)), batch_sharding)
        _block(decode(variables[1], z))
        fixed = _timed(decode, variables[1], z, repeats=repeats)
        per_step = max(seconds - fixed, 0.0) / steps
        seconds = fixed + per_step * config.steps
        result["extrapolated_from_steps"] = steps
        result["decode_s"] = round(fixed, 4)
    result["seconds"] = round(seconds, 4)
    result["ecg_per_s"] = round(batch / seconds, 3)
    result["denoising_steps_per_s"] = round(config.steps / seconds, 2)
    print(json.dumps({"sampler": config.sampler, "steps": config.steps, "guidance": config.guidance_mode
                      if config.guidance_scale != 1.0 else None, **result}), file=sys.stderr, flush=True)  # progress
    return result


def main() -> None:
    args = parse_args()
    machine = describe()

    on_cpu = machine["backend"] == "cpu"
    batches = args.batches or ([1, 16, 128] if on_cpu else [1, 16, 128, 1024])
    ddpm_timed = args.ddpm_timed_steps if args.ddpm_timed_steps is not None else (10 if on_cpu else None)
    repeats = args.repeats or (3 if on_cpu else 5)
    compute_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None

    devices = jax.devices()
    # The batch is sharded over every device: a size the device count does not divide cannot be timed, and the
    # report says which were left out rather than leaving them out silently.
    skipped = [b for b in batches if b % len(devices)]
    batches = [b for b in batches if not b % len(devices)]
    mesh = parallel.make_mesh()  # the mesh `sample` uses: Auto axes, batch over every device
    unet = build("unet", args.size)
    vae = build("vae", args.size)
    batch0 = len(devices)
    unet_vars = random_variables(unet.init, jnp.zeros((batch0, 128, 4)), jnp.zeros((batch0,), jnp.int32),
                                 jnp.zeros((batch0, unet.text_dim)), jnp.zeros((batch0,)), jnp.zeros((batch0,)),
                                 jnp.zeros((batch0,)))
    vae_vars = random_variables(lambda key, z: vae.init(key, z, method="decode"), jnp.zeros((batch0, 128, 4)))
    # float32 parameters, as a model directory holds them: `jit_generate(compute_dtype=...)` runs both networks in
    # that dtype exactly as `diffusets-jax sample --dtype` does
    variables = (unet_vars, vae_vars)

    results: dict[str, Any] = {
        "benchmark": "sampling (latent chain + VAE decode in one jit)",
        "dtype": args.dtype,
        "models": args.size,
        "weights": f"random NumPy normals, {args.size}-size U-Net and VAE decoder",
        "samplers": {},
        **({"batches_not_divisible_by_the_devices": skipped} if skipped else {}),
    }
    for name in args.samplers.split(","):
        config = SAMPLER_CONFIGS[name]
        timed = ddpm_timed if config.sampler == "ddpm" else None
        results["samplers"][name] = [
            measure(unet, vae, variables, config, b, mesh=mesh, timed_steps=timed, repeats=repeats, compute_dtype=compute_dtype)
            for b in batches
        ]
    if not args.skip_guidance:
        guidance = {}
        for mode in ("batched", "sequential"):
            config = SamplerConfig(sampler="dpmpp_2m", steps=20, clip_sample=False,
                                   guidance_scale=args.guidance_scale, guidance_mode=mode)
            guidance[mode] = [
                measure(unet, vae, variables, config, b, mesh=mesh, timed_steps=None, repeats=repeats, compute_dtype=compute_dtype)
                for b in batches
            ]
        results["guidance_dpmpp_2m-20"] = guidance
    print_report(results, machine, indent=1)


if __name__ == "__main__":
    main()
