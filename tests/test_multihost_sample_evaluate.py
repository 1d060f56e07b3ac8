"""`sample` and `evaluate` on two hosts (two local processes x 4 CPU devices, gloo): each process takes its share
of the batches and writes its own part; one manifest / one report at the end; the ECGs are the one-host ECGs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusets_jax.cli import main
from tests.helpers.fake_openai_server import fake_openai_env
from tests.helpers.tiny_models import TEXT_DIM, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_two_processes(argv: list[str], extra_env: dict[str, str], check: bool = True,
                      file_size_limits: tuple[int | None, int | None] = (None, None),
                      devices: int = 4, extra_argv: tuple[list[str], list[str]] = ([], []),
                      timeout: float = 900) -> list[tuple[int, str]]:
    """`diffusets-jax ARGV` as processes 0 and 1 of a two-host run of `devices` CPU devices each: each one's (exit
    code, output). A process still running after `timeout` s (waiting at a collective for one that stopped) is killed
    and fails the test. `file_size_limits`: the largest file (kB) each process may write, as on a host whose disk is
    full; `extra_argv`: arguments only one process gets."""
    port = _free_port()
    procs = []
    for process_id in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(extra_env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id),
                   PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
        limit = file_size_limits[process_id]
        prefix = [] if limit is None else ["bash", "-c", f'ulimit -f {limit} && exec "$@"', "bash"]
        procs.append(subprocess.Popen([*prefix, sys.executable, "-m", "diffusets_jax", *argv,
                                       *extra_argv[process_id]], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 or not check, output[-4000:]
    return [(proc.returncode, output) for proc, output in zip(procs, outputs, strict=True)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_hosts_sample_their_share_and_write_one_manifest(tmp_path):
    models = tiny_model_dir(tmp_path / "models")
    common = ["sample", "--model-dir", str(models), "--text", "Sinus rhythm|Normal ECG", "--sex", "F", "--age", "50",
              "--hr", "70", "-n", "20", "--steps", "2", "--sampler", "ddim", "--batch-size", "8", "--formats", "npz,wfdb"]
    with fake_openai_env(TEXT_DIM) as server:
        run_two_processes([*common, "--out", str(tmp_path / "two")],
                          {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url})
        assert len(server.received) == 1  # process 0 embedded the prompt once and shared it
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["count"] == 20 and manifest["processes"] == 2 and not manifest["skipped"]
    # One disk shared by both hosts (as here): process 0 merged every host's batches into one NPZ.
    assert manifest["npz"] == ["samples.npz"]
    with np.load(tmp_path / "two" / "samples.npz") as two, np.load(tmp_path / "one" / "samples.npz") as one:
        assert two["position"].tolist() == list(range(20))
        # Batch b's noise does not depend on the host: a host-dependent draw would differ by the signal itself
        # (~0.5 mV). Two hosts x 4 devices hold 2 ECGs per device where one host x 8 holds 1, and XLA:CPU's
        # kernels for the two shapes sum in different orders: up to ~1e-3 mV on a few samples after decoding.
        np.testing.assert_allclose(two["ecg"], one["ecg"], atol=5e-3)
    assert len(list((tmp_path / "two" / "wfdb").glob("*.hea"))) == 20
    # A corpus: the shards are dealt to the hosts, and process 0 gives TFDS every shard's length from the counts
    # each host wrote beside its shards.
    import tensorflow_datasets as tfds

    corpus = [a for a in common if a not in ("--formats", "npz,wfdb")] + ["--corpus", "--shard-size", "8"]
    with fake_openai_env(TEXT_DIM) as server:
        run_two_processes([*corpus, "--out", str(tmp_path / "corpus")],
                          {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url})
    builder = tfds.builder_from_directory(str(tmp_path / "corpus"))
    assert builder.info.splits["train"].shard_lengths == [8, 8, 4]
    assert sorted(int(e["study_id"]) for e in tfds.as_numpy(builder.as_dataset(split="train"))) == list(range(20))
    assert sorted(p.name for p in (tmp_path / "corpus" / ".shard-counts").iterdir()) == [
        f"shard-{s:05d}.json" for s in range(3)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_request_refused_on_process_zero_stops_both_hosts_with_one_line(tmp_path):
    # Only process 0 asks the server for the prompts' embeddings. Before, its refusal ended process 0 alone, and
    # process 1 waited for the embeddings until the coordination service killed it minutes later.
    from tests.helpers.fake_openai_server import FakeOpenAIServer

    models = tiny_model_dir(tmp_path / "models")
    argv = ["sample", "--model-dir", str(models), "--text", "Sinus rhythm", "--sex", "F", "--age", "50", "--hr", "70",
            "-n", "4", "--steps", "2", "--sampler", "ddim", "--batch-size", "2", "--formats", "npz",
            "--out", str(tmp_path / "out")]
    with FakeOpenAIServer(dim=TEXT_DIM, faults=["401"]) as server:
        results = run_two_processes(argv, {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url},
                                    check=False)
    for code, output in results:
        assert code == 2, output[-4000:]
        lines = [line for line in output.splitlines() if "error:" in line]
        assert len(lines) == 1 and "server rejected the request (401" in lines[0], output[-4000:]
        assert "Traceback" not in output
    assert "process 0 of 2 stopped: " in results[1][1]
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_host_refused_before_joining_stops_the_others_with_its_line(tmp_path):
    """A bad input on one host only (a path, a flag) is refused before that host joins the run: the others waited for
    it in JAX's start-up for 309 s, then aborted with a C++ stack trace (exit 134)."""
    import time

    models = tiny_model_dir(tmp_path / "models")
    argv = ["sample", "--model-dir", str(models), "--text", "Sinus rhythm", "--sex", "F", "--age", "50", "--hr", "70",
            "-n", "4", "--steps", "2", "--sampler", "ddim", "--batch-size", "2", "--out", str(tmp_path / "out")]
    env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}  # neither gets that far
    # Refused by argparse on process 1, by the command's own checks on process 0 (the coordinator).
    for refused, extra in ((1, ["--formats", "npz", "--sampler", "nope"]), (0, ["--formats", "bogus"])):
        extra_argv = (extra, ["--formats", "npz"]) if refused == 0 else (["--formats", "npz"], extra)
        began = time.monotonic()
        results = run_two_processes(argv, env, check=False, extra_argv=extra_argv, timeout=120)
        assert time.monotonic() - began < 90
        (bad_code, bad), (other_code, other) = results[refused], results[1 - refused]
        bad_lines = [line for line in bad.splitlines() if line.strip()]
        assert bad_code == 2 and len(bad_lines) == 1 and "error:" in bad_lines[0], bad[-4000:]
        lines = [line for line in other.splitlines() if "error:" in line]
        assert other_code == 1 and len(lines) == 1 and "Traceback" not in other, other[-4000:]
        assert f"stopped: process {refused} of 2 left the run without finishing (process {refused}: " \
               f"{bad_lines[0]})" in lines[0]
    assert not (tmp_path / "out").exists()


