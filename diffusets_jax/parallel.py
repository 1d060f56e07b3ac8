"""Device mesh, shardings and multi-host start-up: the one parallelism model (SPMD with `jax.jit`).

A `Mesh` has two axes, `("data", "fsdp")`. The global batch is split over both axes (every device sees a
different slice of examples). Parameters and optimiser state are replicated when `fsdp == 1`; with
`fsdp > 1` each array is split along its largest dimension that the fsdp axis size divides (ZeRO-3 /
FSDP style), and XLA inserts the all-gathers and reduce-scatters. The same code runs on one CPU, a
multi-GPU node or a TPU pod slice.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffusets_jax.batched_threefry import batch_threefry

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device
# Arrays smaller than this stay replicated under fsdp: sharding a bias or a norm scale saves nothing and
# adds a collective per use.
MIN_FSDP_SIZE = 2**12

log = logging.getLogger(__name__)

# How long a process of a multi-host run may go without a heartbeat before the others take it for lost (seconds; the
# environment variable overrides it). Heartbeats come from a thread of JAX's runtime, not from Python or the
# accelerator: a long XLA compile, a slow batch or a busy Python loop does not delay them; a process that is gone
# (crashed, killed, out of host memory), frozen or cut off from the network misses them. JAX's default, 100 s, kept
# every other host waiting that long at its next collective, and then 300 s more at its exit.
HEARTBEAT_TIMEOUT_S = 20
JAX_HEARTBEAT_TIMEOUT_S = 100  # `jax.distributed.initialize`'s own default, kept when the watch is off
HEARTBEAT_TIMEOUT_ENV = "DIFFUSETS_HEARTBEAT_TIMEOUT_S"
# Set to 0 to run with JAX's own failure handling (no recoverability, no watch, JAX's heartbeat default unless the
# variable above is set): the watch relies on JAX's recoverable mode, still marked experimental, and has been run on
# CPU processes only, so a cluster where it misbehaves needs a way back without a new release.
WATCH_ENV = "DIFFUSETS_WATCH_HOSTS"
# How often each process asks the coordination service which processes are still in the run.
WATCH_INTERVAL_S = 1.0
# How long a process that sees another leave on an error waits before stopping itself: a `failing_together` block
# ends on every process at once, each with its own error line and exit code, and the one leaving first must not have
# the others' watches replace theirs (exit 1) while they are still on their way out.
LEAVE_GRACE_S = 5.0
# Each process says under this key prefix how it leaves the run ("finished" or "failed"), before it disconnects:
# the others do not take a finished one for lost while they write their own results, and see a failed process 0
# (which stays connected until they have left: see `_RunWatch`).
LEFT_KEY = "diffusets_jax/left"
# A process that stops on an error line leaves the line under this key prefix first, so the others' lines can say why.
WHY_KEY = "diffusets_jax/why"
# A process that refused its input before joining its multi-host run joins it anyway, only to leave it as failed
# (`leave_refused_run`): otherwise the others wait for it in `jax.distributed.initialize` until JAX's start-up timeout
# and then abort with a C++ stack trace (measured: 309 s, exit 134, two CPU processes, 2026-12-07). It waits at most
# this long for them (JAX's timeout is 300 s; a process still connecting then aborts the same way), and after
# `JOIN_TO_LEAVE_NOTE_S` says what it is waiting for: a host of the run that never started keeps it there.
JOIN_TO_LEAVE_S = 280.0
JOIN_TO_LEAVE_NOTE_S = 10.0
EXIT_BARRIER = "diffusets_jax/exit"
EXIT_BARRIER_TIMEOUT_MS = 24 * 3600 * 1000  # a healthy host may write its results long after the last collective


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Join a multi-host run when the environment describes one; a no-op on a single host.

    Reads `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
    With `JAX_NUM_PROCESSES` > 1 it calls `jax.distributed.initialize` with them; on CPU it first selects
    the gloo collectives so cross-process all-reduces work without MPI. On TPU pods and SLURM clusters,
    where JAX discovers the cluster itself, set `DIFFUSETS_AUTO_DISTRIBUTED=1` instead. Must run before
    any other JAX call. Returns True when a distributed runtime was started.

    Every process then watches the others (`_RunWatch`): when one leaves the run without finishing (it failed, was
    killed, froze), every other one prints one line naming it and exits 1 within about `HEARTBEAT_TIMEOUT_S`
    (`DIFFUSETS_HEARTBEAT_TIMEOUT_S`), instead of waiting at its next collective. A process that finishes waits at
    exit for the others to finish theirs. `DIFFUSETS_WATCH_HOSTS=0` leaves failures to JAX as it ships.
    """
    env = os.environ if env is None else env
    num_processes = _process_variable(env, "JAX_NUM_PROCESSES", "1", "the number of hosts of the run, the same on "
                                      "every host")
    auto = env.get("DIFFUSETS_AUTO_DISTRIBUTED", "0") not in ("", "0", "false", "False")
    if num_processes <= 1 and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    watch = _watch_hosts(env)
    heartbeat_timeout = _heartbeat_timeout(env) if watch or env.get(HEARTBEAT_TIMEOUT_ENV) else JAX_HEARTBEAT_TIMEOUT_S
    coordinator = env.get("JAX_COORDINATOR_ADDRESS")
    if not auto and (not coordinator or "JAX_PROCESS_ID" not in env):
        raise ValueError(
            f"JAX_NUM_PROCESSES={num_processes} but JAX_COORDINATOR_ADDRESS or JAX_PROCESS_ID is not set: "
            "set all three (e.g. JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_PROCESS_ID=0..N-1) on every host"
        )
    process_id = None if auto else _process_variable(env, "JAX_PROCESS_ID", "", f"this host's own number, 0 to "
                                                     f"{num_processes - 1}")
    if process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"JAX_PROCESS_ID={process_id} is outside 0 to {num_processes - 1} (JAX_NUM_PROCESSES="
                         f"{num_processes}): give each host its own number from 0 to {num_processes - 1}")
    if "cpu" in env.get("JAX_PLATFORMS", "").split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Without it, JAX's coordination service itself ends every other process once one stops heartbeating, by a C++
    # abort with a stack trace (exit 134), and a process that stopped on an error first waits up to 300 s at exit
    # for the others; with it, the service only tracks who is live and `_RunWatch` ends the run in one line.
    jax.config.update("jax_enable_recoverability", watch)
    if auto:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
    if watch:
        _RunWatch.start(heartbeat_timeout)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def _process_variable(env: Mapping[str, str], name: str, default: str, meaning: str) -> int:
    """The whole number in the environment variable `name` (`default` when unset), or a ValueError naming it:
    Python's own ("invalid literal for int() with base 10: 'two'") named neither the variable nor what it holds."""
    value = env.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number: set it to {meaning}") from None


