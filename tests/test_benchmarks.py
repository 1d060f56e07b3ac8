"""Every benchmark still runs, at toy sizes, and prints exactly one JSON object on stdout; a bad flag is one line.

Benchmarks are not timed here (speed goals live in the benchmarks themselves); this catches the drift that
broke `data_pipeline.py` once (it called a pipeline function that had been removed) before anyone needs a figure.
`reference_compare.py` needs PyTorch and the published code, neither of which the suite has.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
# Not benchmarks: machine.py is the shared "measured on what" record, model_sizes.py the shared --size,
# arguments.py the shared argument parsing.
HELPERS = {"machine", "model_sizes", "arguments"}

TOY_ARGS = {
    "corpus_writing": ["--examples", "16", "--embedding-dim", "16", "--repeats", "1"],
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
    # On two devices (TOY_DEVICES): batch 1 cannot be sharded over them, and the report must say it left it out.
    "sampling": ["--batches", "1,2", "--samplers", "dpmpp_2m-20", "--repeats", "1", "--skip-guidance", "--size",
                 "demo"],
    "train": ["--models", "vae", "--batch", "2", "--steps", "1"],
    "vae_ceiling": ["--batch", "1", "--repeats", "1"],
}
TOY_DEVICES = {"sampling": 2}  # simulated CPU devices where a toy run needs more than one


# A bad count for every benchmark, and the other checks scripts make of their flags: (script, arguments, the flag).
BAD_ARGS = [
    ("corpus_writing", ["--examples", "0"], "--examples"),
    ("data_pipeline", ["--global-batch", "0"], "--global-batch"),
    ("data_pipeline", ["--examples", "20", "--shards", "16"], "--shards"),  # shards 10-15 would get no records
    ("embedding", ["--batch-size", "0"], "--batch-size"),
    ("evaluation", ["--num", "0"], "--num"),
    ("evaluation", ["--workers", "-1"], "--workers"),  # 0 is allowed: measure in this process
    ("forward", ["--repeats", "0"], "--repeats"),
    ("forward", ["--batch-sizes", "1", "0"], "--batch-sizes"),
    ("metrics", ["--row-block", "0"], "--row-block"),
    ("metrics", ["--num", "3"], "--num"),  # precision/recall's k = 3 neighbours need 4 vectors
    ("models_vae_clip", ["--repeats", "0"], "--repeats"),
    ("posterior", ["--particles", "0"], "--particles"),
    ("posterior", ["--steps", "2", "2"], "--steps"),  # the per-step time is a difference over the two lengths
    ("prepare", ["--records", "0"], "--records"),
    ("prepare", ["--workers", "0"], "--workers"),
    ("reference_compare", ["--reference-repo", ".", "--torch-python", "python", "--repeats", "0"], "--repeats"),
    ("reference_worker", ["--reference-repo", ".", "--threads", "0"], "--threads"),
    ("sampler_quality", ["--samples", "0"], "--samples"),
    ("sampler_quality", ["--columns", "ddim-50"], "--columns"),
    ("sampling", ["--batches", "abc"], "--batches"),
    ("sampling", ["--batches", "-4"], "--batches"),
    ("sampling", ["--batches", "1,0"], "--batches"),
    ("sampling", ["--repeats", "0"], "--repeats"),
    ("sampling", ["--guidance-scale", "nan"], "--guidance-scale"),
    ("train", ["--steps", "0"], "--steps"),
    ("train", ["--batch", "vae=0"], "--batch"),
    ("vae_ceiling", ["--batch", "0"], "--batch"),
]
# What a bad flag must not wait for: each of these takes seconds to import, and compiling starts after.
HEAVY_MODULES = ("jax", "tensorflow", "flax", "torch")


def benchmark_env(tmp_path: Path, pythonpath: str = str(REPO)) -> dict[str, str]:
    """The environment every benchmark subprocess runs in: this checkout importable, JAX on one CPU device, no
    TensorFlow C++ log lines on stderr, temporary files under the test's own folder."""
    return dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS="--xla_force_host_platform_device_count=1", TMPDIR=str(tmp_path))


