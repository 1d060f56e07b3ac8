"""Training throughput of each trainer at the faithful model sizes on the current backend; prints JSON.

    python benchmarks/train.py                       # vae, unet, clip with their configs' global batch
    python benchmarks/train.py --models unet --batch 512 --steps 20 --compute-dtype bfloat16

Synthetic batches (shapes of the real data) on a ("data", "fsdp") mesh over all devices; the step is the
real jitted, sharded, donated train step. Reports compile time, mean step time and examples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.config import load_config  # noqa: E402
from diffusets_jax.train import loop  # noqa: E402
from diffusets_jax.train.run import make_task  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_OF = {"vae": "diffusets_vae.py", "unet": "diffusets_unet.py", "clip": "diffusets_clip.py"}


def synthetic_batch(model: str, batch: int, text_dim: int) -> dict[str, np.ndarray]:
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


def benchmark(model: str, batch: int | None, steps: int, compute_dtype: str, fsdp: int) -> dict:
    config = load_config(CONFIGS / CONFIG_OF[model], [f"train.compute_dtype={compute_dtype}", f"mesh.fsdp={fsdp}",
                                                      "data.num_train_examples=1000000"])
    if batch:
        config.train.global_batch_size = batch
    mesh = parallel.mesh_from_config(config.mesh)
    task = make_task(model, config, num_steps=1000)
    _, shardings = loop.abstract_state(task, mesh, 0, float(config.train.ema_decay) > 0)
    state = loop.init_state(task, mesh, 0, float(config.train.ema_decay) > 0)
    step = loop.jit_train_step(loop.make_train_step(task, int(config.train.grad_accum_steps),
                                                    float(config.train.ema_decay)), shardings, mesh)
    global_batch = int(config.train.global_batch_size)
    text_dim = int(config.model.get("text_dim", 1536))
    data = parallel.shard_host_batch(synthetic_batch(model, global_batch, text_dim), mesh)
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, data)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "model": model, "backend": jax.default_backend(), "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape), "params": int(params),
        "global_batch": global_batch, "compute_dtype": compute_dtype, "steps": steps,
        "compile_s": round(compile_s, 2), "step_time_s": round(elapsed / steps, 5),
        "examples_per_s": round(global_batch * steps / elapsed, 1), "loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vae", "unet", "clip"], choices=sorted(CONFIG_OF))
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--fsdp", type=int, default=1)
    args = parser.parse_args()
    for model in args.models:
        print(json.dumps(benchmark(model, args.batch, args.steps, args.compute_dtype, args.fsdp)), flush=True)


if __name__ == "__main__":
    main()