def _watch_hosts(env: Mapping[str, str]) -> bool:
    value = env.get(WATCH_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{WATCH_ENV}={value!r} is neither 1 (the default: a host that leaves stops the others in "
                         "seconds) nor 0 (JAX's own failure handling): set one of them")
    return value == "1"


def _heartbeat_timeout(env: Mapping[str, str]) -> int:
    value = env.get(HEARTBEAT_TIMEOUT_ENV, "")
    if not value:
        return HEARTBEAT_TIMEOUT_S
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{HEARTBEAT_TIMEOUT_ENV}={value!r} is not a whole number of seconds >= 1: set it to how "
                         f"long a host may go silent before the others stop (default {HEARTBEAT_TIMEOUT_S})")
    return seconds


class _RunWatch:
    """This process's watch over the others of a multi-host run: a daemon thread that asks JAX's coordination service
    every `WATCH_INTERVAL_S` which processes are live (`get_live_nodes`, which measures their runtime's heartbeats and
    connection, not their progress) and ends this process with one line when one left without finishing.

    At exit, a process that finished says so and waits for the others to finish theirs; one that failed
    (`leave_without_waiting`, or an uncaught exception) says so and leaves at once, which is what stops the others.
    Process 0 holds the coordination service, and a process still connected when it goes aborts (a C++ stack
    trace, exit 134): however it leaves, process 0 goes last, once the others have disconnected."""

    _current: _RunWatch | None = None

    def __init__(self, client: Any, process: int, count: int, heartbeat_timeout: int) -> None:
        from diffusets_jax.cli import EXIT_FAILED  # the run could not finish

        self.client, self.process, self.count, self.exit_code = client, process, count, EXIT_FAILED
        self.everyone = list(range(count))
        # How long to wait for what only the coordination service can end (another process found lost, or gone).
        self.patience = heartbeat_timeout + 10 * WATCH_INTERVAL_S
        self.leaving = threading.Event()
        self.stopping = threading.Event()  # set when this watch ends the process (`_stop`)
        self.failed = False
        self.reason: str | None = None  # the error line this process printed, when it stops on one
        self.thread = threading.Thread(target=self._run, name="diffusets-run-watch", daemon=True)

    @classmethod
    def start(cls, heartbeat_timeout: int) -> None:
        # JAX has no public handle on its client; jax.experimental.multihost_utils reaches it the same way.
        from jax._src import distributed

        watch = cls(distributed.global_state.client, jax.process_index(), jax.process_count(), heartbeat_timeout)
        cls._current = watch
        watch.thread.start()
        # Registered after JAX's own exit hook, so it runs before JAX shuts the distributed runtime down.
        atexit.register(watch._at_exit)

    def _run(self) -> None:
        while not self.leaving.wait(WATCH_INTERVAL_S):
            try:
                # Waits for every live process's watch to ask too, so every process sees the same answer.
                live = self.client.get_live_nodes(self.everyone)
                left = dict(self.client.key_value_dir_get(LEFT_KEY))
            except Exception:  # noqa: BLE001 - the coordination service is gone: process 0 left
                # Unless this process is leaving too and process 0 merely went first, or its script shut JAX's
                # distributed runtime down itself.
                if self.leaving.wait(2.0) or not jax.distributed.is_initialized():
                    return
                self._stop([0], service_gone=True)
            states = {int(key.rsplit("/", 1)[-1]): value for key, value in left.items()}
            gone = [p for p in self.everyone if p != self.process and
                    (states.get(p) == "failed" or (p not in live and states.get(p) != "finished"))]
            if gone and not self.leaving.wait(LEAVE_GRACE_S):
                self._stop(gone)

    def _stop(self, gone: list[int], service_gone: bool = False) -> None:
        self.stopping.set()
        processes = ", ".join(str(p) for p in gone)
        reasons = [] if service_gone else self._reasons(gone)
        why = ("; ".join(reasons) if reasons else
               "it failed, was killed or lost its network: its own log says why")
        print(f"diffusets-jax: error: process {self.process} of {self.count} stopped: process {processes} of "
              f"{self.count} left the run without finishing ({why}); fix that and start the same command again on "
              "every host, which resumes the run", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if not service_gone:
            self._disconnect()
        # The main thread may be blocked in a collective that never returns: nothing short of leaving the process
        # ends it. Files are written under temporary names and renamed, so none is left half-written.
        os._exit(self.exit_code)

    def _reasons(self, gone: list[int]) -> list[str]:
        """The error lines the processes in `gone` left (`WHY_KEY`), each named by its process."""
        reasons = []
        for process in gone:
            with contextlib.suppress(Exception):  # none left: killed, frozen, or failed without a line
                reasons.append(f"process {process}: {self.client.key_value_try_get(f'{WHY_KEY}/{process}')}")
        return reasons

    def _disconnect(self) -> None:
        """Leave the coordination service in order (at most `patience` s): process 0, whose service it is, once every
        other process has disconnected; the others at once."""
        if self.process == 0:
            def others_gone() -> None:
                # Each call also answers the others' watches; it returns once every live process has asked.
                while set(self.client.get_live_nodes(self.everyone)) - {0}:
                    threading.Event().wait(WATCH_INTERVAL_S)

            waiting = threading.Thread(target=others_gone, daemon=True)
        else:
            waiting = threading.Thread(target=self.client.shutdown, daemon=True)
        waiting.start()
        waiting.join(self.patience)

    def _say(self, state: str) -> None:
        self.client.key_value_set(f"{LEFT_KEY}/{self.process}", state)

    def _at_exit(self) -> None:
        if not jax.distributed.is_initialized():  # its script shut JAX's distributed runtime down itself
            self.leaving.set()
            return
        if self.failed or getattr(sys, "last_value", None) is not None:
            self.leaving.set()
            self.thread.join(self.patience)
            with contextlib.suppress(Exception):
                if self.reason:  # before "failed": a process that sees this one failed finds why at once
                    self.client.key_value_set(f"{WHY_KEY}/{self.process}", self.reason)
                self._say("failed")
            if self.process == 0:
                with contextlib.suppress(Exception):
                    self._disconnect()
            return
        try:
            self._say("finished")
            self.client.wait_at_barrier(EXIT_BARRIER, EXIT_BARRIER_TIMEOUT_MS)
        except Exception:  # noqa: BLE001 - another process left without finishing: the watch says which and exits
            self.leaving.wait(self.patience)
            return
        self.leaving.set()
        self.thread.join(self.patience)
        if self.process == 0:
            self._disconnect()


def leave_without_waiting(reason: str | None = None) -> None:
    """This process stops on an error: at exit it leaves the multi-host run at once instead of waiting for the others
    to finish, so they see it gone and stop with one line, which quotes `reason` (the error line this process
    printed) when given (a no-op on one host). The CLI calls it for every run that ends with a non-zero exit code."""
    watch = _RunWatch._current
    if watch is not None:
        watch.failed = True
        watch.reason = reason
        watch.leaving.set()


def stopped_by_watch() -> bool:
    """Whether this process's watch is ending it (another process left the run; the watch printed the line that
    says so). Then an error the main thread meets is the watch cancelling its collectives as it leaves the run (seen
    as "Gloo context initialization failed: CANCELLED" inside a model restore, which read as a damaged model): it
    must print nothing. Waits for the watch to end the process (at most its patience) before returning True."""
    watch = _RunWatch._current
    if watch is None or not watch.stopping.is_set():
        return False
    watch.thread.join(watch.patience)
    return True


def leave_refused_run(command: str, exit_code: int, reason: str | None = None,
                      env: Mapping[str, str] | None = None) -> None:
    """This process of a multi-host run stops on an error (`reason`, the line it printed): leave the run as failed
    (`leave_without_waiting`), joining it first if it had not, so the other hosts stop in seconds with a line that
    says why instead of waiting for it (see `JOIN_TO_LEAVE_S`). A no-op when the environment describes no
    multi-host run, or with the watch off (`DIFFUSETS_WATCH_HOSTS=0`: JAX's own handling, where a process that joined
    only to leave would wait at exit for the others). Joining waits for every host of the run to start its command; if
    one has not after `JOIN_TO_LEAVE_S`, this process ends at once with `exit_code` (the others then meet JAX's own
    timeout)."""
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():  # joined (or JAX itself ends a connection that failed)
        leave_without_waiting(reason)
        return
    try:
        if not _watch_hosts(env):
            return
    except ValueError:  # the refusal may be about that very variable
        return
    joined = threading.Event()

    def join() -> None:
        with contextlib.suppress(Exception):  # e.g. the very variables the refusal was about: nothing to tell
            if initialize_distributed(env):
                leave_without_waiting(reason)
        joined.set()

    threading.Thread(target=join, name="diffusets-join-to-leave", daemon=True).start()
    try:
        if not joined.wait(JOIN_TO_LEAVE_NOTE_S):
            print(f"diffusets-jax {command}: note: waiting up to {JOIN_TO_LEAVE_S - JOIN_TO_LEAVE_NOTE_S:.0f} s more "
                  "for every host of this multi-host run to start, to tell them this one stopped (Ctrl-C ends "
                  "it now)", file=sys.stderr, flush=True)
            if not joined.wait(JOIN_TO_LEAVE_S - JOIN_TO_LEAVE_NOTE_S):
                raise TimeoutError
    except (TimeoutError, KeyboardInterrupt):
        # A thread still inside `jax.distributed.initialize` would abort the process at JAX's timeout, or hold it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def resolve_mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Mesh axis sizes with at most one -1 ("all remaining devices") filled in.

    Raises ValueError when the sizes do not multiply to `num_devices`.
    """
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data={data}, fsdp={fsdp} may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data}, fsdp={fsdp}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axis size {known} (data="
                             f"{data}, fsdp={fsdp}): give that axis a size that divides {num_devices} "
                             "(--config.mesh.data, --config.mesh.fsdp)")
        sizes[sizes.index(-1)] = num_devices // known
    if sizes[0] * sizes[1] != num_devices:
        raise ValueError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} = {sizes[0] * sizes[1]} but there are {num_devices} "
            "devices; use -1 for one axis to take all remaining devices"
        )
    return sizes[0], sizes[1]


def make_mesh(data: int = -1, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp")` mesh over `devices` (default: all devices of all processes).

    Axes are `Auto` (sharding propagated by XLA from the in/out shardings we give `jax.jit`).
    """
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(data, fsdp, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def mesh_from_config(mesh_config: Mapping[str, Any]) -> Mesh:
    """`make_mesh` from a config section with `data` and `fsdp` sizes (-1 = all remaining devices)."""
    return make_mesh(int(mesh_config["data"]), int(mesh_config["fsdp"]))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} include none of {BATCH_AXES} to split the batch over")
    return axes


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the mesh's batch axes (both of ("data", "fsdp"), or the one it has);
    other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh)))


