"""The generic training loop: one jitted, sharded step; Orbax checkpoints; exact resume; progress and logs.

A model's recipe is a `Task` (how to init, the loss, the optimiser, validation metrics, export). `train`
runs it on a mesh:

- the step is `jax.jit(step, in_shardings=(state, batch), out_shardings=(state, replicated),
  donate_argnums=0)`, built once; gradient accumulation runs inside it as a `lax.scan` over micro-batches;
- checkpoints go through an Orbax `CheckpointManager` (async, keep-N, every K steps) holding the state
  and the data position (`step`, `examples_seen`); restore uses the current mesh's shardings, so a run
  may resume on a different number of devices;
- SIGTERM (preemption) saves the current step and returns; a non-finite loss stops the run with
  `NonFiniteLossError` before anything non-finite is saved, so the last checkpoint stays good; a resume whose
  newest checkpoint cannot be read says so and falls back to the newest readable one (`restore_latest`);
- a tqdm bar shows loss and examples/s; TensorBoard event files get loss, lr, grad norm, examples/s and
  the periodic validation metrics.

Every random draw of step s comes from `fold_in(state.rng, s)` and the data source is asked for batches
from a step, so a 2N-step run stopped after N steps and restarted is bit-identical to 2N steps straight. Extending
a run (a larger `train.num_steps` than it began with) is not, when its learning-rate schedule is sized by num_steps
(`optim.schedule_sized_by_steps`): the schedule is re-sized mid-run, and a line says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from diffusets_jax import parallel
from diffusets_jax.config import config_to_dict, save_config
from diffusets_jax.errors import RunFailed
from diffusets_jax.io.checkpoints import absorb_restore_noise, restore_error_reason
from diffusets_jax.train.optim import schedule_sized_by_steps
from diffusets_jax.train.state import TrainState, create_train_state, ema_update

log = logging.getLogger(__name__)

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
# (params, model_state, batch, key, step) -> (loss, (metrics, new_model_state))
LossFn = Callable[[Any, Any, Batch, jax.Array, jax.Array], tuple[jax.Array, tuple[Metrics, Any]]]
# (params, model_state, batch, key) -> metrics (per-batch means; the loop averages them over batches)
EvalFn = Callable[[Any, Any, Batch, jax.Array], Metrics]


class NonFiniteLossError(RunFailed):
    """Training produced a NaN/inf loss; the run stopped and the last checkpoint is the last good state."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One model's training recipe, as the generic loop needs it.

    - `init_variables(key)`: `model.init` output, `{"params": ..., other collections}`.
    - `loss_fn(params, model_state, batch, key, step)`: scalar loss and `(metrics, new_model_state)`.
    - `optimizer`: the optax transformation (clipping included); `learning_rate(step)` for logging.
    - `eval_fn`: validation metrics of one batch (optional).
    - `model`: the Flax module whose `{"params": ..., **model_state}` the run exports into a model directory
      (`train.run.export_state`); None for tasks that export nothing (the loop's own tests).
    """

    name: str
    init_variables: Callable[[jax.Array], dict[str, Any]]
    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    learning_rate: Callable[[Any], Any]
    eval_fn: EvalFn | None = None
    model: Any = None


@dataclasses.dataclass
class TrainResult:
    """How a `train` call ended: the final state, its step, and whether it stopped for preemption."""

    state: TrainState
    step: int
    preempted: bool


def abstract_state(task: Task, mesh: Mesh, seed: int, use_ema: bool) -> tuple[Any, Any]:
    """`(ShapeDtypeStruct tree with shardings, shardings tree)` of the task's TrainState on `mesh`."""
    shapes = jax.eval_shape(lambda: _init_state(task, jax.random.PRNGKey(seed), use_ema))
    shardings = parallel.state_shardings(shapes, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def init_state(task: Task, mesh: Mesh, seed: int, use_ema: bool) -> TrainState:
    """A fresh TrainState created directly in its shardings (no full copy on one device first)."""
    return CompiledSteps(task, mesh).init(seed, use_ema)


def _init_state(task: Task, root: jax.Array, use_ema: bool) -> TrainState:
    init_key, train_key = jax.random.split(root)
    return create_train_state(task.init_variables(init_key), task.optimizer, train_key, use_ema)


class CompiledSteps:
    """The compiled programs of one task on one mesh (state init, train step, eval step) and its abstract state,
    kept across `train` calls.

    `train` compiles them afresh on every call by default. A caller that trains the same task many times in one
    process (the downstream benchmark: arms x seeds, minutes of CPU compile each) passes one `CompiledSteps` to
    every call and compiles once; the seed's key is an argument of the init program, so every seed shares it (and
    a rerun with another seed finds it in the command's compilation cache, `compile_cache`).
    Owned by the caller: nothing is cached globally.
    """

    def __init__(self, task: Task, mesh: Mesh) -> None:
        self.task = task
        self.mesh = mesh
        self._programs: dict[tuple[Any, ...], Any] = {}

    def check(self, task: Task, mesh: Mesh) -> None:
        if task is not self.task or mesh != self.mesh:
            raise ValueError("CompiledSteps holds another task's or mesh's programs: make one per (task, mesh)")

    def abstract_state(self, use_ema: bool) -> tuple[Any, Any]:
        """`abstract_state` of this task and mesh, computed once: it traces the model's init (0.4-0.8 s for the
        demo U-Net, 1.1-1.4 s for the published one), which `train` and `init` both need."""
        return self.program(("abstract", use_ema), lambda: abstract_state(self.task, self.mesh, 0, use_ema))

    def init(self, seed: int, use_ema: bool) -> TrainState:
        """A fresh TrainState for `seed`, created directly in its shardings (see `init_state`)."""

        def build() -> Callable:
            _, shardings = self.abstract_state(use_ema)
            return parallel.compile_run_once(lambda root: _init_state(self.task, root, use_ema),
                                             jax.eval_shape(jax.random.PRNGKey, 0), out_shardings=shardings)

        # The key is made outside the program, so any seed (up to 64 bits) gives the key it always gave.
        return self.program(("init", use_ema), build)(jax.random.PRNGKey(seed))

    def program(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """What `build()` makes, built once per `key`: a program, or the abstract state (`abstract_state`)."""
        if key not in self._programs:
            self._programs[key] = build()
        return self._programs[key]


def make_train_step(
    task: Task, grad_accum_steps: int = 1, ema_decay: float = 0.0
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure step `(state, batch) -> (state, metrics)`; jit it with `jit_train_step`.

    With `grad_accum_steps = k > 1` the global batch is split into k micro-batches (micro-batch j takes
    examples j, j+k, j+2k, ... so every device contributes to every micro-batch without resharding);
    the loss and gradients are their mean. Metrics: `loss`, `grad_norm` (before clipping), `lr` and the
    task's own.
    """

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = state.step_key()
        grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
        if grad_accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, key, state.step)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), batch)

            def accumulate(carry, xs):
                grads_sum, loss_sum, metrics_sum, model_state = carry
                index, micro_batch = xs
                (loss, (metrics, model_state)), grads = grad_fn(
                    state.params, model_state, micro_batch, jax.random.fold_in(key, index), state.step
                )
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                metrics_sum = jax.tree.map(jnp.add, metrics_sum, metrics)
                return (grads_sum, loss_sum + loss, metrics_sum, model_state), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            metric_shapes = jax.eval_shape(
                lambda: task.loss_fn(state.params, state.model_state, jax.tree.map(lambda x: x[0], micro), key,
                                     state.step)[1][0]
            )
            metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
            (grads, loss, metrics, model_state), _ = jax.lax.scan(
                accumulate,
                (zeros, jnp.zeros((), jnp.float32), metric_zeros, state.model_state),
                (jnp.arange(grad_accum_steps), micro),
            )
            scale = 1.0 / grad_accum_steps
            grads = jax.tree.map(lambda g: g * scale, grads)
            loss = loss * scale
            metrics = jax.tree.map(lambda m: m * scale, metrics)
        updates, opt_state = task.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = ema_update(ema_params, params, ema_decay)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state, ema_params=ema_params
        )
        metrics = dict(metrics)
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), lr=jnp.asarray(task.learning_rate(state.step)))
        return new_state, metrics

    return step_fn


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    if x.shape[0] % k:
        raise ValueError(f"global batch {x.shape[0]} is not divisible by grad_accum_steps={k}")
    # (B, ...) -> (B/k, k, ...) -> (k, B/k, ...): rows j, j+k, ... form micro-batch j. Each device's
    # contiguous rows stay on it, so no data moves between devices.
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def jit_train_step(step_fn: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """`jax.jit` with the state's shardings in and out, the batch split over all devices, state donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def checkpoint_manager(directory: Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """Orbax manager for `directory` keeping the last `keep` checkpoints; `train` decides when to save.

    Items: `state` (the `TrainState`; `ocp.args.PyTreeSave`, `restore_state`) and `data` (the data position, JSON).
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options,
                                 item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler()})


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's PyTree handler (the one its StandardCheckpointHandler wraps: the same array files, less the
    per-array records Orbax keeps to restore typed PRNG keys; the state's key is raw uint32), replica-parallel
    only across processes. Reads checkpoints written through StandardCheckpointHandler too.

    Replica-parallel saving, Orbax's default off GPU, cuts every replicated array into one slice per replica so
    that several hosts share the writing. Within one process the same host writes every slice anyway, and each
    slice is an eager device op compiled per shape: on 8 devices, 8 slices of each of the state's arrays (about
    3 x 676 for the published U-Net with AdamW: parameters, two moments). Across processes each host still
    writes its share.
    """
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
    registry = ocp.type_handlers.create_type_handler_registry(
        *((kind, ocp.type_handlers.get_type_handler(kind)) for kind in (int, float, np.number, np.ndarray)),
        (jax.Array, arrays))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def restore_state(manager: ocp.CheckpointManager, step: int, abstract: Any) -> tuple[TrainState, dict[str, Any]]:
    """`(state, data position)` of checkpoint `step`, placed with the shardings inside `abstract`."""
    state_args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    restored = manager.restore(step, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)


def restore_latest(manager: ocp.CheckpointManager, abstract: Any, *, set_aside: bool = True
                   ) -> tuple[TrainState, dict[str, Any], int] | None:
    """`(state, data position, step)` of the newest checkpoint that can be read; None when there is none.

    A checkpoint that cannot be read (a truncated or missing file) is reported with its step and the reason, and
    the next older one is tried. With `set_aside` (the run resuming in its own workdir) the unreadable ones are then
    renamed `unreadable-<step>` (kept, not deleted) so the run can save those steps again; a reader (`--export-only`,
    perhaps beside the training that owns the folder) leaves them as they are. When none can be read: one line
    saying what to do.
    """
    directory = Path(manager.directory)
    failed: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        absorb_restore_noise(directory / str(step))
        try:
            state, position = restore_state(manager, step, abstract)
        except Exception as err:  # noqa: BLE001 - tensorstore/Orbax raise ValueError, OSError, JSON errors, ...
            failed.append((step, restore_error_reason(err, 160)))
            log.warning("checkpoint step %d in %s cannot be read (%s); trying the next older one", step, directory,
                        failed[-1][1])
            continue
        if failed and set_aside:
            _set_aside(manager, [s for s, _ in failed])
            log.warning("resuming from step %d, the newest readable checkpoint; unreadable step(s) %s kept as %s",
                        step, ", ".join(str(s) for s, _ in failed),
                        ", ".join(f"unreadable-{s}" for s, _ in failed))
        elif failed:
            log.warning("reading step %d, the newest readable checkpoint; step(s) %s left as they are", step,
                        ", ".join(str(s) for s, _ in failed))
        return state, position, step
    if failed:
        reasons = "; ".join(f"step {s}: {why}" for s, why in failed)
        advice = ": restore the folder from a backup, or move it away to train from scratch" if set_aside else ""
        raise ValueError(f"no checkpoint in {directory} can be read ({reasons}){advice}")
    return None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Rename unreadable step folders out of Orbax's sight (process 0), so those steps can be saved again."""
    directory = Path(manager.directory)
    if jax.process_index() == 0:
        for step in steps:
            target = directory / f"unreadable-{step}"
            suffix = 0
            while target.exists():  # an earlier run set this step aside already: keep both
                suffix += 1
                target = directory / f"unreadable-{step}.{suffix}"
            (directory / str(step)).rename(target)
    parallel.barrier("checkpoints-set-aside")
    manager.reload()


def _note_schedule_resized(config: ml_collections.ConfigDict, data_position: dict[str, Any], start_step: int) -> None:
    """One line when a run resumes with another `train.num_steps` than its checkpoint was trained towards and its
    learning-rate schedule is sized by it: the rate jumps to where the re-sized schedule stands at this step (after
    a finished one-cycle it rises again), so the run is not what one trained for the new number of steps from the
    start would be. The schedule itself is the recipe's and stays as it is."""
    before = data_position.get("config", {}).get("train", {}).get("num_steps")
    num_steps = int(config.train.num_steps)
    if (before is None or int(before) == num_steps or start_step >= num_steps or "optimizer" not in config
            or not schedule_sized_by_steps(config.optimizer)):
        return
    print(f"diffusets-jax: note: train.num_steps {before} -> {num_steps}: the {config.optimizer.lr_schedule} "
          f"learning-rate schedule is re-sized to {num_steps} steps, and steps {start_step + 1}-{num_steps} follow it "
          f"from where it stands at step {start_step}: not bit-identical to a run of {num_steps} steps from the start",
          file=sys.stderr)


def train(
    task: Task,
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    train_batches: Callable[[int], Iterator[Batch]],
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    mesh: Mesh | None = None,
    compiled: CompiledSteps | None = None,
) -> TrainResult:
    """Train `task` for `config.train.num_steps` steps, resuming from `workdir/checkpoints` if present.

    `train_batches(start_step)` yields the global batches from step `start_step` on (dicts of host-local
    numpy arrays, each process passing its own slice, or already sharded jax.Arrays). `val_batches()`
    yields a fixed set of validation batches. Config keys used (all under `config.train` unless noted):
    `num_steps`, `seed`, `global_batch_size`, `grad_accum_steps`, `ema_decay` (0 = off), `log_every`,
    `eval_every`, `checkpoint_every`, `keep_checkpoints`, `async_checkpoints`, `progress_bar`;
    `config.mesh.data`, `config.mesh.fsdp`. Writes `workdir/config.json`, `workdir/checkpoints/` and
    `workdir/tensorboard/`; the caller exports the returned state (`train.run.export_state`). `compiled`: programs
    kept from earlier calls with the same task and mesh (`CompiledSteps`), so this call compiles nothing new.
    """
    workdir = Path(workdir)
    tc = config.train
    mesh = (compiled.mesh if compiled is not None else parallel.mesh_from_config(config.mesh)) if mesh is None else mesh
    if compiled is not None:
        compiled.check(task, mesh)
    is_main = jax.process_index() == 0
    use_ema = float(tc.ema_decay) > 0
    num_steps = int(tc.num_steps)
    global_batch = int(tc.global_batch_size)
    if global_batch % parallel.num_batch_shards(mesh):
        raise ValueError(
            f"train.global_batch_size={global_batch} is not divisible by the {parallel.num_batch_shards(mesh)} "
            "devices of the mesh; pick a multiple"
        )
    if is_main:
        save_config(config, workdir)

    steps = compiled if compiled is not None else CompiledSteps(task, mesh)  # this call's own when not given
    abstract, shardings = steps.abstract_state(use_ema)
    manager = checkpoint_manager(workdir / "checkpoints", int(tc.keep_checkpoints), bool(tc.async_checkpoints))
    try:
        restored = restore_latest(manager, abstract)
    except BaseException:
        manager.close()
        raise
    if restored is not None:
        state, data_position, _ = restored
        start_step = int(data_position["step"])
        log.info("resumed %s from step %d in %s", task.name, start_step, workdir / "checkpoints")
        if is_main:
            _note_schedule_resized(config, data_position, start_step)
    else:
        state = steps.init(int(tc.seed), use_ema)
        start_step = 0
    step_fn = steps.program(
        ("step", int(tc.grad_accum_steps), float(tc.ema_decay), use_ema),
        lambda: jit_train_step(make_train_step(task, int(tc.grad_accum_steps), float(tc.ema_decay)), shardings, mesh))
    eval_fn = None
    if task.eval_fn is not None and val_batches is not None:
        eval_fn = steps.program(("eval",), lambda: _jit_eval(task, mesh))
    writer = ScalarWriter(workdir / "tensorboard") if is_main else None
    stop = _PreemptionFlag()
    config_dict = config_to_dict(config)

    def save(step: int, state: TrainState) -> None:
        data_position = {"step": step, "examples_seen": step * global_batch, "config": config_dict}
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_position)),
            force=True,  # the loop decides when (interval, last step, SIGTERM); Orbax would also save step 1
        )

    progress = _progress_bar(num_steps, start_step, task.name, enabled=is_main and bool(tc.progress_bar))
    step = start_step
    preempted = False
    pending: tuple[int, Metrics] | None = None  # the previous step's metrics, checked one step late
    window_start, window_examples = time.perf_counter(), 0
    try:
        with stop.installed():
            batches = iter(train_batches(start_step))
            while step < num_steps:
                batch = parallel.shard_host_batch(next(batches), mesh)
                state, metrics = step_fn(state, batch)
                step += 1
                window_examples += global_batch
                # Check the previous step's loss now that this one is queued: the host never stalls the device.
                if pending is not None:
                    _check_finite(*pending, manager)
                pending = (step, metrics)
                log_now = step % int(tc.log_every) == 0 or step == num_steps
                save_now = step % int(tc.checkpoint_every) == 0 or step == num_steps
                if save_now or log_now or stop.requested(step):
                    host_metrics = _check_finite(step, metrics, manager)
                    pending = None
                    if log_now:
                        elapsed = time.perf_counter() - window_start
                        host_metrics["examples_per_sec"] = window_examples / max(elapsed, 1e-9)
                        host_metrics["step_time_s"] = elapsed / max(window_examples / global_batch, 1)
                        window_start, window_examples = time.perf_counter(), 0
                        if writer is not None:
                            writer.write(step, {f"train/{k}": v for k, v in host_metrics.items()})
                        progress.set_postfix(  # refresh=False: drawn with the next update, at the bar's pace
                            loss=f"{host_metrics['loss']:.4g}", ex_s=f"{host_metrics['examples_per_sec']:.1f}",
                            refresh=False)
                if eval_fn is not None and (step % int(tc.eval_every) == 0 or step == num_steps):
                    val = evaluate(eval_fn, state, val_batches(), mesh, int(tc.seed))
                    if writer is not None:
                        writer.write(step, {f"val/{k}": v for k, v in val.items()})
                    log.info("step %d validation: %s", step, val)
                if stop.requested(step):
                    save(step, state)
                    preempted = True
                    log.warning("SIGTERM: saved step %d and stopping", step)
                    break
                if save_now:
                    save(step, state)
                progress.update(1)
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()
    return TrainResult(state=state, step=step, preempted=preempted)