def _tiny_sample(tmp_path, count, outputs):
    """`sample` of `count` ECGs from a new tiny model directory in batches of 8, two DDIM steps."""
    models = tiny_model_dir(tmp_path / "models")
    return ["sample", "--model-dir", str(models), "--text", "Sinus rhythm", "--sex", "F", "--age", "50", "--hr", "70",
            "-n", str(count), "--steps", "2", "--sampler", "ddim", "--batch-size", "8", *outputs]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("outputs", [["--formats", "npz"], ["--corpus", "--shard-size", "8"]])
def test_a_host_whose_disk_is_full_stops_every_host(tmp_path, outputs):
    # Process 1 cannot write its batch or shard (Python gets EFBIG where a full disk gives ENOSPC). Before, it
    # stopped with its line and process 0 waited for it at the next collective until the coordination service
    # killed both.
    argv = [*_tiny_sample(tmp_path, 16, outputs), "--out", str(tmp_path / "out")]
    # A batch or shard each, of 8 ECGs: about 400 kB. The batch size of the two-host test above: process 0 finds
    # that chain in the session's compilation cache (process 1 compiles its own either way).
    with fake_openai_env(TEXT_DIM) as server:
        results = run_two_processes(argv, {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url},
                                    check=False, file_size_limits=(None, 100))
    for code, output in results:
        assert code == 2, output[-4000:]
        lines = [line for line in output.splitlines() if "error:" in line]
        assert len(lines) == 1 and "File too large" in lines[0], output[-4000:]
    assert "process 1 of 2 stopped: " in results[0][1]
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "dataset_info.json").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("outputs", [["--formats", "npz"], ["--corpus", "--shard-size", "8"]])
def test_hosts_on_disks_of_their_own_resume_without_regenerating(tmp_path, outputs):
    # Each host's --out on a disk of its own (a folder each here), run twice, as after a crash. Only process 0 had a
    # run record, so process 1 refused its own outputs as a user's folder; a corpus regenerated every shard that
    # any one host lacked (each lacks the others'); and a finished sample run had no manifest on process 1.
    argv = _tiny_sample(tmp_path, 32, outputs)
    outs = ([f"--out={tmp_path / 'host0'}"], [f"--out={tmp_path / 'host1'}"])
    with fake_openai_env(TEXT_DIM) as server:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url}
        first = run_two_processes(argv, env, extra_argv=outs)
        written = {p: p.stat().st_mtime_ns for p in tmp_path.glob("host*/**/*")
                   if p.suffix in (".npz", ".dat") or ".tfrecord" in p.name}  # the ECGs (a corpus's metadata is new)
        again = run_two_processes(argv, env, extra_argv=outs)
    summaries = [[json.loads(line) for line in out.splitlines() if line.startswith("{")][-1] for _, out in again]
    for (_, output), summary in zip(first, summaries, strict=True):
        assert summary.get("examples", summary.get("count")) == 32, output[-3000:]
        assert summary.get("written", 0) == 0, summary
    if "--corpus" in outputs:  # every shard on one host or the other, none written twice
        names = [sorted(p.name for p in (tmp_path / f"host{i}").glob("*.tfrecord*")) for i in range(2)]
        assert not set(names[0]) & set(names[1]) and len(names[0]) + len(names[1]) == 4, names
    assert {p: p.stat().st_mtime_ns for p in written} == written  # nothing rewritten


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_hosts_evaluate_and_process_zero_writes_one_report(tmp_path):
    import jax

    from diffusets_jax.models import model_dir as model_dirs
    from diffusets_jax.models.clip import CLIP
    from diffusets_jax.parallel import jit_run_once
    from tests.helpers import tiny_ecg_dataset

    builder = tiny_ecg_dataset.build(str(tmp_path / "tfds"))
    models = tiny_model_dir(tmp_path / "models", text_dim=tiny_ecg_dataset.EMBEDDING_DIM)
    clip = CLIP(base_filters=8, filters=(8,), blocks_per_stage=(1,), group_width=8, kernel_size=4,
                text_dim=tiny_ecg_dataset.EMBEDDING_DIM, text_hidden_dim=16, embed_dim=8)
    variables = jit_run_once(lambda k: clip.init(k, np.zeros((2, 1024, 12), np.float32),
                                                 np.zeros((2, tiny_ecg_dataset.EMBEDDING_DIM), np.float32)),
                             jax.random.PRNGKey(0))
    model_dirs.write_component(models, "clip", clip, variables, provenance={"source": "test"})
    argv = ["evaluate", "--model-dir", str(models), "--dataset", builder.data_dir, "--split", "validation",
            "--sampler", "ddim", "--steps", "2", "--batch-size", "8"]
    run_two_processes([*argv, "--out", str(tmp_path / "two")], {})
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert two["signal_level"]["n_real"] == one["signal_level"]["n_real"] == 13
    assert two["signal_level"]["fid"] == pytest.approx(one["signal_level"]["fid"], rel=1e-4, abs=1e-6)
    assert two["diagnostic_level"]["clip_score_generated"] == pytest.approx(
        one["diagnostic_level"]["clip_score_generated"], rel=1e-4)
    # The report's real/generated pairs are the first rows, whichever host generated them: at one device and two
    # ECGs a batch per host, rows 2-3 are process 1's, and process 0 drew only its own two pairs.
    argv[argv.index("--batch-size") + 1] = "2"
    run_two_processes([*argv, "--out", str(tmp_path / "small")], {}, devices=1)
    assert json.loads((tmp_path / "small" / "report.json").read_text())["figures"]["pairs"] == one["figures"]["pairs"]
    assert len(one["figures"]["pairs"]) == 4
