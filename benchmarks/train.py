"""Training throughput of the VAE, U-Net and CLIP trainers at the faithful model sizes; prints one JSON object.

    python benchmarks/train.py                                  # each config's global batch (256 / 512 / 256)
    python benchmarks/train.py --models unet --batch 4096 --compute-dtype bfloat16 --remat
    python benchmarks/train.py --batch vae=16 unet=64 clip=32 --steps 3   # CPU-sized batches

Synthetic batches (the shapes of the real data) on a ("data", "fsdp") mesh over all devices; the step is
the real jitted, sharded, donated train step of `diffusets_jax.train` (AdamW, one-cycle / cosine schedule,
loss in float32). Per model: compile time, step time (mean over `--steps` after one warm-up step),
examples/s, the host's page faults and system time per step, the compiled program's memory (arguments +
outputs + temporaries, from XLA's memory analysis) and, where the backend reports it (GPU, TPU), the device's
peak memory in use. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import arguments  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_OF = {"vae": "diffusets_vae.py", "unet": "diffusets_unet.py", "clip": "diffusets_clip.py"}
REMAT_MODELS = ("vae", "unet")


def parse_batches(values: list[str] | None, models: list[str]) -> dict[str, int | None]:
    """`--batch 64` (every model) or `--batch vae=16 unet=64`; None = the config's global batch."""
    batches: dict[str, int | None] = dict.fromkeys(models)
    for value in values or []:
        name, _, number = value.rpartition("=")
        if name and name not in CONFIG_OF:
            raise ValueError(f"--batch {value}: unknown model {name!r}; use one of {sorted(CONFIG_OF)}")
        if not number.isdigit() or int(number) <= 0:
            raise ValueError(f"--batch {value}: the batch must be a positive integer")
        for model in [name] if name else models:
            batches[model] = int(number)
    return batches


def parse_args() -> argparse.Namespace:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--models", nargs="+", default=["vae", "unet", "clip"], choices=sorted(CONFIG_OF))
    parser.add_argument("--batch", nargs="+", default=None, help="global batch: N, or MODEL=N per model")
    parser.add_argument("--steps", type=arguments.count, default=10)
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", action="store_true", help="rematerialise the VAE / U-Net blocks")
    parser.add_argument("--fsdp", type=arguments.count, default=1)
    parser.add_argument("--allocator-defaults", action="store_true",
                        help="leave glibc's allocator and JAX's CPU dispatch at their defaults; by default this "
                        "process keeps freed memory mapped, as the train command does (diffusets_jax/host_memory.py)")
    args = parser.parse_args()
    try:
        args.batches = parse_batches(args.batch, args.models)
    except ValueError as err:
        parser.error(str(err))
    return args


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from machine import describe, print_report  # noqa: E402

from diffusets_jax import host_memory, parallel  # noqa: E402
from diffusets_jax.config import load_config  # noqa: E402
from diffusets_jax.train import loop  # noqa: E402
from diffusets_jax.train.run import make_task  # noqa: E402