# XLA options for programs that run once (parameter initialisation). On the CPU backend, LLVM's optimisation
# passes dominate compile time: without them the demo U-Net's init compiles in 18 s instead of 51 s (2 cores)
# and still runs in milliseconds. Other backends compile as usual.
RUN_ONCE_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_run_once(fn: Any, *args: Any, out_shardings: Any = None) -> Any:
    """`jax.jit(fn, out_shardings=...)` compiled for `args` (arrays or `jax.ShapeDtypeStruct`s) as a program that
    runs once or rarely: cheaply on CPU (see above).

    For initialisation (`module.init`, a fresh train state), where compile time is all that counts; its random
    draws are batched into a few threefry calls (`batched_threefry`: the same values, a quarter of the demo
    U-Net init's compile time on the CPU).
    """
    fn = batch_threefry(fn)
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    options = RUN_ONCE_CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jitted.lower(*args).compile(compiler_options=options)


def jit_run_once(fn: Any, *args: Any, out_shardings: Any = None) -> Any:
    """`jax.jit(fn, out_shardings=...)(*args)` compiled for a single call (`compile_run_once`)."""
    return compile_run_once(fn, *args, out_shardings=out_shardings)(*args)


def constrain_to(sharding: jax.sharding.Sharding | None) -> Any:
    """A function that pins an array inside `jax.jit` to `sharding` (identity for None).

    `reshard` on meshes with Explicit axes (`jax.make_mesh`'s default), `with_sharding_constraint` on Auto
    ones. A `NamedSharding` whose spec names only the leading axis applies to arrays of any rank, so one
    batch sharding serves `(batch, 128, 4)` latents and `(batch, particles, 128, 4)` particle clouds alike.
    """
    if sharding is None:
        return lambda x: x
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and any(kind == AxisType.Explicit for kind in mesh.axis_types):
        return lambda x: jax.sharding.reshard(x, sharding)
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def leading_axis_shards(sharding: jax.sharding.Sharding | None) -> int:
    """How many slices `sharding` cuts the leading (batch) axis into: 1 for None or a replicated sharding."""
    if sharding is None or not hasattr(sharding, "mesh"):
        return 1
    spec = sharding.spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1


