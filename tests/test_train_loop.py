import functools
import json
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffusets_jax import parallel
from diffusets_jax.train import loop
from tests.helpers.train_helpers import batch_at, batches_from, tiny_config, tiny_task


def _run_steps(mesh, steps, batch_size=16, grad_accum_steps=1, ema_decay=0.0, input_noise=0.01):
    task = tiny_task(input_noise=input_noise)
    _, shardings = loop.abstract_state(task, mesh, seed=0, use_ema=ema_decay > 0)
    state = loop.init_state(task, mesh, seed=0, use_ema=ema_decay > 0)
    step_fn = loop.jit_train_step(loop.make_train_step(task, grad_accum_steps, ema_decay), shardings, mesh)
    for step in range(steps):
        state, metrics = step_fn(state, parallel.shard_host_batch(batch_at(step, batch_size), mesh))
    return jax.device_get(state), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@functools.cache
def _single_device_reference():
    return _run_steps(parallel.make_mesh(1, 1, devices=jax.devices()[:1]), 3)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_step_equals_single_device(data, fsdp):
    single, single_metrics = _single_device_reference()
    sharded, sharded_metrics = _run_steps(parallel.make_mesh(data, fsdp), 3)
    _assert_trees_close(single.params, sharded.params)
    _assert_trees_close(single.opt_state, sharded.opt_state)
    np.testing.assert_allclose(single_metrics["loss"], sharded_metrics["loss"], rtol=1e-5)
    assert int(sharded.step) == 3


