import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from diffusets_jax import parallel


def test_resolve_mesh_shape_fills_minus_one_and_rejects_mismatch():
    assert parallel.resolve_mesh_shape(-1, 1, 8) == (8, 1)
    assert parallel.resolve_mesh_shape(2, -1, 8) == (2, 4)
    assert parallel.resolve_mesh_shape(4, 2, 8) == (4, 2)
    with pytest.raises(ValueError, match="devices"):
        parallel.resolve_mesh_shape(3, 1, 8)
    with pytest.raises(ValueError, match="at most one"):
        parallel.resolve_mesh_shape(-1, -1, 8)
    # Naming the sizes given and what to do: "8 devices are not divisible by the fixed axis size 3" said neither.
    with pytest.raises(ValueError, match=r"not divisible by the fixed axis size 3 \(data=-1, fsdp=3\): give that "
                                         r"axis a size that divides 8 \(--config.mesh.data, --config.mesh.fsdp\)"):
        parallel.resolve_mesh_shape(-1, 3, 8)


def test_make_mesh_axes():
    mesh = parallel.make_mesh(data=2, fsdp=-1)
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert parallel.num_batch_shards(mesh) == 8


def test_fsdp_partition_spec_picks_largest_divisible_dimension():
    assert parallel.fsdp_partition_spec((512, 1536), 4, min_size=1) == PartitionSpec(None, "fsdp")
    assert parallel.fsdp_partition_spec((1536, 6), 4, min_size=1) == PartitionSpec("fsdp", None)
    # Largest dimension not divisible -> the next largest that is.
    assert parallel.fsdp_partition_spec((7, 3, 1026, 12), 4, min_size=1) == PartitionSpec(None, None, None, "fsdp")
    assert parallel.fsdp_partition_spec((7, 9), 4, min_size=1) == PartitionSpec()
    assert parallel.fsdp_partition_spec((512, 512), 1, min_size=1) == PartitionSpec()
    assert parallel.fsdp_partition_spec((64,), 4) == PartitionSpec()  # small: replicated
    assert parallel.fsdp_partition_spec((), 4, min_size=0) == PartitionSpec()


def test_state_shardings_actually_shard_parameters():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    params = {"kernel": jnp.ones((256, 1024)), "bias": jnp.ones((1024,)), "odd": jnp.ones((4099, 3))}
    shardings = parallel.state_shardings(params, mesh)
    placed = jax.device_put(params, shardings)
    kernel = placed["kernel"]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp")
    # Each device holds a quarter of the columns: sharded over fsdp, replicated over data.
    assert {s.data.shape for s in kernel.addressable_shards} == {(256, 256)}
    assert placed["bias"].sharding.spec == PartitionSpec()
    assert placed["odd"].sharding.spec == PartitionSpec()  # 4099 and 3 are not divisible by 4
    np.testing.assert_array_equal(np.asarray(kernel), np.ones((256, 1024)))


def test_replicated_when_fsdp_is_one():
    mesh = parallel.make_mesh(data=-1, fsdp=1)
    shardings = parallel.state_shardings({"w": jnp.ones((1024, 1024))}, mesh)
    assert shardings["w"].spec == PartitionSpec()


def test_shard_host_batch_splits_batch_over_all_devices():
    mesh = parallel.make_mesh(data=4, fsdp=2)
    batch = parallel.shard_host_batch({"ecg": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}, mesh)
    ecg = batch["ecg"]
    assert ecg.shape == (16, 3)
    assert {s.data.shape for s in ecg.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(ecg), np.arange(48).reshape(16, 3))