def synthetic_batch(model: str, batch: int, text_dim: int) -> dict[str, np.ndarray]:
    """A host batch shaped like the model's training data (ECGs in mV, latents, unit-norm text embeddings)."""
    rng = np.random.default_rng(0)
    if model == "vae":
        return {"ecg": rng.normal(0, 0.2, (batch, 1024, 12)).astype(np.float32)}
    text = rng.normal(size=(batch, text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    if model == "clip":
        return {"ecg": rng.normal(0, 0.2, (batch, 1024, 12)).astype(np.float32), "text_embedding": text}
    return {
        "latent_mean": rng.normal(size=(batch, 128, 4)).astype(np.float32),
        "latent_logvar": np.full((batch, 128, 4), -4.0, np.float32),
        "text_embedding": text,
        "sex": rng.integers(0, 2, batch).astype(np.float32),
        "age": rng.uniform(20, 90, batch).astype(np.float32),
        "heart_rate": rng.uniform(50, 110, batch).astype(np.float32),
    }


def build_step(model: str, batch: int | None, compute_dtype: str, remat: bool, fsdp: int = 1,
               model_overrides: tuple[str, ...] = ()):
    """`(jitted step, state, sharded batch, global batch)` of `model`'s real train step on all devices;
    `model_overrides` are config overrides such as "model.conv_algorithm=direct"."""
    overrides = [f"train.compute_dtype={compute_dtype}", f"mesh.fsdp={fsdp}", "data.num_train_examples=1000000",
                 *model_overrides]
    if remat:
        overrides.append("model.remat=true")
    config = load_config(CONFIGS / CONFIG_OF[model], overrides)
    if batch:
        config.train.global_batch_size = batch
    mesh = parallel.mesh_from_config(config.mesh)
    task = make_task(model, config, num_steps=1000)
    use_ema = float(config.train.ema_decay) > 0
    _, shardings = loop.abstract_state(task, mesh, 0, use_ema)
    state = loop.init_state(task, mesh, 0, use_ema)
    step = loop.jit_train_step(loop.make_train_step(task, int(config.train.grad_accum_steps),
                                                    float(config.train.ema_decay)), shardings, mesh)
    global_batch = int(config.train.global_batch_size)
    text_dim = int(config.model.get("text_dim", 1536))
    data = parallel.shard_host_batch(synthetic_batch(model, global_batch, text_dim), mesh)
    return step, state, data, global_batch


def compiled_memory_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries - donated aliases of a compiled program (XLA's static analysis)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def peak_device_memory_bytes() -> int | None:
    """The first device's peak bytes in use since start-up, where the backend tracks it (not on CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def memory_limit() -> tuple[int, str, int]:
    """`(bytes, what, devices_sharing)`: the memory a step's program may use and how many devices' programs share
    it. The device's own limit where the backend reports one (GPU, TPU), for that device alone; else the host's
    available memory, which every local (simulated CPU) device shares."""
    stats = jax.devices()[0].memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"one {jax.devices()[0].device_kind}'s memory", 1
    return host_available_bytes(), "this host's available memory", len(jax.local_devices())


def host_available_bytes() -> int:
    """The kernel's MemAvailable (free memory plus the page cache it can reclaim; free pages alone understate it
    after a data run), or the physical memory where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def too_large(model: str, global_batch: int, need: int | None, limit: int, what: str, devices_sharing: int
              ) -> str | None:
    """The one line that refuses a step whose program (`need` bytes per device, XLA's memory analysis), once for
    each of the `devices_sharing` devices, does not fit `limit` bytes (`memory_limit`), or None. The configs'
    global batches are sized for accelerators: on a CPU the VAE's 256 asks for about 34 GB. Checked after
    compiling and before running, so the error is this line, not XLA's."""
    if need is None or need * devices_sharing <= limit:
        return None
    return (f"train.py: the {model} step at global batch {global_batch} needs {need * devices_sharing / 1e9:.1f} GB "
            f"(XLA's memory analysis) and {what} is {limit / 1e9:.1f} GB: pass a smaller --batch, e.g. "
            f"--batch vae=16 unet=64 clip=32 on a CPU")


def benchmark(model: str, batch: int | None, steps: int, compute_dtype: str, remat: bool, fsdp: int) -> dict:
    print(f"[train] {model}: building", file=sys.stderr, flush=True)
    step, state, data, global_batch = build_step(model, batch, compute_dtype, remat, fsdp)
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    refusal = too_large(model, global_batch, compiled_memory_bytes(compiled), *memory_limit())
    if refusal:
        print(refusal, file=sys.stderr)
        sys.exit(2)
    print(f"[train] {model}: compiled in {compile_s:.1f} s, timing {steps} steps", file=sys.stderr, flush=True)
    state, metrics = compiled(state, data)  # warm-up
    jax.block_until_ready(metrics)
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "params": int(params), "global_batch": global_batch, "compute_dtype": compute_dtype, "remat": remat,
        "steps": steps, "compile_s": round(compile_s, 2), "step_time_s": round(elapsed / steps, 5),
        "examples_per_s": round(global_batch * steps / elapsed, 1),
        # What mapping memory afresh costs (diffusets_jax/host_memory.py; --allocator-defaults to compare).
        "minor_faults_per_step": round((after.ru_minflt - usage.ru_minflt) / steps),
        "system_s_per_step": round((after.ru_stime - usage.ru_stime) / steps, 4),
        "compiled_memory_bytes": compiled_memory_bytes(compiled),
        "peak_device_memory_bytes": peak_device_memory_bytes(),
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    args = parse_args()
    # Before JAX starts its backend (describe() does): the dispatch setting is read then.
    kept = not args.allocator_defaults and host_memory.keep_freed_memory()
    machine = describe()
    devices = machine["device_count"]
    if devices % args.fsdp:
        arguments.fail(f"--fsdp {args.fsdp} does not divide the {devices} devices: pass a divisor of {devices}")
    report = {"benchmark": "train", "keep_freed_memory": kept, "results": {}}
    for model in args.models:
        remat = args.remat and model in REMAT_MODELS  # CLIP has no remat option
        report["results"][model] = benchmark(model, args.batches[model], args.steps, args.compute_dtype, remat,
                                             args.fsdp)
    print_report(report, machine)


if __name__ == "__main__":
    main()