def _jit_eval(task: Task, mesh: Mesh) -> Callable:
    assert task.eval_fn is not None
    return jax.jit(
        lambda params, model_state, batch, key: task.eval_fn(params, model_state, batch, key),
        in_shardings=(None, None, parallel.batch_sharding(mesh), None),
        out_shardings=parallel.replicated(mesh),
    )


def evaluate(eval_fn: Callable, state: TrainState, batches: Iterable[Batch], mesh: Mesh, seed: int) -> dict[str, float]:
    """Mean of `eval_fn`'s metrics over `batches` (EMA params when on); fixed keys so runs compare."""
    totals: dict[str, float] = {}
    count = 0
    base = jax.random.PRNGKey(seed + 1)
    for index, batch in enumerate(batches):
        metrics = jax.device_get(
            eval_fn(state.eval_params(), state.model_state, parallel.shard_host_batch(batch, mesh),
                    jax.random.fold_in(base, index))
        )
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
    return {name: value / max(count, 1) for name, value in totals.items()}


def _check_finite(step: int, metrics: Metrics, manager: ocp.CheckpointManager) -> dict[str, float]:
    host = {name: float(np.asarray(value)) for name, value in jax.device_get(metrics).items()}
    if not math.isfinite(host["loss"]):
        manager.wait_until_finished()
        last = manager.latest_step()
        where = (f"the last good checkpoint is step {last} in {manager.directory}" if last is not None
                 else "no checkpoint was saved yet")
        raise NonFiniteLossError(
            f"loss is {host['loss']} at step {step}; stopped without saving it, {where}. Lower "
            "optimizer.learning_rate, set optimizer.grad_clip_norm, or check the data for NaN/inf values."
        )
    return host


