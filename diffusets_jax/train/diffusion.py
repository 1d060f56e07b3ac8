"""Latent-diffusion (U-Net) training (reference sections 6-7) on precomputed VAE posteriors.

Each step draws z = (mean + exp(logvar / 2) eps) * `diffusion.latent_scale` (the published 0.18215) from the
stored posterior (a fresh eps every step, as the reference encodes on the fly), t uniform in [1, 998], and
minimises the epsilon (or v, `diffusion.schedule.prediction_type`) loss with the reference's reduction (squared
error summed over the latent, averaged over the batch). AdamW with cosine decay to 0.1 x the learning rate,
stepped per batch (`config.optimizer`).

Improvements, each off in the faithful config: classifier-free-guidance condition dropout
(`train.cond_dropout` > 0, fixed null condition of `diffusion.guidance`), normalised patient features
(`train.patient_features = "normalised"`: sex, age / 100, heart rate / 100; "none" for the ablation without
patient information), EMA params, bf16 compute, `prediction_type = "v_prediction"` (v = sqrt(abar) eps -
sqrt(1 - abar) x0: an epsilon error at high noise is magnified sqrt((1 - abar) / abar), up to ~25x, in the predicted x0, a
v error is not), and `diffusion.scale_by_std`: `run_training` measures the latent scale that gives unit-variance
latents (latent diffusion's recipe, for a VAE trained from scratch) and stores it in `diffusion.latent_scale` and
the model directory. Validation: the loss at fixed timesteps (`train.eval_timesteps`) with fixed noise,
comparable across runs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusets_jax.conditioning.patient import FEATURE_SCALES
from diffusets_jax.config import module_fields
from diffusets_jax.diffusion import guidance
from diffusets_jax.diffusion.schedule import (
    DiffusionSpec,
    LossConfig,
    diffusion_loss,
    make_schedule,
    q_sample,
    reduce_squared_error,
    training_target,
)
from diffusets_jax.ecg.shapes import LATENT_SHAPE
from diffusets_jax.models.precision import cast_floating, with_compute_dtype
from diffusets_jax.models.vae import VAE
from diffusets_jax.train.loop import Task
from diffusets_jax.train.optim import learning_rate_schedule, make_optimizer

# "normalised": the U-Net sees (sex, age / 100, heart rate / 100), values of order 1 like the text embedding.


def diffusion_spec(config: ml_collections.ConfigDict, latent_std: float | None = None) -> DiffusionSpec:
    """The resolved `config.diffusion` section as the model directory records it."""
    from diffusets_jax.config import config_to_dict

    return DiffusionSpec.from_json({**config_to_dict(config)["diffusion"], "latent_std": latent_std},
                                   "config.diffusion")


def build_unet(config: ml_collections.ConfigDict):
    """The U-Net from `config.model` (its fields; empty = the published model)."""
    from diffusets_jax.models.unet import UNet

    return UNet(**module_fields(config))


def patient_condition(batch: dict[str, jax.Array], mode: str) -> dict[str, jax.Array]:
    """The U-Net's condition pytree `{text_embedding (batch, D), sex, age, heart_rate (batch,)}`, float32."""
    if mode not in FEATURE_SCALES:
        raise ValueError(f"train.patient_features must be one of {sorted(FEATURE_SCALES)}, got {mode!r}")
    sex_scale, age_scale, hr_scale = FEATURE_SCALES[mode]
    return {
        "text_embedding": batch["text_embedding"].astype(jnp.float32),
        "sex": batch["sex"].astype(jnp.float32) * sex_scale,
        "age": batch["age"].astype(jnp.float32) * age_scale,
        "heart_rate": batch["heart_rate"].astype(jnp.float32) * hr_scale,
    }


