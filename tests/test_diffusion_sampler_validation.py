"""Samplers at every latent scale (diffusets_jax/diffusion/sampler_validation.py, issue 16).

On Gaussian latents N(m, s^2) the optimal predictor is known in closed form and every sampler here is affine
in its random inputs, so the exact mean and std of what a sampler returns can also be computed without Monte
Carlo. `exact_moments` does that independently of the package, in the variance-exploding coordinates
y = x / sqrt(abar) with noise level sigma = sqrt((1 - abar) / abar), from the published update rules:
DDIM (Song et al. 2021, eq. 12), DPM-Solver++(2M) (Lu et al. 2022, alg. 2) and the second-order final step
(the noise prediction extrapolated linearly in sigma to sigma = 0)."""

import dataclasses
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.diffusion.sampler_validation import (
    MEAN_ERROR_TOLERANCE,
    STD_RATIO_TOLERANCE,
    gaussian_optimal_model_fn,
    validate_sampler,
    validated_settings,
)
from diffusets_jax.diffusion.samplers import (
    SamplerConfig,
    resolve_for_model,
    sample,
    sampler_config,
    sampler_timesteps,
)
from diffusets_jax.diffusion.schedule import DiffusionSpec, ScheduleConfig, make_schedule

SAMPLES = 1024  # x 512 latent values: std known to 0.1 %, mean to 0.0014 s
SCHEDULES = {kind: make_schedule(ScheduleConfig(prediction_type=kind)) for kind in ("epsilon", "v_prediction")}


def exact_moments(config, schedule, s, m, *, start="data"):
    """(std, mean) of the sampler's output, exactly. The state is tracked as coefficients over independent
    standard normals [z (start), xi_0 … xi_n (per-step noise)] plus a constant."""
    timesteps = sampler_timesteps(config, schedule)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[timesteps]
    sig = np.sqrt((1 - abar) / abar)
    n = len(timesteps)
    coef, const = np.zeros(n + 1), 0.0
    if start == "data":  # y_T = m + sqrt(s^2 + sigma_T^2) z
        coef[0], const = np.sqrt(s**2 + sig[0] ** 2), m
    else:  # x_T = z ~ N(0, I), y_T = z / sqrt(abar_T)
        coef[0] = 1 / np.sqrt(abar[0])
    history = []  # (sigma, D, eps) of earlier evaluations, each as (coef, const)
    for i in range(n):
        shrink = s**2 / (s**2 + sig[i] ** 2)  # D(y) = m + shrink (y - m)
        d = (shrink * coef, m + shrink * (const - m))
        eps = ((coef - d[0]) / sig[i], (const - d[1]) / sig[i])
        if i == n - 1:  # to the clean end
            coef, const = d
            if config.final_step_order == 2 and history:
                sig_prev, _, eps_prev = history[-1]
                slope = ((eps[0] - eps_prev[0]) / (sig[i] - sig_prev), (eps[1] - eps_prev[1]) / (sig[i] - sig_prev))
                coef, const = coef + sig[i] ** 2 / 2 * slope[0], const + sig[i] ** 2 / 2 * slope[1]
            break
        nxt = sig[i + 1]
        if config.sampler == "ddim":
            abar_next = abar[i + 1]
            noise_vp = config.eta * np.sqrt((1 - abar_next) / (1 - abar[i]) * (1 - abar[i] / abar_next))
            noise = noise_vp / np.sqrt(abar_next)  # the same noise in y
            direction = np.sqrt(max(nxt**2 - noise**2, 0.0))
            coef, const = d[0] + direction * eps[0], d[1] + direction * eps[1]
            coef[1 + i] += noise
        else:
            ratio = nxt / sig[i]  # e^{-h}
            coef, const = ratio * coef + (1 - ratio) * d[0], ratio * const + (1 - ratio) * d[1]
            if history:
                sig_prev, d_prev, _ = history[-1]
                r = np.log(sig_prev / sig[i]) / np.log(sig[i] / nxt)
                weight = (1 - ratio) / (2 * r)
                coef, const = coef + weight * (d[0] - d_prev[0]), const + weight * (d[1] - d_prev[1])
        history.append((sig[i], d, eps))
    return float(np.sqrt(np.sum(coef**2))), const