def test_initialize_distributed_is_a_noop_on_one_host():
    assert parallel.initialize_distributed({}) is False
    assert parallel.initialize_distributed({"JAX_NUM_PROCESSES": "1"}) is False
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        parallel.initialize_distributed({"JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="DIFFUSETS_HEARTBEAT_TIMEOUT_S='soon' is not a whole number"):
        parallel.initialize_distributed({"JAX_NUM_PROCESSES": "2", "DIFFUSETS_HEARTBEAT_TIMEOUT_S": "soon"})

    with pytest.raises(ValueError, match="DIFFUSETS_WATCH_HOSTS='no' is neither 1"):
        parallel.initialize_distributed({"JAX_NUM_PROCESSES": "2", "DIFFUSETS_WATCH_HOSTS": "no"})


@pytest.mark.parametrize(("watch", "heartbeat", "expected"), [
    (None, None, (True, parallel.HEARTBEAT_TIMEOUT_S)),
    ("0", None, (False, parallel.JAX_HEARTBEAT_TIMEOUT_S)),
    ("0", "45", (False, 45)),
])
def test_initialize_distributed_watch_is_on_by_default_and_can_be_turned_off(monkeypatch, watch, heartbeat,
                                                                              expected):
    # What JAX is asked for, without starting a runtime: recoverability, the heartbeat timeout and the watch go
    # together, and DIFFUSETS_WATCH_HOSTS=0 gives JAX's own handling back.
    calls = {}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.update(kw))
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.update({name: value}))
    monkeypatch.setattr(parallel._RunWatch, "start", classmethod(lambda cls, t: calls.update(watched=t)))
    env = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}
    env |= {k: v for k, v in [("DIFFUSETS_WATCH_HOSTS", watch), ("DIFFUSETS_HEARTBEAT_TIMEOUT_S", heartbeat)] if v}
    assert parallel.initialize_distributed(env) is True
    recoverable, timeout = expected
    assert calls["jax_enable_recoverability"] is recoverable
    assert calls["heartbeat_timeout_seconds"] == timeout
    assert ("watched" in calls) is recoverable