def test_every_benchmark_is_listed():
    scripts = {path.stem for path in (REPO / "benchmarks").glob("*.py")}
    # The reference pair needs PyTorch.
    assert scripts - HELPERS - {"reference_compare", "reference_worker"} == set(TOY_ARGS), (
        "add a toy-sized run of each new benchmark to TOY_ARGS")
    assert scripts - HELPERS == {name for name, _, _ in BAD_ARGS}, "add a bad count of each new benchmark to BAD_ARGS"


@pytest.mark.parametrize(("name", "args", "flag"), BAD_ARGS, ids=[f"{n} {' '.join(a)}" for n, a, _ in BAD_ARGS])
def test_a_bad_flag_is_one_line_before_jax_is_imported(name, args, flag, tmp_path):
    """A bad count is refused as every bad input is: one line on stderr naming the flag, exit code 2, nothing on
    stdout, no traceback, and before anything slow: JAX, TensorFlow, Flax and PyTorch are replaced by modules
    that stop the process (exit 1, their own line) if a script imports them before checking its flags."""
    poisoned = tmp_path / "poisoned"
    for module in HEAVY_MODULES:
        (poisoned / module).mkdir(parents=True)
        (poisoned / module / "__init__.py").write_text(
            f"raise SystemExit('{module} was imported before the flags were checked')\n")
    env = benchmark_env(tmp_path, os.pathsep.join([str(poisoned), str(REPO)]))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr[-3000:]
    assert lines[0].startswith(f"{name}.py: error: ") and flag in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("name", "args", "expected"), [
    ("train", ["--models", "vae", "--batch", "2", "--fsdp", "3"], "--fsdp 3 does not divide the 2 devices"),
    ("posterior", ["--batch", "3"], "--batch 3 is not a multiple of the 2 devices"),
])
def test_a_flag_the_devices_cannot_take_is_one_line(name, args, expected, tmp_path):
    """Known wrong only once JAX counts the devices, but still before anything compiles: one line, exit 2 (these
    were tracebacks from the mesh and the batch sharding)."""
    env = benchmark_env(tmp_path)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}.py: error: {expected}"), proc.stderr[-3000:]


def test_counts_are_whole_numbers_of_at_least_one(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import arguments

    assert arguments.count("1") == 1 and arguments.count("128") == 128
    assert arguments.counts("1,16,128") == [1, 16, 128] and arguments.counts("4") == [4]
    assert arguments.non_negative("0") == 0 and arguments.non_negative("2") == 2
    for bad in ("0", "-1", "abc", "1.5", "", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a whole number >= 1, got {bad!r}"):
            arguments.count(bad)
    for bad in ("", "0", "1,0", "1,,16", "1,16,", "-4", "abc", "1;16"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated whole numbers >= 1"):
            arguments.counts(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number >= 0, got '-1'"):
        arguments.non_negative("-1")
    # argparse's own errors are one line too, without the usage block.
    parser = arguments.parser("a benchmark")
    parser.add_argument("--repeats", type=arguments.count)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--repeats", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(": error: argument --repeats: expected a whole number >= 1, got '0'\n")
    for argv in (["--repeats"], ["--unknown"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error: " in err and "usage" not in err


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TOY_ARGS))
def test_a_benchmark_runs_and_prints_one_json_object(name, tmp_path):
    env = benchmark_env(tmp_path)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={TOY_DEVICES.get(name, 1)}"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *TOY_ARGS[name]],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout: one object and nothing else
    assert isinstance(result, dict) and result, proc.stdout[:500]
    if name == "sampling":
        assert result["batches_not_divisible_by_the_devices"] == [1]
        assert [point["batch"] for point in result["samplers"]["dpmpp_2m-20"]] == [2]
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