# -- the acceptance criterion ------------------------------------------------------------------------------


CASES = [  # (data std, data mean): the published latents' scale and around it, means away from 0
    (0.1, 0.3), (0.18, -0.36), (0.21, 0.105), (0.5, -1.5), (1.0, 0.7),
]


@pytest.mark.parametrize(
    "sampler,std,mean,prediction_type",
    [(sampler, std, mean, "epsilon") for sampler in ("dpmpp_2m", "ddim") for std, mean in CASES]
    # v prediction at the ends of the range: the solver sees the same x0 and eps, through the other conversion
    + [(sampler, std, mean, "v_prediction") for sampler in ("dpmpp_2m", "ddim") for std, mean in CASES[::4]],
)
def test_default_samplers_reproduce_gaussian_latents_at_every_scale(sampler, std, mean, prediction_type):
    """DPM-Solver++ at 20 steps and DDIM at 50 (given the latents' std), as `sampler_config` sets them up, are
    within 3 % of the data's std and 0.01 std of its mean, for epsilon and v prediction."""
    config = sampler_config(sampler, data_std=std)
    assert config.steps == {"dpmpp_2m": 20, "ddim": 50}[sampler]
    result = validate_sampler(config, SCHEDULES[prediction_type], mean, std, samples=SAMPLES)
    assert abs(result["std_ratio"] - 1) < STD_RATIO_TOLERANCE, result
    assert abs(result["mean_error"]) < MEAN_ERROR_TOLERANCE, result
    assert result["passed"]



@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
def test_default_samplers_map_each_start_exactly(sampler, prediction_type):
    """Deterministic samplers on Gaussian latents are affine maps of their start, y_T = m + sqrt(s^2 + sigma_T^2) z
    -> exact_std z + exact_mean (`exact_moments`): every sample, not only the spread, must follow it. The float32
    chain does to 6e-6 std (2026-12-06); a chain state rounded to bf16 after every step was off by 0.056 std, and
    DPM-Solver++ taking its second step first order by 3.2e-5, both invisible to the moment checks."""
    std, mean = 0.18, 0.36
    config = dataclasses.replace(sampler_config(sampler, data_std=std), latent_shape=(256, 1))
    schedule = SCHEDULES[prediction_type]
    exact_std, exact_mean = exact_moments(config, schedule, std, mean)
    abar = float(schedule.alphas_cumprod[int(sampler_timesteps(config, schedule)[0])])
    z = np.asarray(jax.random.normal(jax.random.key(0), (4, 256, 1)), np.float64)
    start = jnp.asarray(np.sqrt(abar) * mean + np.sqrt(abar * std**2 + 1 - abar) * z, jnp.float32)
    out = sample(gaussian_optimal_model_fn(schedule, mean, std), schedule, {"index": jnp.arange(4)},
                 jax.random.key(1), config, initial_latents=start)
    error = np.abs(np.asarray(out, np.float64) - (exact_std * z + exact_mean)) / std
    assert error.max() < 2e-5, error.max()

