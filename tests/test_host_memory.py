"""`host_memory.keep_freed_memory`: a CPU program's large buffers stop being mapped afresh on every call.

Each check runs in a child process: the settings are process-wide (glibc's allocator, JAX's CPU client) and must
come before JAX starts, so the test process itself is never changed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusets_jax import host_memory

REPO = Path(__file__).resolve().parents[1]

# Minor page faults of each of 8 calls of a program whose result is a fresh 64 MiB array (16,384 pages of 4 KiB),
# after five warm-up calls (the heap settles within them). `keep` asks for the settings first, `train` goes
# through the train command (whose config does not exist: it still exits 2, after making them).
CHILD = """
import json, resource, sys
from diffusets_jax import cli, host_memory
applied = None
if sys.argv[1] == "keep":
    applied = host_memory.keep_freed_memory()
elif sys.argv[1] == "train":
    applied = cli.main(["train", "vae", "--config", sys.argv[2] + "/none.py", "--workdir", sys.argv[2] + "/w"])
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024), jnp.float32)
affine = jax.jit(lambda x: x * 1.5 + 0.25)
faults = []
for call in range(13):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    affine(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults[5:]}))
"""
PAGES = 16 * 1024 * 1024 * 4 // 4096

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def run_child(*args: str, **env: str) -> dict:
    # One device: a program split over several runs on JAX's own threads, which the settings do not reach.
    environ = {k: v for k, v in os.environ.items() if k != host_memory.TUNABLES_VARIABLE}
    environ.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="", **env)
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=environ, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def reused(faults: list[int]) -> bool:
    """Whether the result's pages were reused on nearly every call. Another thread's small allocation can take a
    piece of the freed block now and then (under the suite's load: one call in four once), so one or two calls
    may fault it in again."""
    return sum(f < PAGES * 0.01 for f in faults) >= len(faults) - 2


def test_the_result_buffer_is_reused_instead_of_faulted_in_again():
    plain = run_child("plain")
    # The premise: without the settings every call maps and faults in its 64 MiB result again.
    assert min(plain["faults"]) >= PAGES * 0.9, plain
    kept = run_child("keep")
    assert kept["applied"] is True
    assert reused(kept["faults"]), kept


def test_a_user_who_tunes_glibc_malloc_keeps_their_settings():
    kept = run_child("keep", **{host_memory.TUNABLES_VARIABLE: "glibc.malloc.tcache_count=7"})
    assert kept["applied"] is False
    assert min(kept["faults"]) >= PAGES * 0.9, kept


def test_the_train_command_asks_for_it_in_its_own_process(tmp_path):
    trained = run_child("train", str(tmp_path))
    assert trained["applied"] == 2  # the missing config, reported after the settings were made
    assert reused(trained["faults"]), trained


def test_the_train_command_leaves_a_caller_that_imported_jax_alone(tmp_path, monkeypatch):
    import jax  # noqa: F401  (the suite has imported it already: a script or notebook calling `main`)

    from diffusets_jax import cli

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda *a, **k: calls.append(a))
    assert cli.main(["train", "vae", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert calls == []
