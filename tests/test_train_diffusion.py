from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax import parallel
from diffusets_jax.config import load_config
from diffusets_jax.models.vae import VAE
from diffusets_jax.train import loop
from diffusets_jax.train.diffusion import diffusion_task, patient_condition

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ConditionedDenoiser(nn.Module):
    """Stand-in with the U-Net's interface: a conv on x_t plus a condition- and time-dependent bias."""

    text_dim: int = 8

    @nn.compact
    def __call__(self, x_t, t, text_embedding, sex, age, heart_rate):
        cond = jnp.concatenate([text_embedding, sex[:, None], age[:, None], heart_rate[:, None],
                                t[:, None].astype(jnp.float32) / 1000.0], axis=-1)
        bias = nn.Dense(x_t.shape[-1])(nn.gelu(nn.Dense(16)(cond)))
        return (nn.Conv(x_t.shape[-1], (3,))(x_t) + bias[:, None, :]).astype(jnp.float32)


def test_sample_scaled_latent_and_patient_features():
    mean = jnp.full((2, 128, 4), 1.0)
    logvar = jnp.full((2, 128, 4), -30.0)  # no spread: the draw is the mean
    np.testing.assert_allclose(VAE.sample_latent(mean, logvar, jax.random.PRNGKey(0)), 0.18215, rtol=1e-5)
    logvar = jnp.zeros((2, 128, 4))
    z = np.asarray(VAE.sample_latent(mean, logvar, jax.random.PRNGKey(0))) / 0.18215
    assert abs(z.mean() - 1.0) < 0.15 and abs(z.std() - 1.0) < 0.15
    batch = {"text_embedding": jnp.ones((2, 3)), "sex": jnp.array([1, 0]), "age": jnp.array([60.0, 30.0]),
             "heart_rate": jnp.array([75.0, 120.0])}
    faithful = patient_condition(batch, "faithful")
    normalised = patient_condition(batch, "normalised")
    np.testing.assert_allclose(faithful["age"], [60, 30])
    np.testing.assert_allclose(normalised["age"], [0.6, 0.3])
    np.testing.assert_allclose(normalised["heart_rate"], [0.75, 1.2])
    with pytest.raises(ValueError, match="patient_features"):
        patient_condition(batch, "zscore")


def _batch(n=8, text_dim=8):
    rng = np.random.default_rng(0)
    return {"latent_mean": rng.normal(size=(n, 128, 4)).astype(np.float32),
            "latent_logvar": np.full((n, 128, 4), -6.0, np.float32),
            "text_embedding": rng.normal(size=(n, text_dim)).astype(np.float32),
            "sex": rng.integers(0, 2, n).astype(np.int32), "age": rng.uniform(20, 90, n).astype(np.float32),
            "heart_rate": rng.uniform(50, 110, n).astype(np.float32)}