@pytest.mark.parametrize(
    "settings,std,known",
    [
        # the table: uniform-in-t grids and a first-order final step make small-scale data flat
        ({"sampler": "dpmpp_2m", "steps": 20, "timestep_spacing": "trailing", "final_step_order": 1}, 0.1, 0.38),
        ({"sampler": "ddim", "steps": 50, "timestep_spacing": "trailing", "final_step_order": 1}, 0.21, 0.80),
        # the final step alone: from sigma_0 = 0.029 a first-order step returns the posterior mean, s / sqrt(s^2 +
        # sigma_0^2) = 0.96 of the spread at s = 0.1, on top of what the grid before it does (here +0.3 %)
        ({"sampler": "dpmpp_2m", "steps": 50, "timestep_spacing": "logsnr", "final_step_order": 1}, 0.1, 0.96),
        ({"sampler": "dpmpp_2m", "steps": 20, "timestep_spacing": "karras"}, 0.5, None),
        ({"sampler": "dpmpp_2m", "steps": 20}, 0.1, None),
        ({"sampler": "ddim", "steps": 50, "data_std": 0.1}, 0.1, None),
        ({"sampler": "ddim", "steps": 50, "timestep_spacing": "logsnr"}, 1.0, None),
        ({"sampler": "ddim", "steps": 20, "eta": 1.0}, 0.18, None),  # stochastic DDIM: per-step noise tracked too
        ({"sampler": "ddim", "steps": 30, "eta": 0.5, "data_std": 0.5, "final_step_order": 1}, 0.5, None),
    ],
)
def test_measured_moments_match_the_exact_sampler_moments(settings, std, known):
    config = SamplerConfig(clip_sample=False, **settings)
    schedule = SCHEDULES["epsilon"]
    mean = 2 * std
    result = validate_sampler(config, schedule, mean, std, samples=SAMPLES)
    exact_std, exact_mean = exact_moments(config, schedule, std, mean)
    assert result["std_ratio"] == pytest.approx(exact_std / std, abs=0.004)
    assert result["mean_error"] == pytest.approx((exact_mean - mean) / std, abs=0.006)
    prior_std, prior_mean = exact_moments(config, schedule, std, mean, start="prior")
    assert result["from_prior"]["std_ratio"] == pytest.approx(prior_std / std, abs=0.004)
    assert result["from_prior"]["mean_error"] == pytest.approx((prior_mean - mean) / std, abs=0.006)
    if known is not None:
        assert result["std_ratio"] == pytest.approx(known, abs=0.01) and not result["passed"]


def test_starting_from_pure_noise_keeps_the_schedules_own_mean_bias():
    """abar_999 = 0.0016, so x_999 still carries sqrt(abar_999) = 4 % of the data mean; a deterministic sampler
    started from N(0, I) carries that offset to the end, scaled by its std ratio: -0.04 m / s in std units."""
    mean, std = 1.0, 1.0
    result = validate_sampler(sampler_config("dpmpp_2m"), SCHEDULES["epsilon"], mean, std, samples=SAMPLES)
    bias = -np.sqrt(float(SCHEDULES["epsilon"].alphas_cumprod[999])) * mean / std * result["std_ratio"]
    assert result["from_prior"]["mean_error"] == pytest.approx(bias, abs=0.004) and bias < -0.035
    assert abs(result["mean_error"]) < MEAN_ERROR_TOLERANCE



def test_the_model_directs_the_grid_and_a_converted_checkpoint_gets_the_published_scale():
    """`resolve_for_model` fills what a sampler left to the model: DDIM's grid follows the model's measured latent
    std, and a converted checkpoint (no std recorded) gets one whose DDIM-50 grid passes the Gaussian check at the
    published latents' std 0.18 (exactly: `exact_moments`). A grid for unit-variance latents is 5.5 % flat there."""
    measured = resolve_for_model(sampler_config("ddim"), DiffusionSpec(latent_std=0.3, clip_sample=False))
    assert (measured.data_std, measured.effective_timestep_spacing, measured.clip_sample) == (0.3, "data_std", False)
    explicit = sampler_config("ddim", data_std=0.5, clip_sample=True)
    assert resolve_for_model(explicit, DiffusionSpec(latent_std=0.3)) == explicit
    converted = resolve_for_model(sampler_config("ddim"), DiffusionSpec())
    exact_std, _ = exact_moments(converted, SCHEDULES["epsilon"], 0.18, 0.0)
    assert abs(exact_std / 0.18 - 1) < STD_RATIO_TOLERANCE, exact_std / 0.18

@pytest.mark.parametrize("steps", [50, 100])
def test_ddpm_with_fewer_steps_is_as_right_as_the_published_chain_at_the_published_scale(steps):
    """DDPM with fewer than its 1000 steps (100: the posterior sampler's default chain) on a grid even in t was
    flat at latent std 0.18 (std ratio 0.81 at 100 steps, 0.72 at 50) where the published 1000-step chain gives
    0.959: its default grid, set from the model's latent std, stays within 1.5 % of the published chain."""
    std, mean = 0.18, -0.36
    schedule = SCHEDULES["epsilon"]

    def ratio(config):
        config = resolve_for_model(config, DiffusionSpec(latent_std=std, clip_sample=False))
        result = validate_sampler(config, schedule, mean, std, samples=256)
        assert abs(result["mean_error"]) < MEAN_ERROR_TOLERANCE
        return result["std_ratio"]

    published = ratio(sampler_config("ddpm"))
    assert abs(published - 0.959) < 0.01  # the README's figure for the published chain
    fewer = ratio(sampler_config("ddpm", steps=steps))
    assert abs(fewer - published) < 0.015, (fewer, published)


