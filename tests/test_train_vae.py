from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax import parallel
from diffusets_jax.config import load_config
from diffusets_jax.train import loop
from diffusets_jax.train.vae import kl_weight, vae_losses, vae_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_vae_losses_match_the_reference_formula():
    rng = np.random.default_rng(0)
    recon, ecg = rng.normal(size=(2, 2, 1024, 12)).astype(np.float32)
    mean, logvar = rng.normal(size=(2, 2, 128, 4)).astype(np.float32)
    reconstruction, kl = vae_losses(recon, ecg, mean, logvar)
    np.testing.assert_allclose(reconstruction, ((recon - ecg) ** 2).sum() / 2, rtol=1e-5)
    expected_kl = (0.5 * (mean**2 + np.exp(logvar) - 1 - logvar).sum(-1)).mean()
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-5)


def test_kl_weight_schedules():
    per_epoch = [float(kl_weight(s, 10, 10, "per_epoch")) for s in (0, 9, 10, 55, 89, 90, 500)]
    np.testing.assert_allclose(per_epoch, [0.1, 0.1, 0.2, 0.6, 0.9, 1.0, 1.0], rtol=1e-6)
    linear = [float(kl_weight(s, 10, 10, "linear")) for s in (0, 50, 100, 200)]
    np.testing.assert_allclose(linear, [0.0, 0.5, 1.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="kl_schedule"):
        kl_weight(0, 10, 10, "cubic")


def _tiny_config(**values):
    config = load_config(CONFIGS / "demo_vae.py", ["model.widths=(8, 8, 8)", "model.groups=4",
                                                   "data.num_train_examples=64", "model.num_res_blocks=1"])
    for key, value in values.items():
        (config.optimizer if key in config.optimizer else config.train)[key] = value
    return config


@pytest.mark.slow  # the VAE graph takes minutes to compile on 2 shared CPU cores
def test_vae_trains_on_a_mesh_and_reports_mae():
    config = _tiny_config(global_batch_size=8, learning_rate=3e-3, lr_schedule="constant")
    task = vae_task(config, num_steps=10)
    mesh = parallel.make_mesh(1, 2, devices=jax.devices()[:2])  # sharding equivalence: test_train_loop.py
    _, shardings = loop.abstract_state(task, mesh, 0, False)
    state = loop.init_state(task, mesh, 0, False)
    step = loop.jit_train_step(loop.make_train_step(task), shardings, mesh)
    # 128 samples instead of 1024 keep the test fast; the convolutional VAE takes any multiple of 8.
    t = np.linspace(0, 10, 128, dtype=np.float32)
    ecg = (0.5 * np.sin(2 * np.pi * 1.2 * t)[None, :, None] * np.linspace(0.2, 1, 12)[None, None]).astype(np.float32)
    batch = parallel.shard_host_batch({"ecg": np.repeat(ecg, 8, 0)}, mesh)
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert float(metrics["kl_weight"]) == pytest.approx(0.1)  # epoch 0 of 8 steps per epoch: (0 + 1) / 10
    val = loop.evaluate(jax.jit(task.eval_fn), state, [{"ecg": np.repeat(ecg, 8, 0)}], mesh, seed=0)
    assert set(val) == {"reconstruction_mae_mv", "reconstruction", "kl"}
    assert 0 < val["reconstruction_mae_mv"] < 1.0


@pytest.mark.slow
def test_bf16_compute_keeps_f32_params():
    config = _tiny_config(compute_dtype="bfloat16")
    task = vae_task(config, num_steps=10)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    _, shardings = loop.abstract_state(task, mesh, 0, False)
    state = loop.init_state(task, mesh, 0, False)
    state, metrics = loop.jit_train_step(loop.make_train_step(task), shardings, mesh)(
        state, parallel.shard_host_batch({"ecg": np.full((2, 128, 12), 0.1, np.float32)}, mesh))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"]))