def num_batch_shards(mesh: Mesh) -> int:
    """How many slices the global batch is split into (the global batch must be a multiple of it)."""
    return int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))


def fsdp_partition_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_FSDP_SIZE) -> PartitionSpec:
    """Shard the largest dimension that `fsdp_size` divides along "fsdp"; replicate when none does.

    Ties go to the later dimension (output features of a kernel), so a `(in, out)` kernel splits like a
    column-parallel layer. Arrays with fewer than `min_size` elements stay replicated.
    """
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
        return PartitionSpec()
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
    for dim in order:
        if shape[dim] % fsdp_size == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_FSDP_SIZE) -> Any:
    """NamedShardings for a pytree of arrays or `ShapeDtypeStruct`s (params, optimiser state, a TrainState).

    Replicated when the mesh's fsdp axis is 1; otherwise `fsdp_partition_spec` per leaf. Adam's moments
    have their parameter's shape, so they shard the same way as it.
    """
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, fsdp_partition_spec(shape, fsdp_size, min_size))

    return jax.tree.map(leaf_sharding, tree)


def shard_host_batch(batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy batch -> globally sharded `jax.Array`s (batch axis over all devices).

    Each process passes its own slice (`global_batch / process_count` examples); on one host this is the
    whole batch. Leaves that already are `jax.Array`s are passed through.
    """
    sharding = batch_sharding(mesh)

    def to_global(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return leaf
        value = np.asarray(leaf)
        if value.dtype.kind in "OSU":
            raise ValueError("a batch field holds strings, which cannot become jax.Arrays: keep text on the host "
                             "(read it separately) and pass only numeric fields")
        return jax.make_array_from_process_local_data(sharding, value)

    return jax.tree.map(to_global, batch)


def local_mesh() -> Mesh:
    """A ("data", "fsdp") mesh over this process's devices only, for work that hosts split among themselves
    (sampling, encoding, embedding, evaluation: each process takes its own batches, no cross-host collectives)."""
    return make_mesh(devices=jax.local_devices())


def process_share(num_items: int) -> range:
    """The item indices this process takes when `num_items` independent work items are dealt round-robin over the
    processes (item i to process i % process_count): every process gets a balanced, deterministic share."""
    return range(jax.process_index(), num_items, jax.process_count())


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (`[obj]` on one host).

    For the small summaries a multi-host command gathers before process 0 writes one manifest or report.
    """
    if jax.process_count() == 1:
        return [obj]
    import json

    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[: int(size)]).decode()) for row, size in zip(gathered, sizes, strict=True)]


