"""Every benchmark still runs, at toy sizes, and prints exactly one JSON object on stdout.

Benchmarks are not timed here (speed goals live in the benchmarks themselves); this catches the drift that
broke `data_pipeline.py` once (it called a pipeline function that had been removed) before anyone needs a figure.
`reference_compare.py` needs PyTorch and the published code, neither of which the suite has.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

TOY_ARGS = {
    "data_pipeline": ["--examples", "256", "--shards", "2", "--global-batch", "32", "--batches", "2",
                      "--shuffle-buffer", "64", "--embedding-dim", "16"],
    "embedding": ["--num-prompts", "32", "--batch-size", "16", "--repeats", "1"],
    "evaluation": ["--num", "16", "--workers", "1", "--n-boot", "20"],
    "forward": ["--batch-sizes", "1", "--repeats", "1"],
    "metrics": ["--num", "500"],
    "models_vae_clip": ["--batch", "2", "--repeats", "1"],
    # The demo's model sizes: compiling the published U-Net's and VAE's gradients alone took minutes.
    "posterior": ["--batch", "1", "--particles", "2", "--steps", "1", "2", "--repeats", "1", "--size", "demo"],
    "prepare": ["--records", "40", "--workers", "1"],
    # Two of its 13 columns (both default samplers, one per kind of noise-level grid): each (row, column) compiles a
    # chain of its own, and all 13 took 35 s of the suite (tests/test_diffusion_sampler_validation.py checks the
    # defaults' quality itself).
    "sampler_quality": ["--samples", "16", "--columns",
                        "ddim-50 data_std o2 (default),dpmpp_2m-20 logsnr o2 (default)"],
    "sampling": ["--batches", "1", "--samplers", "dpmpp_2m-20", "--repeats", "1", "--skip-guidance", "--size", "demo"],
    "train": ["--models", "vae", "--batch", "2", "--steps", "1"],
    "vae_ceiling": ["--batch", "1", "--repeats", "1"],
}


def test_every_benchmark_is_listed():
    scripts = {path.stem for path in (REPO / "benchmarks").glob("*.py")}
    # machine.py is the shared "measured on what" record, model_sizes.py the shared --size; the reference pair
    # needs PyTorch.
    helpers = {"machine", "model_sizes", "reference_compare", "reference_worker"}
    assert scripts - helpers == set(TOY_ARGS), "add a toy-sized run of each new benchmark to TOY_ARGS"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TOY_ARGS))
def test_a_benchmark_runs_and_prints_one_json_object(name, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *TOY_ARGS[name]], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout: one object and nothing else
    assert isinstance(result, dict) and result, proc.stdout[:500]
    # A figure is only comparable on the same machine under the same load: each says what it was measured on.
    machine = result["machine"]
    assert {"date_utc", "cpu", "cpu_cores", "load_average", "jax", "backend", "device_kind"} <= set(machine)
    assert machine["backend"] == "cpu" and machine["cpu_cores"] == os.cpu_count()
    assert "load_average_after" in result


@pytest.mark.slow
def test_reference_compare_counts_the_published_arithmetic(monkeypatch):
    """`reference_compare.py` needs PyTorch to run; its operation counts do not. The published side is counted on
    our program doing their arithmetic: more operations wherever ours does less (Winograd decoder convolutions,
    the cross-attention as a bias), the same for a plain matmul (2 N^3)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import reference_compare as rc

    def counts(measure, batch):
        function, args = rc.program(measure, batch)
        ours = rc.flops_of(function.lower(*args)) / 1e9
        return ours, rc.published_gflop(measure, batch, ours)

    assert counts("matmul", 64) == (2 * 64**3 / 1e9, 2 * 64**3 / 1e9)
    ours, published = counts("vae_decode", 16)  # 512 tiles of the 512-channel levels: Winograd's case
    assert published > 1.4 * ours
    ours, published = counts("unet_forward", 1)
    assert published > ours


def test_train_refuses_a_step_larger_than_memory_in_one_line(monkeypatch):
    """The configs' global batches are sized for accelerators (the VAE's 256 needs about 34 GB on a CPU):
    `train.py` says so in one line, with what to pass, instead of XLA's out-of-memory traceback."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import train

    limit, what, sharing = train.memory_limit()
    assert limit > 0 and what == "this host's available memory"  # the suite's CPU backend reports no limit
    assert sharing == len(jax.local_devices())  # the suite's simulated devices share the host
    assert train.too_large("vae", 16, limit // 2, limit, what, 1) is None
    # Simulated CPU devices share the host: each one's program counts.
    line = train.too_large("vae", 256, limit // 2, limit, what, 4)
    assert line is not None and "\n" not in line
    assert "vae step at global batch 256" in line and "--batch vae=16" in line
    assert train.too_large("vae", 16, None, limit, what, 1) is None  # no memory analysis: run it
