"""The Gaussian check of sampler settings: does a sampler reproduce the data's spread at the model's latent scale?

For data x0 ~ N(m, s^2 I) the optimal network is known in closed form,
E[x0 | x_t] = m + s^2 sqrt(abar) (x_t - sqrt(abar) m) / (abar s^2 + 1 - abar), so a sampler's own error can be
measured without a trained model: run it with that predictor and compare the samples' mean and standard
deviation with m and s. Samplers that take too few steps where the noise level sqrt((1 - abar) / abar) is
near s return samples that are too flat (std ratio below 1); that is what this catches.

The chain starts from the exact noised distribution at its first timestep, N(sqrt(abar) m, abar s^2 + 1 - abar),
so the check measures the solver and its grid. Generation starts from N(0, I) instead; that adds the schedule's
own error (the published schedule ends at abar_999 = 0.0016, not 0, so the first latent should still carry
4 % of the data's mean), which deterministic samplers carry to the end and ancestral DDPM mostly forgets;
it is reported separately as `from_prior`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.diffusion.samplers import (
    PUBLISHED_LATENT_STD,
    ModelFn,
    SamplerConfig,
    sample,
    sampler_timesteps,
)
from diffusets_jax.diffusion.schedule import NoiseSchedule

STD_RATIO_TOLERANCE = 0.03  # |sample std / data std - 1|
MEAN_ERROR_TOLERANCE = 0.01  # |sample mean - data mean| / data std
VALIDATION_SAMPLES = 4096  # x (128, 4) latent values: the std is estimated to 0.05 %, the mean to 0.0007 std


def gaussian_optimal_model_fn(schedule: NoiseSchedule, data_mean: float, data_std: float) -> ModelFn:
    """The exact optimal network output (noise or v, as `schedule.prediction_type` says) for x0 ~ N(data_mean,
    data_std^2 I): `model_fn(x_t (B, ...), t (B,), cond) -> (B, ...)`, cond ignored."""

    def model_fn(x_t: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        abar = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        x0 = data_mean + data_std**2 * alpha * (x_t - alpha * data_mean) / (abar * data_std**2 + 1.0 - abar)
        eps = (x_t - alpha * x0) / sigma
        return eps if schedule.prediction_type == "epsilon" else alpha * eps - sigma * x0

    return model_fn


def _check_inputs(config: SamplerConfig, latent_mean: float, latent_std: float, samples: int) -> None:
    if not (math.isfinite(latent_std) and latent_std > 0):
        raise ValueError(f"validate_sampler: latent_std must be a positive number, got {latent_std}")
    if not math.isfinite(latent_mean):
        raise ValueError(f"validate_sampler: latent_mean must be a finite number, got {latent_mean}")
    if samples < 16:
        raise ValueError(f"validate_sampler: samples must be >= 16 for a meaningful std estimate, got {samples}")
    if config.clip_sample is None:
        raise ValueError("validate_sampler: config.clip_sample is None ('as the model directs'): resolve it to "
                         "True or False as the model's generation settings say")


def validate_sampler(config: SamplerConfig, schedule: NoiseSchedule, latent_mean: float, latent_std: float, *,
                     samples: int = VALIDATION_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """Run `config` on Gaussian latents N(latent_mean, latent_std^2) with the exact optimal predictor.

    samples: batch of latents `(samples, 128, 4)`, every value an independent draw. Guidance is left out
    (it changes the target, not the solver). Returns std_ratio (sample std / latent_std), mean_error
    ((sample mean - latent_mean) / latent_std), passed (within STD_RATIO_TOLERANCE and MEAN_ERROR_TOLERANCE),
    and from_prior: the same two numbers when the chain starts from N(0, I) as generation does.
    """
    latent_mean, latent_std = float(latent_mean), float(latent_std)
    _check_inputs(config, latent_mean, latent_std, samples)
    config = dataclasses.replace(config, guidance_scale=1.0)
    abar = float(schedule.alphas_cumprod[int(sampler_timesteps(config, schedule)[0])])
    model_fn = gaussian_optimal_model_fn(schedule, latent_mean, latent_std)
    cond = {"index": jnp.arange(samples)}  # only sets the batch size

    @jax.jit
    def run(initial_latents: jax.Array, key: jax.Array) -> jax.Array:
        return sample(model_fn, schedule, cond, key, config, initial_latents=initial_latents)

    init_key, chain_key = jax.random.split(jax.random.key(seed))
    z = jax.random.normal(init_key, (samples,) + tuple(config.latent_shape), jnp.float32)
    noised_data = math.sqrt(abar) * latent_mean + math.sqrt(abar * latent_std**2 + 1.0 - abar) * z

    def moments(latents: jax.Array) -> dict[str, float]:
        values = np.asarray(latents, np.float64)
        return {"std_ratio": float(values.std() / latent_std),
                "mean_error": float((values.mean() - latent_mean) / latent_std)}

    exact_start = moments(run(noised_data, chain_key))
    passed = (abs(exact_start["std_ratio"] - 1.0) <= STD_RATIO_TOLERANCE
              and abs(exact_start["mean_error"]) <= MEAN_ERROR_TOLERANCE)
    return {"latent_mean": latent_mean, "latent_std": latent_std, "values": int(z.size), **exact_start,
            "passed": bool(passed), "from_prior": moments(run(z, chain_key))}


def validated_settings(config: SamplerConfig, schedule: NoiseSchedule, latent_mean: float, latent_std: float, *,
                       samples: int = VALIDATION_SAMPLES, seed: int = 0,
                       date: datetime.date | None = None) -> dict[str, Any]:
    """The JSON-ready record of `validate_sampler` for a model directory: which settings were checked, at which
    latent mean and std, what they gave and whether they passed, and when."""
    result = validate_sampler(config, schedule, latent_mean, latent_std, samples=samples, seed=seed)
    return {
        "sampler": config.sampler,
        "steps": config.steps,
        "timestep_spacing": config.effective_timestep_spacing,
        "final_step_order": config.final_step_order,
        "eta": config.eta,
        "data_std": config.data_std,
        "clip_sample": config.clip_sample,
        "prediction_type": schedule.prediction_type,
        "check": "closed-form optimal predictor on Gaussian latents, chain started from the noised data",
        "latent_mean": result["latent_mean"],
        "latent_std": result["latent_std"],
        "std_ratio": round(result["std_ratio"], 4),
        "mean_error": round(result["mean_error"], 4),
        "std_ratio_tolerance": STD_RATIO_TOLERANCE,
        "mean_error_tolerance": MEAN_ERROR_TOLERANCE,
        "passed": result["passed"],
        "from_prior": {name: round(value, 4) for name, value in result["from_prior"].items()},
        "date": (date or datetime.date.today()).isoformat(),
    }


def validate_model_defaults(diffusion: Any, latent_mean: float = 0.0) -> dict[str, Any]:
    """The model directory's `sampling` record: the fast samplers' defaults (`sampler_config("dpmpp_2m")` and
    `sampler_config("ddim")` at the model's latent std) checked at the model's latent mean and std.

    `diffusion` is the U-Net's `DiffusionSpec`; without a measured `latent_std` the published scale is assumed and
    the record says so. The faithful 1000-step DDPM is the reference path and is not re-validated here.
    """
    from diffusets_jax.diffusion.samplers import sampler_config
    from diffusets_jax.diffusion.schedule import make_schedule

    measured = diffusion.latent_std is not None
    std = float(diffusion.latent_std) if measured else PUBLISHED_LATENT_STD
    schedule = make_schedule(diffusion.schedule)
    validated = [validated_settings(sampler_config(name, data_std=std), schedule, latent_mean, std)
                 for name in ("dpmpp_2m", "ddim")]
    return {"latent_std_source": "measured on the training latents at export" if measured else
            f"assumed: the published model's latent std on MIMIC-IV-ECG (~{PUBLISHED_LATENT_STD})",
            "validated": validated}