def host_values(tree: Any) -> Any:
    """Every array of `tree` whole, as numpy on this process, also one split over several hosts (fsdp spanning
    processes), which `jax.device_get` refuses. A collective then: every process must call it."""
    from jax.experimental import multihost_utils

    def fetch(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return jax.device_get(leaf)

    return jax.tree.map(fetch, tree)


def lost_another_process(err: BaseException) -> bool:
    """Whether `err` is a cross-process step of a multi-host run that timed out waiting for another process, or lost
    it: that process stopped (its own error line says why) or never started, and nothing this process read is at
    fault. JAX reports a timeout as DEADLINE_EXCEEDED (e.g. "Gloo context initialization failed: DEADLINE_EXCEEDED:
    GetKeyValue() timed out"), also from inside a checkpoint restore, which synchronises the processes; on CPU, gloo
    sees a process that left at once and raises a ValueError ("Gloo AllGather failed: ... Connection closed by
    peer")."""
    text = str(err)
    timed_out = isinstance(err, jax.errors.JaxRuntimeError) and "DEADLINE_EXCEEDED" in text
    peer_left = "Gloo" in text and ("closed by peer" in text or "reset by peer" in text)
    return (timed_out or peer_left) and jax.process_count() > 1


@contextlib.contextmanager
def failing_together() -> Iterator[None]:
    """Run a block that only some processes run (process 0 asking a server) or that each runs on what it alone sees
    (its own disk), and end it on every process when it raises on any: that process raises its own error, every
    other one a ValueError (for a bad input: a ValueError, OSError or ImportError) or a RunFailed naming it. Without
    this, the others would go on to the next collective and wait there until the one that stopped leaves the run
    (`_RunWatch`), and then stop with a line that does not say why. Also a barrier; a plain block on one host."""
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any failure must reach the other processes
        if jax.process_count() == 1:
            raise
        error = err
    if jax.process_count() == 1:
        return
    line = None if error is None else " ".join(str(error).split()) or type(error).__name__
    reports = allgather_objects(None if error is None else [isinstance(error, (ValueError, OSError, ImportError)), line])
    if error is not None:
        raise error
    from diffusets_jax.errors import RunFailed

    first = next(((i, r) for i, r in enumerate(reports) if r is not None), None)
    if first is not None:
        index, (bad_input, line) = first
        raise (ValueError if bad_input else RunFailed)(f"process {index} of {len(reports)} stopped: {line}")


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's per-record arrays (same keys; leading dimension its own record count), concatenated in
    process order; the arrays themselves on one host. For per-record measurements a report is built from."""
    if jax.process_count() == 1:
        return dict(arrays)
    from jax.experimental import multihost_utils

    counts = [int(c) for c in allgather_objects(int(next(iter(arrays.values())).shape[0]) if arrays else 0)]
    specs = next(s for s in allgather_objects({k: [list(v.shape[1:]), v.dtype.str] for k, v in arrays.items()}) if s)
    longest = max(counts)
    gathered = {}
    for key, (shape, dtype) in sorted(specs.items()):
        local = arrays.get(key, np.zeros((0, *shape), dtype))
        padded = np.zeros((longest, *shape), dtype)
        padded[: local.shape[0]] = local
        stacked = np.asarray(multihost_utils.process_allgather(padded))  # (processes, longest, ...)
        gathered[key] = np.concatenate([stacked[i, :count] for i, count in enumerate(counts)])
    return gathered
