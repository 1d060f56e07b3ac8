"""Diffusion core: noise schedule and losses, DDPM / DDIM / DPM-Solver++ samplers, classifier-free guidance."""

from diffusets_jax.diffusion.guidance import drop_conditions, fixed_null_condition, guided_model_fn
from diffusets_jax.diffusion.samplers import (
    SamplerConfig,
    ddim_step,
    ddpm_step,
    generate,
    jit_generate,
    make_timesteps,
    sample,
    unet_model_fn,
    vae_decode_fn,
)
from diffusets_jax.diffusion.schedule import (
    FAITHFUL_LOSS,
    FAITHFUL_SCHEDULE,
    LossConfig,
    NoiseSchedule,
    ScheduleConfig,
    diffusion_loss,
    make_schedule,
    predict_x0_and_eps,
    q_sample,
)

__all__ = [
    "FAITHFUL_LOSS",
    "FAITHFUL_SCHEDULE",
    "LossConfig",
    "NoiseSchedule",
    "SamplerConfig",
    "ScheduleConfig",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "drop_conditions",
    "fixed_null_condition",
    "generate",
    "guided_model_fn",
    "jit_generate",
    "make_schedule",
    "make_timesteps",
    "predict_x0_and_eps",
    "q_sample",
    "sample",
    "unet_model_fn",
    "vae_decode_fn",
]