def test_fsdp_state_is_sharded_inside_the_step():
    mesh = parallel.make_mesh(2, 4)
    task = tiny_task()
    state = loop.init_state(task, mesh, seed=0, use_ema=True)
    kernel = state.params["Dense_0"]["kernel"]  # (16, 64): 1024 elements, below the fsdp threshold
    assert kernel.sharding.spec == jax.sharding.PartitionSpec()
    shardings = parallel.state_shardings(state, mesh, min_size=1)
    state = jax.device_put(state, shardings)
    step_fn = loop.jit_train_step(loop.make_train_step(task, ema_decay=0.9), shardings, mesh)
    state, _ = step_fn(state, parallel.shard_host_batch(batch_at(0, 16), mesh))
    for tree in (state.params, state.ema_params, state.opt_state[0].mu):
        kernel = tree["Dense_0"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
        assert {s.data.shape for s in kernel.addressable_shards} == {(16, 16)}


def test_gradient_accumulation_matches_full_batch():
    mesh = parallel.make_mesh(8, 1)
    # No input noise: micro-batches draw their noise from their own keys, so only noise-free losses match.
    full, _ = _run_steps(mesh, 2, batch_size=32, input_noise=0.0)
    accumulated, metrics = _run_steps(mesh, 2, batch_size=32, grad_accum_steps=4, input_noise=0.0)
    _assert_trees_close(full.params, accumulated.params, rtol=2e-4, atol=2e-5)
    assert np.isfinite(metrics["loss"]) and "grad_norm" in metrics and "lr" in metrics


def test_ema_tracks_params():
    state, _ = _run_steps(parallel.make_mesh(8, 1), 3, ema_decay=0.5)
    diff = jax.tree.map(lambda e, p: np.abs(e - p).max(), state.ema_params, state.params)
    assert max(jax.tree.leaves(diff)) > 0  # lags behind the params
    assert state.eval_params() is state.ema_params


@pytest.mark.slow
def test_train_checkpoints_logs_and_resumes_on_another_mesh(tmp_path):
    config = tiny_config(num_steps=8)
    val = lambda: [batch_at(10_000 + i, 16) for i in range(2)]
    result = loop.train(tiny_task(), config, tmp_path, batches_from(16), val, mesh=parallel.make_mesh(8, 1))
    assert result.step == 8 and not result.preempted
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 8
    tags = _event_tags(tmp_path / "tensorboard")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/examples_per_sec", "val/mse"} <= tags

    # Resume on 2 devices with fsdp and train 4 more steps: the 8-step state is restored, then extended.
    config.train.num_steps = 12
    config.mesh.data, config.mesh.fsdp = 1, 2
    mesh2 = parallel.make_mesh(1, 2, devices=jax.devices()[:2])
    resumed = loop.train(tiny_task(), config, tmp_path, batches_from(16), None, mesh=mesh2)
    assert resumed.step == 12 and int(resumed.state.step) == 12
    straight = loop.train(tiny_task(), config, tmp_path / "straight", batches_from(16), None,
                          mesh=parallel.make_mesh(8, 1))
    _assert_trees_close(straight.state.params, resumed.state.params)


def test_compiled_steps_are_reused_across_runs_and_seeds(tmp_path):
    mesh = parallel.make_mesh(8, 1)
    task = tiny_task()
    compiled = loop.CompiledSteps(task, mesh)
    val = lambda: [batch_at(10_000, 16)]
    runs: dict[int, list] = {0: [], 1: []}
    for i, seed in enumerate((0, 1, 0)):
        runs[seed].append(loop.train(task, tiny_config(num_steps=4, seed=seed), tmp_path / f"run{i}",
                                     batches_from(16), val, mesh=mesh, compiled=compiled))
    step = compiled.program(("step", 1, 0.0, False), lambda: pytest.fail("the step was not kept"))
    assert step._cache_size() == 1  # one compile served all three runs
    fresh = loop.train(task, tiny_config(num_steps=4, seed=1), tmp_path / "fresh", batches_from(16), val, mesh=mesh)
    _assert_trees_close(fresh.state.params, runs[1][0].state.params)  # same as compiling anew
    _assert_trees_close(runs[0][0].state.params, runs[0][1].state.params)
    assert not np.allclose(jax.tree.leaves(runs[0][0].state.params)[0], jax.tree.leaves(runs[1][0].state.params)[0])
    with pytest.raises(ValueError, match="another task"):
        loop.train(tiny_task(), tiny_config(num_steps=4), tmp_path / "other", batches_from(16), mesh=mesh,
                   compiled=compiled)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(num_steps=12, checkpoint_every=4)
    with pytest.raises(loop.NonFiniteLossError, match=r"step 6.*last good checkpoint is step 4"):
        loop.train(tiny_task(), config, tmp_path, batches_from(16, poison_step=5), None,
                   mesh=parallel.make_mesh(8, 1))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4]
    manager = loop.checkpoint_manager(tmp_path / "checkpoints", 3)
    abstract, _ = loop.abstract_state(tiny_task(), parallel.make_mesh(8, 1), 0, False)
    state, position = loop.restore_state(manager, 4, abstract)
    assert position["step"] == 4 and position["examples_seen"] == 64
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_a_checkpoint_of_a_replicated_state_compiles_nothing_and_reads_back(tmp_path, caplog):
    # Orbax's replica-parallel saving (its default off GPU) would cut each replicated array into one slice per
    # device, an eager op compiled per shape; within one process that only costs time. The shapes are this
    # test's own, so no earlier test in the process has compiled their slices already.
    mesh = parallel.make_mesh(8, 1)
    rng = np.random.default_rng(0)
    state = {f"w{i}": jax.device_put(rng.normal(size=(8 * (i + 3), 5 + i)).astype(np.float32),
                                     parallel.replicated(mesh)) for i in range(4)}
    manager = loop.checkpoint_manager(tmp_path / "checkpoints", 3)
    with jax.log_compiles(), caplog.at_level("DEBUG", logger="jax"):
        manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave({"step": 1})))
        manager.wait_until_finished()
    def compile_messages():
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("Compiling", "Finished XLA"))]

    assert not compile_messages(), compile_messages()[:3]
    with jax.log_compiles(), caplog.at_level("DEBUG", logger="jax"):  # the control: a compile is seen
        jax.jit(lambda x: x * 3 + 1)(np.float32(2.0))
    assert compile_messages()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, position = loop.restore_state(manager, 1, abstract)
    manager.close()
    assert position == {"step": 1}
    for name, array in state.items():
        assert restored[name].sharding == array.sharding
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(array))