def diffusion_task(config: ml_collections.ConfigDict, num_steps: int, model: Any = None) -> Task:
    """Task for `diffusets-jax train unet`.

    Batches: `{"latent_mean", "latent_logvar": (batch, 128, 4), "text_embedding": (batch, D),
    "sex", "age", "heart_rate": (batch,)}` (the latent dataset's fields). `model` defaults to the U-Net of
    `config.model`; any Flax module with the U-Net's call signature and a `text_dim` field works.
    """
    tc = config.train
    model = build_unet(config) if model is None else model
    spec = diffusion_spec(config)
    noise_schedule = make_schedule(spec.schedule)
    loss_cfg = LossConfig(t_min=int(tc.t_min), t_max=int(tc.t_max), reduction=str(tc.loss_reduction))
    if loss_cfg.t_max >= noise_schedule.num_timesteps:
        # Otherwise found only when the first step is traced, after the workdir was claimed, in a line naming
        # no config key (e.g. `diffusion.schedule.num_timesteps=500` with the recipes' t_max of 998).
        raise ValueError(f"train.t_max={loss_cfg.t_max} must be below diffusion.schedule.num_timesteps="
                         f"{noise_schedule.num_timesteps} (the schedule's last timestep is "
                         f"{noise_schedule.num_timesteps - 1}): lower --config.train.t_max")
    lr_schedule = learning_rate_schedule(config.optimizer, num_steps)
    compute_dtype = jnp.dtype(tc.compute_dtype)
    # bf16 compute: the U-Net's layers in bf16 (norms, softmax and the condition projection in float32), the
    # loss in float32, master parameters and optimiser state in float32.
    compute_model = with_compute_dtype(model, compute_dtype)
    cond_dropout = float(tc.cond_dropout)
    mode = str(tc.patient_features)
    patient_condition({"text_embedding": jnp.zeros((1, 1)), **{k: jnp.zeros(1) for k in ("sex", "age", "heart_rate")}},
                      mode)  # validate the mode now
    null_cond = guidance.fixed_null_condition(model.text_dim)
    eval_timesteps = tuple(int(t) for t in tc.eval_timesteps)
    timesteps = int(noise_schedule.num_timesteps)
    if not eval_timesteps or not all(0 <= t < timesteps for t in eval_timesteps):
        # An index past the schedule's end is clamped by JAX's gather: the validation loss would silently be
        # that of the last timestep.
        raise ValueError(f"train.eval_timesteps must be timesteps from 0 to {timesteps - 1} of the {timesteps}-step "
                         f"schedule, got {tuple(tc.eval_timesteps)}")
    latent_scale = spec.latent_scale

    def init_variables(key: jax.Array) -> dict[str, Any]:
        zeros = jnp.zeros((1,))
        return model.init(key, jnp.zeros((1, *LATENT_SHAPE)), jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1, model.text_dim)), zeros, zeros, zeros)

    def model_fn(params, model_state):
        variables = {"params": cast_floating(params, compute_dtype), **model_state}

        def apply(x_t, t, cond):
            out = compute_model.apply(variables, x_t.astype(compute_dtype), t, cond["text_embedding"].astype(compute_dtype),
                              cond["sex"], cond["age"], cond["heart_rate"])
            return out.astype(jnp.float32)

        return apply

    def loss_fn(params, model_state, batch, key, step):
        latent_key, dropout_key, loss_key = jax.random.split(key, 3)
        x0 = VAE.sample_latent(batch["latent_mean"].astype(jnp.float32), batch["latent_logvar"].astype(jnp.float32),
                               latent_key, latent_scale)
        cond = patient_condition(batch, mode)
        if cond_dropout > 0:
            cond = guidance.drop_conditions(cond, dropout_key, cond_dropout, null_cond)
        loss = diffusion_loss(noise_schedule, model_fn(params, model_state), x0, cond, loss_key, loss_cfg)
        return loss, ({}, model_state)

    def eval_fn(params, model_state, batch, key):
        latent_key, noise_key = jax.random.split(key)
        x0 = batch["latent_mean"].astype(jnp.float32) * latent_scale  # posterior mean: no sampling noise
        cond = patient_condition(batch, mode)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        # One model call over every (example, timestep) pair, (batch * k, 128, 4) example-major: the program holds
        # one copy of the U-Net, not one per timestep (the demo U-Net's eval compiled in 4.1-5.2 s instead of
        # 8.1-8.6 with three), and each device's rows stay on it. The same noise at every timestep.
        n, k = x0.shape[0], len(eval_timesteps)

        def repeat(a):  # (n, ...) -> (n * k, ...), row b * k + i = example b
            return jnp.repeat(a, k, axis=0)

        t = jnp.tile(jnp.asarray(eval_timesteps, jnp.int32), n)  # row b * k + i: timestep i
        x0_k, noise_k = repeat(x0), repeat(noise)
        x_t = q_sample(noise_schedule, x0_k, t, noise_k)
        prediction = model_fn(params, model_state)(x_t, t, jax.tree.map(repeat, cond)).reshape(n, k, *x0.shape[1:])
        target = training_target(noise_schedule, x0_k, t, noise_k).reshape(n, k, *x0.shape[1:])
        return {f"loss_t{t_value:03d}": reduce_squared_error(prediction[:, i], target[:, i], loss_cfg.reduction)
                for i, t_value in enumerate(eval_timesteps)}

    return Task("unet", init_variables, loss_fn, make_optimizer(config.optimizer, lr_schedule), lr_schedule, eval_fn,
                model)
