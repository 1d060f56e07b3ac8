"""Throughput of the published-size VAE encode / decode and the CLIP ECG tower on the current backend (JSON).

    python benchmarks/models_vae_clip.py --batch 256 --repeats 10

Weights are random (speed does not depend on them); each function is jitted once and timed after a warm-up.
Prints one JSON object: backend, device kind, batch, compile seconds and ECGs/s per function.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arguments  # noqa: E402


def parse_args() -> argparse.Namespace:
    return arguments.parse_batch_and_repeats(__doc__.splitlines()[0], batch=64, repeats=5)


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import jax  # noqa: E402
from machine import describe, print_report  # noqa: E402
from model_sizes import random_variables  # noqa: E402

from diffusets_jax.models.clip import CLIP  # noqa: E402
from diffusets_jax.models.vae import VAE  # noqa: E402


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / repeats


def main() -> None:
    args = parse_args()
    machine = describe()

    ecg = jax.random.normal(jax.random.key(0), (args.batch, 1024, 12))
    latent = jax.random.normal(jax.random.key(1), (args.batch, 128, 4))
    text = jax.random.normal(jax.random.key(2), (args.batch, 1536))
    vae, clip = VAE(), CLIP()
    vae_vars = random_variables(vae.init, ecg[:1], jax.random.key(4))
    clip_vars = random_variables(clip.init, ecg[:1], text[:1])

    functions = {
        "vae_encode": (jax.jit(lambda v, x: vae.apply(v, x, method=VAE.encode)), vae_vars, ecg),
        "vae_decode": (jax.jit(lambda v, z: vae.apply(v, z, method=VAE.decode)), vae_vars, latent),
        "clip_encode_ecg": (jax.jit(lambda v, x: clip.apply(v, x, method=CLIP.encode_ecg)), clip_vars, ecg),
    }
    result = {"benchmark": "models_vae_clip", "batch": args.batch}
    for name, (fn, variables, x) in functions.items():
        compile_s, step_s = _time(fn, variables, x, repeats=args.repeats)
        result[name] = {"compile_s": round(compile_s, 2), "ecgs_per_s": round(args.batch / step_s, 1)}
    print_report(result, machine)


if __name__ == "__main__":
    main()