def test_a_checkpoint_written_through_standard_save_still_resumes(tmp_path):
    # Runs started before the state handler was set explicitly saved through Orbax's StandardCheckpointHandler.
    mesh = parallel.make_mesh(8, 1)
    state = {"w": jax.device_put(np.arange(48, dtype=np.float32).reshape(16, 3), parallel.replicated(mesh))}
    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute(), options=options) as old:
        old.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"step": 2})))
    manager = loop.checkpoint_manager(tmp_path / "checkpoints", 3)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, position = loop.restore_state(manager, 2, abstract)
    manager.close()
    assert position == {"step": 2} and restored["w"].sharding == state["w"].sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))


def test_sigterm_saves_and_stops(tmp_path):
    config = tiny_config(num_steps=100, checkpoint_every=50)

    def batches(start_step):
        for step in range(start_step, 1000):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch_at(step, 16)

    previous = signal.getsignal(signal.SIGTERM)
    result = loop.train(tiny_task(), config, tmp_path, batches, None, mesh=parallel.make_mesh(8, 1))
    assert result.preempted and result.step == 4
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert signal.getsignal(signal.SIGTERM) is previous


def _event_tags(directory):
    import tensorflow as tf

    tags = set()
    for path in directory.iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_init_state_gives_each_seed_its_values_from_one_program():
    """The seed's key is the init program's argument (one program, and one cache entry, for every seed); any seed,
    64-bit ones too, still gives the state the key made from it inside the program gave."""
    mesh = parallel.make_mesh(8, 1)
    task = tiny_task()
    for seed in (3, 2**40 + 5):
        # As before: the key made inside a program compiled like every init (parallel.jit_run_once).
        expected = parallel.jit_run_once(lambda seed=seed: loop._init_state(task, jax.random.PRNGKey(seed), False))
        state = loop.init_state(task, mesh, seed, False)
        np.testing.assert_array_equal(state.rng, expected.rng)
        for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params), strict=True):
            np.testing.assert_array_equal(got, want)
    compiled = loop.CompiledSteps(task, mesh)
    compiled.init(0, False)
    program = compiled.program(("init", False), lambda: pytest.fail("the init program was not kept"))
    compiled.init(2**40 + 5, False)
    assert compiled.program(("init", False), lambda: pytest.fail("the init program was not kept")) is program


@pytest.mark.parametrize("schedule", ["one_cycle", "cosine", "constant"])
def test_extending_a_run_says_when_it_resizes_the_learning_rate_schedule(tmp_path, capsys, schedule):
    """A finished 4-step run extended to 6: a schedule sized by num_steps is re-sized mid-run (after a finished
    one-cycle the rate rises again), so the run is not bit-identical to 6 steps straight, which the README
    claimed. One line says so; a constant rate has nothing to say, and nor has a resume with the same num_steps."""
    from diffusets_jax.config import optimizer_section

    config = tiny_config(num_steps=4)
    config.optimizer = optimizer_section(lr_schedule=schedule)  # what the note reads; the tiny task has its own
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    loop.train(tiny_task(), config, tmp_path, batches_from(16), None, mesh=mesh)
    loop.train(tiny_task(), config, tmp_path, batches_from(16), None, mesh=mesh)  # finished: resumed as it is
    assert "re-sized" not in capsys.readouterr().err
    config.train.num_steps = 6
    assert loop.train(tiny_task(), config, tmp_path, batches_from(16), None, mesh=mesh).step == 6
    notes = [line for line in capsys.readouterr().err.splitlines() if "re-sized" in line]
    if schedule == "constant":
        assert notes == []
    else:
        assert notes == [f"diffusets-jax: note: train.num_steps 4 -> 6: the {schedule} learning-rate schedule is "
                         "re-sized to 6 steps, and steps 5-6 follow it from where it stands at step 4: not "
                         "bit-identical to a run of 6 steps from the start"]