# -- the record and its inputs -----------------------------------------------------------------------------------


def test_validated_settings_is_a_json_record_of_what_was_checked():
    config = sampler_config("ddim", data_std=0.18)
    record = validated_settings(config, SCHEDULES["epsilon"], 0.05, 0.18, samples=256,
                                date=datetime.date(2025, 3, 1))
    assert json.loads(json.dumps(record)) == record
    assert {key: record[key] for key in ("sampler", "steps", "timestep_spacing", "final_step_order", "eta",
                                         "data_std", "prediction_type", "latent_mean", "latent_std", "date")} == {
        "sampler": "ddim", "steps": 50, "timestep_spacing": "data_std", "final_step_order": 2, "eta": 0.0,
        "data_std": 0.18, "prediction_type": "epsilon", "latent_mean": 0.05, "latent_std": 0.18, "date": "2025-03-01"}
    assert record["passed"] is True and abs(record["std_ratio"] - 0.979) < 0.01
    assert record["std_ratio_tolerance"] == STD_RATIO_TOLERANCE and record["mean_error_tolerance"] == MEAN_ERROR_TOLERANCE
    failing = validated_settings(SamplerConfig(sampler="dpmpp_2m", timestep_spacing="trailing", final_step_order=1,
                                               clip_sample=False), SCHEDULES["epsilon"], 0.0, 0.18, samples=256)
    assert failing["passed"] is False and failing["std_ratio"] < 0.65
    assert failing["date"] == datetime.date.today().isoformat()


def test_guidance_does_not_change_the_check():
    plain = validate_sampler(sampler_config("dpmpp_2m"), SCHEDULES["epsilon"], 0.1, 0.2, samples=64)
    guided = validate_sampler(sampler_config("dpmpp_2m", guidance_scale=4.0), SCHEDULES["epsilon"], 0.1, 0.2, samples=64)
    assert guided == plain


@pytest.mark.parametrize(
    "mean,std,samples,config,match",
    [
        (0.0, 0.0, 64, SamplerConfig.fast(), "latent_std must be a positive number"),
        (0.0, float("inf"), 64, SamplerConfig.fast(), "latent_std must be a positive number"),
        (float("nan"), 1.0, 64, SamplerConfig.fast(), "latent_mean must be a finite number"),
        (0.0, 1.0, 4, SamplerConfig.fast(), "samples must be >= 16"),
        (0.0, 1.0, 64, sampler_config("ddpm"), "clip_sample is None"),
    ],
)
def test_bad_inputs_are_one_line_errors(mean, std, samples, config, match):
    with pytest.raises(ValueError, match=match):
        validate_sampler(config, SCHEDULES["epsilon"], mean, std, samples=samples)


def test_a_models_fast_sampler_defaults_are_validated_at_its_latent_scale():
    from diffusets_jax.diffusion.sampler_validation import PUBLISHED_LATENT_STD, validate_model_defaults
    from diffusets_jax.diffusion.schedule import DiffusionSpec

    record = validate_model_defaults(DiffusionSpec(latent_std=0.3), latent_mean=-0.2)
    by_name = {v["sampler"]: v for v in record["validated"]}
    assert set(by_name) == {"dpmpp_2m", "ddim"} and all(v["passed"] for v in by_name.values())
    assert by_name["ddim"]["data_std"] == 0.3 and by_name["dpmpp_2m"]["latent_mean"] == pytest.approx(-0.2)
    assert record["latent_std_source"].startswith("measured")
    assumed = validate_model_defaults(DiffusionSpec())
    assert assumed["latent_std_source"].startswith("assumed")
    assert {v["latent_std"] for v in assumed["validated"]} == {PUBLISHED_LATENT_STD}
