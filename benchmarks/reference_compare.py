"""Ours against the published PyTorch modules on the same machine, interleaved; prints one JSON object.

    python benchmarks/reference_compare.py --reference-repo ~/src/DiffuSETS \\
        --torch-python ~/venv-torch/bin/python --repeats 7
    python benchmarks/reference_compare.py ... --measures vae_train:16 unet_forward:128

`--reference-repo` is a checkout of the published DiffuSETS code; `--torch-python` the interpreter of a
separate environment with PyTorch (CPU), which runs `reference_worker.py` (PyTorch is not a dependency
of this project). Each measure is set up on both sides (our program compiled, both warmed up), then the
two are run alternately `--repeats` times (which goes first alternates too), so both see the same
background load; the figures are the minimum and median wall time per run and the speed-up
reference_min / ours_min. Compile and warm-up time is excluded (ours is reported separately).

Measures: `matmul:N` (one N x N float32 matrix product: the compute ceiling each framework reaches on this
machine), `unet_forward:B` (one U-Net call, no gradient), `unet_train:B` (forward, loss, backward, AdamW:
our real sharded train step), `vae_train:B` (encoder + decoder + loss + backward + AdamW) and
`vae_decode:B`. Weights are random: speed does not depend on them. Each measure also reports its operation
count (XLA's cost analysis) for both sides, the published one counted on our program doing their arithmetic
(direct convolutions, the literal cross-attention, the self-attention projections in turn), and so each
side's GFLOP/s: a speed-up goal that would need more GFLOP/s than the matmul ceiling is out of reach for any
schedule of the same operations. Under background load PyTorch slows far more than XLA does, so only figures
from a quiet run compare the programs themselves; the load average is recorded before and after.

Both frameworks lose time to page faults when glibc maps large blocks afresh on every call; our `train` command
stops that for its own process (`diffusets_jax/host_memory.py`). `--keep-freed-memory` says which side gets
those settings: `none` (the default: both as glibc leaves them, the comparison of every earlier run), `ours`
(each side as its training runs) or `both` (the same allocator on both sides: the programs alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import arguments  # noqa: E402

DEFAULT_MEASURES = ("matmul:4096", "unet_forward:1", "unet_forward:16", "unet_forward:128", "unet_train:64", "vae_train:16",
                    "vae_decode:16", "vae_decode:128")
# Which side keeps freed host memory mapped (`--keep-freed-memory`).
KEEP_FREED_MEMORY = ("none", "ours", "both")
MEASURES = ("matmul", "unet_forward", "unet_train", "vae_train", "vae_decode")
# Issue 16's side-by-side figures (2-core machine, PyTorch 2.x CPU with 2 threads, minimum of several
# interleaved repetitions), the comparison point when the published code cannot be run here.
ISSUE_16_REFERENCE_S = {"unet_forward:1": 0.0129, "unet_forward:16": 0.0656, "unet_forward:128": 0.599,
                        "unet_train:64": 0.65, "vae_train:16": 2.14, "vae_decode:16": 0.60, "vae_decode:128": 6.52}


def parse_measure(text: str) -> tuple[str, int]:
    name, _, batch = text.partition(":")
    if name not in MEASURES or not batch.isdigit() or int(batch) <= 0:
        raise ValueError(f"measure {text!r}: write NAME:BATCH with NAME one of {', '.join(MEASURES)}")
    return name, int(batch)


def parse_args() -> argparse.Namespace:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--reference-repo", required=True, help="checkout of the published DiffuSETS code")
    parser.add_argument("--torch-python", required=True, help="python of an environment with PyTorch")
    parser.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES), help="NAME:BATCH ...")
    parser.add_argument("--repeats", type=arguments.count, default=5)
    parser.add_argument("--threads", type=arguments.count, default=2,
                        help="PyTorch intra-op threads (JAX uses every core)")
    parser.add_argument("--keep-freed-memory", choices=KEEP_FREED_MEMORY, default="none",
                        help="which side keeps freed host memory mapped, as our train command does "
                        "(diffusets_jax/host_memory.py): none (glibc's defaults on both sides), ours (each side as "
                        "its training runs), both (the same allocator on both sides)")
    args = parser.parse_args()
    try:
        args.measures = [parse_measure(m) for m in args.measures]  # (NAME, BATCH) pairs
    except ValueError as err:
        parser.error(f"--measures: {err}")
    if not (Path(args.reference_repo) / "vae" / "vae_model.py").is_file():
        parser.error(f"--reference-repo {args.reference_repo}: no vae/vae_model.py there; give the published checkout")
    return args


# Checked before the imports below load JAX (seconds): a bad flag is one line at once, not a traceback after
# compiling (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from forward import unet_inputs  # noqa: E402
from machine import describe, print_report  # noqa: E402
from model_sizes import random_variables  # noqa: E402
from train import build_step  # noqa: E402
from vae_ceiling import flops_of  # noqa: E402

from diffusets_jax import host_memory  # noqa: E402


def program(measure: str, batch: int, published: bool = False) -> tuple[Callable, tuple]:
    """`(jitted function, arguments)` of our program for `measure` at `batch`. `published=True` gives the
    arithmetic of the published modules instead of ours, for counting it: direct convolutions (ours run the
    VAE's wide ones as Winograd convolutions), the literal one-token cross-attention (ours adds its
    equivalent per-sample bias) and the self-attention's linears and projections in turn (ours multiplies
    their weights first); the results are the same, the number of operations is not."""
    from diffusets_jax.models.unet import UNet
    from diffusets_jax.models.vae import VAE

    if measure == "matmul":
        a = jax.random.normal(jax.random.key(0), (batch, batch), jnp.float32)
        return jax.jit(jnp.matmul), (a, a)
    if measure in ("unet_train", "vae_train"):
        model = measure.split("_")[0]
        literal = {"vae": ("model.conv_algorithm=direct",),
                   "unet": ("model.exact_cross_attention=true", "model.exact_projections=true")}
        step, state, data, _ = build_step(model, batch, "float32", remat=False,
                                          model_overrides=literal[model] if published else ())
        return step, (state, data)
    if measure == "unet_forward":
        module = UNet(exact_cross_attention=published, exact_projections=published)
        inputs = unet_inputs(batch, module.text_dim, jax.random.key(0))
        variables = random_variables(module.init, *unet_inputs(1, module.text_dim, jax.random.key(0)))
        return jax.jit(module.apply), (variables, *inputs)
    module = VAE(conv_algorithm="direct" if published else "auto")
    z = jax.random.normal(jax.random.key(0), (batch, 128, module.latent_channels))
    variables = random_variables(lambda k, z: module.init(k, z, method=VAE.decode), z[:1])
    return jax.jit(lambda v, z: module.apply(v, z, method=VAE.decode)), (variables, z)


def build_ours(measure: str, batch: int) -> tuple[Callable[[], None], float, float]:
    """`(run, compile_s, gflop)`: a no-argument callable that runs our program once and waits for it, the
    seconds to lower and compile it, and its operation count."""
    start = time.perf_counter()
    function, args = program(measure, batch)
    lowered = function.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    if measure in ("unet_train", "vae_train"):
        holder = {"state": args[0]}

        def run():
            holder["state"], metrics = compiled(holder["state"], args[1])  # the state is donated: keep the new one
            jax.block_until_ready(metrics)
    else:

        def run():
            jax.block_until_ready(compiled(*args))
    run()  # warm-up
    return run, compile_s, flops_of(lowered) / 1e9


def published_gflop(measure: str, batch: int, ours: float) -> float:
    """The operation count of the published modules' arithmetic for `measure` (XLA's count of our program
    computing it their way, `program(..., published=True)`); `ours` where the two do the same arithmetic."""
    if measure == "matmul":
        return ours
    function, args = program(measure, batch, published=True)
    return flops_of(function.lower(*args)) / 1e9


class ReferenceWorker:
    """The PyTorch worker process: one request, one JSON answer."""

    def __init__(self, torch_python: str, reference_repo: str, threads: int, keep_freed_memory: bool) -> None:
        self.process = subprocess.Popen(
            [torch_python, str(HERE / "reference_worker.py"), "--reference-repo", reference_repo,
             "--threads", str(threads), *(["--keep-freed-memory"] if keep_freed_memory else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the PyTorch worker exited; its error is above (is torch installed there?)")
        return json.loads(line)

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            self.request_quit()
        self.process.wait(timeout=60)

    def request_quit(self) -> None:
        self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.process.stdin.flush()


def git_commit(repo: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def compare(worker: ReferenceWorker, measure: str, batch: int, repeats: int) -> dict:
    print(f"[reference_compare] {measure}:{batch}: setting up", file=sys.stderr, flush=True)
    ours, compile_s, ours_gflop = build_ours(measure, batch)
    reference_gflop = published_gflop(measure, batch, ours_gflop)
    worker.request(cmd="setup", measure=measure, batch=batch)
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for rep in range(repeats):
        for side in ("ours", "reference") if rep % 2 == 0 else ("reference", "ours"):
            if side == "ours":
                start = time.perf_counter()
                ours()
                times["ours"].append(time.perf_counter() - start)
            else:
                times["reference"].append(worker.request(cmd="run", measure=measure, batch=batch)["seconds"])
        print(f"[reference_compare] {measure}:{batch} rep {rep}: ours {times['ours'][-1]:.4f} s, "
              f"reference {times['reference'][-1]:.4f} s", file=sys.stderr, flush=True)
    ours_min, ref_min = min(times["ours"]), min(times["reference"])
    return {
        "measure": measure, "batch": batch,
        "ours_min_s": round(ours_min, 5), "ours_median_s": round(statistics.median(times["ours"]), 5),
        "reference_min_s": round(ref_min, 5), "reference_median_s": round(statistics.median(times["reference"]), 5),
        "speedup": round(ref_min / ours_min, 3), "ours_compile_s": round(compile_s, 2),
        # Operations per run (XLA's count) and the rate at each side's minimum time: how close each program
        # runs to this machine's ceiling, which the matmul measure gives for both frameworks.
        "reference_gflop": round(reference_gflop, 2), "ours_gflop": round(ours_gflop, 2),
        "reference_gflop_per_s": round(reference_gflop / ref_min, 1), "ours_gflop_per_s": round(ours_gflop / ours_min, 1),
        "issue_16_reference_s": ISSUE_16_REFERENCE_S.get(f"{measure}:{batch}"),
    }


def main() -> None:
    args = parse_args()
    # Before JAX starts its backend (describe() does): the dispatch setting is read then.
    ours_kept = args.keep_freed_memory != "none" and host_memory.keep_freed_memory()
    if args.keep_freed_memory != "none" and not ours_kept:
        # After the imports (a property of this process, not of the flag's value), still before anything runs.
        print("reference_compare.py: error: --keep-freed-memory: this process cannot (not glibc, or GLIBC_TUNABLES "
              "sets glibc.malloc.*)", file=sys.stderr)
        sys.exit(2)
    machine = describe()
    report = {"benchmark": "reference_compare", "ours_dtype": "float32", "repeats": args.repeats,
              "keep_freed_memory": args.keep_freed_memory, "results": []}
    worker = ReferenceWorker(args.torch_python, args.reference_repo, args.threads, args.keep_freed_memory == "both")
    try:
        report["reference"] = {"torch": worker.info["torch"], "threads": worker.info["threads"],
                               "repo": str(Path(args.reference_repo).resolve()),
                               "commit": git_commit(args.reference_repo)}
        for measure, batch in args.measures:
            report["results"].append(compare(worker, measure, batch, args.repeats))
    finally:
        worker.close()
    print_report(report, machine)


if __name__ == "__main__":
    main()