@pytest.mark.parametrize("config_name", ["diffusets_unet", "improved_unet"])
def test_diffusion_trains_with_faithful_and_improved_recipes(config_name):
    config = load_config(CONFIGS / f"{config_name}.py", ["data.num_train_examples=64", "optimizer.learning_rate=1e-2",
                                                         "train.eval_timesteps=(10,500)", "optimizer.warmup_steps=0"])
    task = diffusion_task(config, num_steps=20, model=ConditionedDenoiser())
    use_ema = config.train.ema_decay > 0
    mesh = parallel.make_mesh(4, 2)
    _, shardings = loop.abstract_state(task, mesh, 0, use_ema)
    state = loop.init_state(task, mesh, 0, use_ema)
    step = loop.jit_train_step(loop.make_train_step(task, ema_decay=float(config.train.ema_decay)), shardings, mesh)
    batch = parallel.shard_host_batch(_batch(), mesh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert (state.ema_params is not None) == use_ema
    eval_fn = jax.jit(task.eval_fn)
    val = loop.evaluate(eval_fn, state, [_batch()], mesh, seed=0)
    assert set(val) == {"loss_t010", "loss_t500"}
    assert all(np.isfinite(v) and v > 0 for v in val.values())
    assert loop.evaluate(eval_fn, state, [_batch()], mesh, seed=0) == val  # fixed noise: comparable across evals


TINY_UNET = ["model.channels=(8,16)", "model.down_attention_dims=(8,16)", "model.bottleneck_attention_dim=16",
             "model.up_attention_dims=(32,16)", "model.num_heads=2", "model.bottleneck_heads=2", "model.text_dim=8"]


@pytest.mark.slow  # even a 2-level U-Net's init and train step compile for tens of seconds on 2 shared cores
def test_unet_recipe_with_the_real_unet():
    """The real U-Net (every block kind at the demo's structure, narrower and one level shallower: compile time
    grows with the levels) trains through the recipe with its parameters split over an FSDP axis."""
    config = load_config(CONFIGS / "demo_unet.py", [*TINY_UNET, "data.num_train_examples=64"])
    task = diffusion_task(config, num_steps=10)
    mesh = parallel.make_mesh(1, 2, devices=jax.devices()[:2])
    _, shardings = loop.abstract_state(task, mesh, 0, True)
    state = loop.init_state(task, mesh, 0, True)
    step = loop.jit_train_step(loop.make_train_step(task, ema_decay=0.99), shardings, mesh)
    state, metrics = step(state, parallel.shard_host_batch(_batch(4), mesh))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    large = [leaf for leaf in jax.tree.leaves(state.params) if leaf.size >= parallel.MIN_FSDP_SIZE]
    assert large and all("fsdp" in str(leaf.sharding.spec) for leaf in large)


class ZeroNet(nn.Module):
    """Predicts zeros: its loss is the squared norm of the training target."""

    text_dim: int = 8

    @nn.compact
    def __call__(self, x_t, t, text_embedding, sex, age, heart_rate):
        return jnp.zeros_like(x_t)



def test_prediction_type_sets_the_training_target():
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    losses = {}
    for prediction_type in ("epsilon", "v_prediction"):
        config = load_config(CONFIGS / "demo_unet.py", ["train.eval_timesteps=(990,)", "diffusion.latent_scale=0.5",
                                                        f"diffusion.schedule.prediction_type={prediction_type}"])
        task = diffusion_task(config, num_steps=10, model=ZeroNet())
        losses[prediction_type] = float(jax.jit(task.eval_fn)({}, {}, batch, jax.random.key(0))["loss_t990"])
    # At t = 990 the epsilon target is the noise (~512 squared per sample); v = sqrt(abar) eps - sqrt(1 - abar) x0
    # is mostly -x0, here 0.5 x the posterior mean.
    assert losses["epsilon"] == pytest.approx(512, rel=0.1)
    expected_v = 0.25 * float(jnp.square(batch["latent_mean"]).sum(axis=(1, 2)).mean())
    assert losses["v_prediction"] == pytest.approx(expected_v, rel=0.1)


MODEL_CALLS: list[tuple[int, ...]] = []  # the input shape of every TimeScaledNet call, made while tracing


class TimeScaledNet(nn.Module):
    """A per-example model that depends on t and the condition."""

    text_dim: int = 8

    @nn.compact
    def __call__(self, x_t, t, text_embedding, sex, age, heart_rate):
        MODEL_CALLS.append(x_t.shape)
        return x_t * (t[:, None, None] / 1000.0) + (age + text_embedding.mean(-1))[:, None, None] / 100.0


def test_evaluation_calls_the_model_once_for_all_timesteps_with_each_timesteps_loss():
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}

    def losses(timesteps):
        config = load_config(CONFIGS / "demo_unet.py", [f"train.eval_timesteps={timesteps}"])
        task = diffusion_task(config, num_steps=10, model=TimeScaledNet())
        return jax.jit(task.eval_fn)({}, {}, batch, jax.random.key(3))

    MODEL_CALLS.clear()
    together = losses("(10,500,990)")
    assert MODEL_CALLS == [(24, 128, 4)]  # one call over the 8 examples x 3 timesteps
    for t in (10, 500, 990):  # each as if evaluated alone: same noise, its own timestep, its own rows
        alone = losses(f"({t},)")
        np.testing.assert_allclose(float(together[f"loss_t{t:03d}"]), float(alone[f"loss_t{t:03d}"]), rtol=1e-6)
    assert len({round(float(v), 3) for v in together.values()}) == 3


@pytest.mark.parametrize("timesteps", ["(1000,)", "(10,5000)", "(-1,)"])
def test_evaluation_timesteps_outside_the_schedule_are_refused(timesteps):
    """JAX clamps an out-of-range gather index, so t = 1000 was evaluated silently as t = 999."""
    config = load_config(CONFIGS / "demo_unet.py", [f"train.eval_timesteps={timesteps}"])
    with pytest.raises(ValueError, match=r"train.eval_timesteps must be timesteps from 0 to 999 of the 1000-step"):
        diffusion_task(config, num_steps=10, model=TimeScaledNet())


def test_the_diffusion_section_is_what_the_model_directory_records():
    """config.diffusion, resolved, is the model index's `diffusion` (one shape from training to sampling)."""
    from diffusets_jax.config import config_to_dict, diffusion_section
    from diffusets_jax.train.diffusion import diffusion_spec

    config = load_config(CONFIGS / "demo_unet.py", ["diffusion.latent_scale=0.5"])
    spec = diffusion_spec(config, latent_std=0.93)
    assert spec.to_json() == {**config_to_dict(config)["diffusion"], "latent_std": 0.93}
    assert spec.schedule.prediction_type == "v_prediction" and spec.scale_by_std and not spec.clip_sample
    faithful = diffusion_spec(load_config(CONFIGS / "diffusets_unet.py"))
    assert faithful.clip_sample and faithful.latent_scale == 0.18215 and faithful.schedule.prediction_type == "epsilon"
    # unit-variance (measured) latents reach beyond [-1, 1]: a recipe that would clip them is refused
    with pytest.raises(ValueError, match="clip_sample=False"):
        diffusion_section(scale_by_std=True)
    with pytest.raises(ValueError, match="no field"):
        diffusion_section(latent_scael=0.5)


@pytest.mark.parametrize("overrides", [["train.t_max=1000"], ["diffusion.schedule.num_timesteps=500"]])
def test_training_timesteps_past_the_schedule_are_refused_before_training(overrides):
    """A t_max past the schedule's end was found only when the first step was traced, after the workdir was claimed,
    in a line that named no config key."""
    config = load_config(CONFIGS / "demo_unet.py", overrides)
    with pytest.raises(ValueError, match=r"train.t_max=\d+ must be below diffusion.schedule.num_timesteps="):
        diffusion_task(config, num_steps=10, model=TimeScaledNet())