class ScalarWriter:
    """TensorBoard scalar event files through `tf.summary` (the tensorboard package is only needed to view)."""

    def __init__(self, directory: Path) -> None:
        import tensorflow as tf  # lazy: only the main process of a training run loads it for events
        from tensorflow.core.framework import summary_pb2

        tf.config.set_visible_devices([], "GPU")  # TensorFlow must not claim accelerator memory
        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(directory))
        # Marks the values as scalars so TensorBoard's Scalars tab plots them.
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        with self._writer.as_default():
            for tag, value in scalars.items():
                self._tf.summary.write(tag, self._tf.constant(float(value), self._tf.float32), step=step,
                                       metadata=self._metadata)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _PreemptionFlag:
    """SIGTERM -> 'save now and stop'.

    One host: a Python SIGTERM handler sets a flag. Several hosts: every host must stop at the same step
    or the collective save deadlocks, so JAX's preemption sync manager (started by
    `jax.distributed.initialize`, which watches SIGTERM itself) decides the step.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._answers: dict[int, bool] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[_PreemptionFlag]:
        previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        try:
            yield self
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._event.is_set()
        if step not in self._answers:  # ask the sync manager once per step: every host asks the same steps
            from jax.experimental import multihost_utils

            self._answers = {step: bool(multihost_utils.reached_preemption_sync_point(step))}
        return self._answers[step]


def _progress_bar(total: int, initial: int, name: str, enabled: bool):
    from diffusets_jax.io.progress import progress_bar

    return progress_bar(total, initial=initial, desc=f"train {name}", unit="step", disable=not enabled)