@pytest.mark.parametrize(("env", "message"), [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not a whole number: set it to the number of hosts"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "first"},
     "JAX_PROCESS_ID='first' is not a whole number: set it to this host's own number, 0 to 1"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID=2 is outside 0 to 1 \(JAX_NUM_PROCESSES=2\)"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID=-1 is outside 0 to 1"),
])
def test_a_malformed_host_variable_is_refused_naming_it(env, message):
    """Python's "invalid literal for int() with base 10: 'two'" named neither the variable nor what it holds; a
    process id beyond the run reached JAX, whose message names neither the variable."""
    with pytest.raises(ValueError, match=message):
        parallel.initialize_distributed({**env, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
    assert not jax.distributed.is_initialized()


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_process_leaving_the_run_stops_the_others_in_one_line(how):
    """A process that stops outside `failing_together` (an uncaught exception, a SIGKILL) while process 0 waits at a
    collective that never returns: process 0 stops within seconds (heartbeat timeout 3 s), in one line naming it,
    with exit code 1. It waited 100-300 s for JAX's coordination service, then aborted with a C++ stack trace."""
    from tests.helpers.two_processes import run_workers

    (code, output, seconds), _ = run_workers("lost_process_two_process_worker.py", lambda i: [how], timeout=90)
    lines = [line for line in output.splitlines() if "error" in line]
    assert code == 1, output[-3000:]
    assert lines == ["diffusets-jax: error: process 0 of 2 stopped: process 1 of 2 left the run without finishing (it "
                     "failed, was killed or lost its network: its own log says why); fix that and start the same "
                     "command again on every host, which resumes the run"], output[-3000:]
    assert "Traceback" not in output and seconds < 90


@pytest.mark.multiprocess
def test_a_process_finishing_first_waits_for_the_others():
    """Process 0 (which holds JAX's coordination service) finishes 6 s, twice the heartbeat timeout, before process
    1: both still exit 0, and process 1 is not taken for lost while it writes its own results."""
    from tests.helpers.two_processes import run_worker_pair

    outputs = run_worker_pair("lost_process_two_process_worker.py", lambda i: ["finish"], timeout=90)
    assert [output.splitlines()[-1] for output in outputs] == ["process 0 finished", "process 1 finished"]


def test_an_error_met_while_the_watch_stops_the_process_adds_no_line(monkeypatch, capsys):
    """Another host left; this one's watch printed the line and is leaving the run, which cancels the collective the
    main thread waits in. A model restore then failed with "cannot be read ... the folder is damaged": a second,
    wrong line (seen in a fresh-clone run of the refused-before-joining two-host test, 2026-12-07)."""
    import argparse
    import threading
    from types import SimpleNamespace

    from diffusets_jax import cli

    stopping = threading.Event()
    stopping.set()
    watch = SimpleNamespace(stopping=stopping, thread=threading.Thread(target=lambda: None), patience=0.1)
    watch.thread.start()
    monkeypatch.setattr(parallel._RunWatch, "_current", watch)

    def command(_):
        raise ValueError("model M/vae: its weights cannot be read (UNKNOWN: Gloo context initialization failed: "
                         "CANCELLED); the folder is damaged or incomplete")

    assert cli._run_command(argparse.Namespace(command="sample", func=command, debug=False)) == (cli.EXIT_FAILED, None)
    assert capsys.readouterr().err == ""
    stopping.clear()  # a watch that is not stopping anything: the error is the command's own
    assert cli._run_command(argparse.Namespace(command="sample", func=command, debug=False))[0] == cli.EXIT_BAD_INPUT
    assert "cannot be read" in capsys.readouterr().err


def test_a_refused_host_waits_for_the_others_only_so_long():
    """A host refused its input before joining, and no other host of the run ever starts: it says what it waits for,
    then ends with its own exit code, not at JAX's start-up timeout (300 s) with a C++ stack trace."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there: process 0 never started
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
    script = ("from diffusets_jax import parallel; parallel.JOIN_TO_LEAVE_S = 4; parallel.JOIN_TO_LEAVE_NOTE_S = 1; "
              "parallel.leave_refused_run('sample', 2, 'diffusets-jax sample: error: a bad input'); print('returned')")
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "returned" not in run.stdout, run.stderr[-3000:]
    assert run.stderr.splitlines() == ["diffusets-jax sample: note: waiting up to 3 s more for every host of this "
                                       "multi-host run to start, to tell them this one stopped (Ctrl-C ends it now)"]
    assert time.monotonic() - began < 60
    # With the watch off (JAX's own failure handling), it does not join: a process that joined only to leave would
    # wait at exit for the others.
    run = subprocess.run([sys.executable, "-c", script], env={**env, "DIFFUSETS_WATCH_HOSTS": "0"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "returned" and not run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("mesh_kind", ["auto", "explicit"])
def test_constrain_to_pins_any_rank_to_the_batch_sharding(mesh_kind):
    mesh = parallel.make_mesh(data=4, fsdp=2) if mesh_kind == "auto" else jax.make_mesh((8,), ("data",))
    sharding = parallel.batch_sharding(mesh) if mesh_kind == "auto" else jax.sharding.NamedSharding(
        mesh, PartitionSpec("data"))
    assert parallel.leading_axis_shards(sharding) == 8
    assert parallel.leading_axis_shards(parallel.replicated(mesh)) == 1 and parallel.leading_axis_shards(None) == 1
    constrain = parallel.constrain_to(sharding)
    for shape in ((16,), (16, 3, 128, 4)):
        placed = jax.device_put(jnp.ones(shape), parallel.replicated(mesh))  # inputs live on the mesh, as in use
        out = jax.jit(lambda x, constrain=constrain: constrain(x * 2.0))(placed)
        assert {s.data.shape[0] for s in out.addressable_shards} == {2}
        np.testing.assert_array_equal(np.asarray(out), 2.0)
    assert parallel.constrain_to(None)(jnp.ones(3)) is not None
