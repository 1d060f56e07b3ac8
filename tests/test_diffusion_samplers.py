"""Samplers (diffusets_jax/diffusion/samplers.py): reference DDPM step parity, and sampler correctness on
Gaussian data, where the optimal noise predictor is known in closed form, so no trained model is needed."""

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffusets_jax.diffusion.guidance import fixed_null_condition
from diffusets_jax.diffusion.sampler_validation import (
    MEAN_ERROR_TOLERANCE,
    STD_RATIO_TOLERANCE,
    gaussian_optimal_model_fn,
)
from diffusets_jax.diffusion.samplers import (
    DEFAULT_STEPS,
    SamplerConfig,
    ddim_step,
    ddpm_step,
    generate,
    jit_generate,
    make_timesteps,
    sample,
    sampler_config,
    sampler_timesteps,
    unet_model_fn,
    vae_decode_fn,
)
from diffusets_jax.diffusion.schedule import NoiseSchedule, ScheduleConfig, make_schedule
from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE
from tests.helpers.jaxprs import equations

VECTORS = Path(__file__).parent / "data" / "reference_vectors.npz"
MU, STD = 0.3, 1.0  # unit variance, as the 0.18215-scaled VAE latents are meant to be


def gaussian_model_fn(schedule: NoiseSchedule, std: float):
    """Optimal (posterior-mean) predictor for x0 ~ N(cond["mu"], std^2 I).

    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar std^2 + 1 - abar); for v-prediction
    E[v | x_t] = sqrt(abar) E[eps] - sqrt(1 - abar) E[x0], both linear in the exact posterior means.
    """

    def model_fn(x_t, t, cond):
        abar = schedule.alphas_cumprod[t][:, None, None]
        mu = cond["mu"][:, None, None]
        eps = jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * std**2 + 1 - abar)
        if schedule.prediction_type == "epsilon":
            return eps
        x0 = (x_t - jnp.sqrt(1 - abar) * eps) / jnp.sqrt(abar)
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0

    return model_fn


@functools.cache
def _compiled_sampler(config, std, prediction_type):
    schedule = make_schedule(ScheduleConfig(prediction_type=prediction_type))
    return jax.jit(functools.partial(sample, gaussian_model_fn(schedule, std), schedule, config=config))


def run_sampler(config, batch=64, mu=MU, std=STD, key=0, prediction_type="epsilon"):
    """Samples `(batch, 128, 4)` of the Gaussian model; compiled once per (config, std, prediction type)."""
    cond = {"mu": jnp.full((batch,), mu, jnp.float32)}
    return np.asarray(_compiled_sampler(config, std, prediction_type)(cond, jax.random.key(key)))


# -- reference parity -------------------------------------------------------------------------------


def _reference_steps():
    vectors = np.load(VECTORS)
    to_ours = lambda a: jnp.asarray(np.swapaxes(a, -1, -2))  # (.., 4, 128) -> channels-last (.., 128, 4)
    to_ref = lambda a: np.swapaxes(np.asarray(a), -1, -2)
    for i, t in enumerate(vectors["ddpm_t"]):
        inputs = (to_ours(vectors["ddpm_model_output"][i]), int(t), to_ours(vectors["ddpm_sample"][i]),
                  to_ours(vectors["ddpm_noise"][i]))
        yield int(t), inputs, to_ref, vectors["ddpm_prev_sample"][i], vectors["ddpm_pred_x0"][i]


def test_ddpm_step_matches_reference_scheduler():
    """Op by op (as PyTorch runs it) the step reproduces diffusers' DDPMScheduler.step to float32 rounding."""
    schedule = make_schedule()
    for _, (model_output, t, x_t, noise), to_ref, prev_ref, x0_ref in _reference_steps():
        prev, x0 = ddpm_step(schedule, model_output, t, x_t, noise)
        np.testing.assert_allclose(to_ref(prev), prev_ref, rtol=0, atol=1e-6, err_msg=f"t={t}")
        np.testing.assert_allclose(to_ref(x0), x0_ref, rtol=0, atol=1e-6, err_msg=f"t={t}")


def test_jitted_ddpm_step_matches_reference_scheduler():
    """Compiled, XLA fuses the step (fused multiply-add, rsqrt). x_prev, what the chain carries, stays within
    1e-6; predicted x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies one rounding of the numerator by
    1 / sqrt(abar) (14.6 at t = 999), so it is held to 1e-6 of that scale."""
    schedule = make_schedule()
    step = jax.jit(ddpm_step)
    for _, (model_output, t, x_t, noise), to_ref, prev_ref, x0_ref in _reference_steps():
        prev, x0 = step(schedule, model_output, t, x_t, noise)
        np.testing.assert_allclose(to_ref(prev), prev_ref, rtol=0, atol=1e-6, err_msg=f"t={t}")
        x0_scale = 1.0 / np.sqrt(float(schedule.alphas_cumprod[t]))
        np.testing.assert_allclose(to_ref(x0), x0_ref, rtol=0, atol=1e-6 * x0_scale, err_msg=f"t={t}")


def test_ddpm_step_adds_no_noise_at_t0_and_clips_x0():
    schedule = make_schedule()
    x = jnp.full((1, 128, 4), 3.0)
    eps = jnp.zeros_like(x)
    noise = jnp.ones_like(x)
    prev, x0 = ddpm_step(schedule, eps, 0, x, noise)
    assert float(jnp.max(x0)) == 1.0 and float(jnp.max(prev)) == pytest.approx(1.0)  # clipped x0, no noise
    _, x0_free = ddpm_step(schedule, eps, 0, x, noise, clip_sample=False)
    assert float(x0_free[0, 0, 0]) == pytest.approx(3.0 / np.sqrt(float(schedule.alphas_cumprod[0])), rel=1e-6)


def test_ddim_eta0_step_is_deterministic_and_exact_for_a_perfect_prediction():
    schedule = make_schedule()
    x0 = jnp.linspace(-1, 1, 512).reshape(1, 128, 4)
    eps = jnp.cos(jnp.arange(512.0)).reshape(1, 128, 4)
    abar = schedule.alphas_cumprod
    x_t = jnp.sqrt(abar[700]) * x0 + jnp.sqrt(1 - abar[700]) * eps
    prev, x0_hat = ddim_step(schedule, eps, 700, 400, x_t)
    np.testing.assert_allclose(prev, jnp.sqrt(abar[400]) * x0 + jnp.sqrt(1 - abar[400]) * eps, atol=1e-5)
    final, _ = ddim_step(schedule, eps, 700, -1, x_t)  # to the clean end
    np.testing.assert_allclose(final, x0, atol=1e-5)


def test_steps_refuse_a_per_sample_timestep_instead_of_stepping_the_wrong_axis():
    """The steps take one t for the batch. A `(batch,)` t, as the U-Net takes it, broadcast against the latent's
    channels: with a batch of 4 each channel silently stepped with another sample's t."""
    schedule = make_schedule()
    x, eps, noise = (jax.random.normal(jax.random.PRNGKey(i), (4, 128, 4)) for i in range(3))
    t = jnp.array([100, 300, 600, 900])
    with pytest.raises(ValueError, match=r"ddpm_step: t has shape \(4,\), expected one timestep"):
        ddpm_step(schedule, eps, t, x, noise)
    with pytest.raises(ValueError, match=r"ddpm_step: prev_t has shape \(4,\)"):
        ddpm_step(schedule, eps, 500, x, noise, t)
    with pytest.raises(ValueError, match=r"ddim_step: t has shape \(4,\)"):
        ddim_step(schedule, eps, t, t - 50, x)
    with pytest.raises(ValueError, match=r"ddim_step: prev_t has shape \(4,\)"):
        ddim_step(schedule, eps, 500, t, x)
    # A 0-d array (one element of the U-Net's t, or a scan's step) is one timestep, under jit too.
    expected, _ = ddpm_step(schedule, eps, 600, x, noise)
    stepped, _ = jax.jit(lambda t: ddpm_step(schedule, eps, t, x, noise))(t[2])
    np.testing.assert_allclose(stepped, expected, rtol=1e-6, atol=1e-6)


# -- timesteps and config -----------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_all_spacings_give_every_timestep_when_steps_equal_T(spacing):
    np.testing.assert_array_equal(make_timesteps(1000, 1000, spacing), np.arange(999, -1, -1))


def test_timestep_spacings_match_diffusers_definitions():
    np.testing.assert_array_equal(make_timesteps(1000, 50, "leading")[:3], [980, 960, 940])
    np.testing.assert_array_equal(make_timesteps(1000, 50, "trailing")[[0, 1, -1]], [999, 979, 19])
    np.testing.assert_array_equal(make_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(make_timesteps(1000, 3, "linspace"), [999, 500, 0])  # rounded, not floored: 499.5
    with pytest.raises(ValueError, match="steps"):
        make_timesteps(1000, 1001)


def test_every_step_count_gives_a_valid_grid_for_the_even_in_t_spacings():
    # a float arange over [T, 0) once gave 'trailing' a 62nd timestep, -1, for steps=61 (and 103, 121, ...)
    for spacing in ("leading", "trailing", "linspace"):
        for steps in range(1, 1001):
            timesteps = make_timesteps(1000, steps, spacing)
            assert len(timesteps) == steps and timesteps.min() >= 0 and timesteps.max() <= 999, (spacing, steps)
            assert np.all(np.diff(timesteps) < 0), (spacing, steps)
    trailing = make_timesteps(1000, 61, "trailing")
    np.testing.assert_array_equal(trailing[[0, 1, -1]], [999, 983, 15])  # 1000 - k 1000/61, rounded, minus 1


def test_sampler_config_validation_and_presets():
    assert SamplerConfig.faithful() == SamplerConfig(sampler="ddpm", steps=1000, clip_sample=True, guidance_scale=1.0)
    assert SamplerConfig.fast().sampler == "dpmpp_2m" and SamplerConfig.fast().steps == 20
    for bad in ({"sampler": "euler"}, {"timestep_spacing": "cosine"}, {"steps": 0}, {"guidance_mode": "x"}, {"eta": -1},
                {"final_step_order": 3}, {"data_std": 0.0}, {"data_std": float("nan")},
                # non-finite settings run, then every ECG comes out NaN and is skipped
                {"eta": float("inf")}, {"eta": float("nan")}, {"guidance_scale": float("nan")},
                {"guidance_scale": float("-inf")}, {"clip_range": 0.0}, {"clip_range": float("nan")}):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    with pytest.raises(ValueError, match="ddpm ends with its own"):
        SamplerConfig(sampler="ddpm", final_step_order=2)
    with pytest.raises(ValueError, match="needs data_std"):
        SamplerConfig(sampler="ddim", timestep_spacing="data_std")
    hash(SamplerConfig())  # static jit argument


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_eta_is_refused_for_samplers_that_do_not_use_it(sampler):
    """`sample --eta 1` (dpmpp_2m, the default) was recorded in the settings and gave ECGs bit-identical to eta 0."""
    with pytest.raises(ValueError, match=f"eta 1 \\(--eta\\) is DDIM's noise; the {sampler} sampler has none to set"):
        SamplerConfig(sampler=sampler, eta=1.0)
    assert SamplerConfig(sampler=sampler, eta=0.0).eta == 0.0 and SamplerConfig(sampler="ddim", eta=1.0).eta == 1.0


def test_unset_settings_resolve_to_the_samplers_validated_defaults():
    """steps and final-step order left unset take each sampler's defaults at construction; an unset grid is the
    sampler's validated one, for DDIM chosen once the latents' std is known (it may come with the model).
    The faithful chain keeps every timestep and its own final step, on any grid (fewer DDPM steps take DDIM's)."""
    faithful = SamplerConfig()
    assert (faithful.steps, faithful.effective_timestep_spacing, faithful.final_step_order) == (1000, "logsnr", 1)
    np.testing.assert_array_equal(sampler_timesteps(faithful, make_schedule()), np.arange(999, -1, -1))
    faithful_with_std = dataclasses.replace(faithful, data_std=0.18)
    assert faithful_with_std.effective_timestep_spacing == "data_std"
    np.testing.assert_array_equal(sampler_timesteps(faithful_with_std, make_schedule()), np.arange(999, -1, -1))
    fast = SamplerConfig.fast()
    assert (fast.steps, fast.effective_timestep_spacing, fast.final_step_order, fast.clip_sample) == (
        20, "logsnr", 2, False)
    assert SamplerConfig(sampler="dpmpp_2m") == dataclasses.replace(fast, clip_sample=True)
    ddim = SamplerConfig(sampler="ddim")
    assert (ddim.steps, ddim.effective_timestep_spacing, ddim.final_step_order) == (50, "logsnr", 2)  # std unknown
    with_std = dataclasses.replace(ddim, data_std=0.2)  # as a pipeline fills it in from the model directory
    assert with_std.effective_timestep_spacing == "data_std"
    np.testing.assert_array_equal(
        sampler_timesteps(with_std, make_schedule()),
        make_timesteps(1000, 50, "data_std", alphas_cumprod=np.asarray(make_schedule().alphas_cumprod), data_std=0.2))
    assert dataclasses.replace(with_std, timestep_spacing="karras").effective_timestep_spacing == "karras"
    assert SamplerConfig(sampler="dpmpp_2m", data_std=0.2).effective_timestep_spacing == "logsnr"
    assert DEFAULT_STEPS == {"ddpm": 1000, "ddim": 50, "dpmpp_2m": 20}


def test_sampler_config_helper_defaults():
    assert sampler_config("ddpm").clip_sample is None and sampler_config("ddpm").steps == 1000
    assert sampler_config("ddim", steps=7).steps == 7
    assert sampler_config("dpmpp_2m") == SamplerConfig.fast()
    assert sampler_config("ddim", data_std=0.18).effective_timestep_spacing == "data_std"
    with pytest.raises(ValueError, match="sampler must be one of ddpm, ddim, dpmpp_2m"):
        sampler_config("euler")
    with pytest.raises(ValueError, match="positive number of network evaluations"):
        sampler_config("ddim", steps=0)


# -- Gaussian-data correctness ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(SamplerConfig(clip_sample=False), id="ddpm-1000"),
        pytest.param(SamplerConfig(sampler="ddim", steps=50, clip_sample=False), id="ddim-50"),
        pytest.param(SamplerConfig(sampler="dpmpp_2m", steps=20, clip_sample=False), id="dpmpp-20"),
    ],
)
def test_samplers_reproduce_gaussian_data(config):
    # 64 x 128 x 4 = 32768 draws (sampling error of the mean 0.006, of the std 0.4 %); the rest is the
    # samplers' own error: DDIM-50 on the log-SNR grid is first order (-3 % std here), DPM-Solver++-20 second
    # order (+0.8 %); tests/test_diffusion_sampler_validation.py holds them to the issue's tolerances
    samples = run_sampler(config)
    assert samples.shape == (64, 128, 4) and samples.dtype == np.float32
    assert samples.mean() == pytest.approx(MU, abs=0.03 * STD)
    assert samples.std() == pytest.approx(STD, rel=0.04)


def test_faithful_clipped_ddpm_reproduces_gaussian_data_inside_the_clip_range():
    """x0 clipping to [-1, 1] (faithful) is harmless when the data lie inside it (3.3 std from the edge)."""
    samples = run_sampler(SamplerConfig.faithful(), mu=0.0, std=0.3)
    assert np.abs(samples).max() < 1.5
    assert samples.mean() == pytest.approx(0.0, abs=0.03 * 0.3) and samples.std() == pytest.approx(0.3, rel=0.04)


def test_dpmpp_with_v_prediction_reproduces_gaussian_data():
    samples = run_sampler(SamplerConfig(sampler="dpmpp_2m", steps=20, clip_sample=False), prediction_type="v_prediction")
    assert samples.mean() == pytest.approx(MU, abs=0.03 * STD) and samples.std() == pytest.approx(STD, rel=0.04)


def test_dpmpp_is_a_higher_order_solver_of_the_ddim_ode():
    """DDIM(eta=0) and DPM-Solver++ integrate the same probability-flow ODE. Against a 1000-step DDIM solution,
    DPM-Solver++ with 20 steps is several times closer than DDIM with 20 steps."""
    exact = run_sampler(SamplerConfig(sampler="ddim", steps=1000, clip_sample=False), batch=4)
    ddim = run_sampler(SamplerConfig(sampler="ddim", steps=20, clip_sample=False), batch=4)
    dpmpp = run_sampler(SamplerConfig(sampler="dpmpp_2m", steps=20, clip_sample=False), batch=4)
    ddim_error, dpmpp_error = np.abs(ddim - exact).max(), np.abs(dpmpp - exact).max()
    assert dpmpp_error < 0.1 and dpmpp_error < 0.4 * ddim_error, (dpmpp_error, ddim_error)


def test_ddim_eta1_with_all_steps_is_ddpm():
    """Same key -> same noise draws; DDIM with eta = 1 over 1000 steps is ancestral DDPM sample for sample."""
    ddpm = run_sampler(SamplerConfig.faithful(), batch=16)
    ddim = run_sampler(SamplerConfig(sampler="ddim", steps=1000, eta=1.0, clip_sample=True, final_step_order=1), batch=16)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-3)
    # and in distribution with a different key
    other = run_sampler(SamplerConfig(sampler="ddim", steps=1000, eta=1.0, final_step_order=1), batch=16, key=1)
    assert other.mean() == pytest.approx(ddpm.mean(), abs=0.03) and other.std() == pytest.approx(ddpm.std(), rel=0.05)


def test_eta_changes_ddim_only_through_noise():
    a = run_sampler(SamplerConfig(sampler="ddim", steps=20, clip_sample=False), batch=8, key=0)
    b = run_sampler(SamplerConfig(sampler="ddim", steps=20, clip_sample=False), batch=8, key=0)
    c = run_sampler(SamplerConfig(sampler="ddim", steps=20, eta=1.0, clip_sample=False), batch=8, key=0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


@pytest.mark.parametrize(
    "settings",
    [
        {"sampler": "ddpm"},
        {"sampler": "ddpm", "timestep_spacing": "logsnr"},
        {"sampler": "ddim", "timestep_spacing": "trailing", "final_step_order": 1},
        {"sampler": "ddim", "timestep_spacing": "data_std", "data_std": 0.18},
        {"sampler": "ddim", "eta": 1.0, "timestep_spacing": "karras"},
        {"sampler": "dpmpp_2m", "timestep_spacing": "trailing", "final_step_order": 1},
        {"sampler": "dpmpp_2m"},
        {"sampler": "dpmpp_2m", "clip_sample": True, "guidance_scale": 2.0},
    ],
    ids=lambda settings: "-".join(f"{value}" for value in settings.values()),
)
def test_compiled_program_size_does_not_grow_with_steps(settings):
    """The chain is one scan whatever the grid and final step: the lowered program for 10 and 200 steps has
    the same operations (the per-step tables are single, longer, constant lines), so compile time is constant."""
    schedule = make_schedule()
    cond = {"mu": jnp.zeros((2,))}
    op_counts = []
    for steps in (10, 200):
        config = SamplerConfig(steps=steps, **settings)
        fn = functools.partial(sample, gaussian_model_fn(schedule, 1.0), schedule, config=config,
                               null_cond={"mu": jnp.zeros(())})
        program = jax.jit(fn).lower(cond, jax.random.key(0)).as_text()
        op_counts.append(sum(1 for line in program.splitlines() if "stablehlo." in line))
    assert op_counts[0] == op_counts[1], op_counts


# -- sharding, generate, adapters ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("guidance_mode", [None, "batched", "sequential"])
def test_sharded_over_8_devices_equals_one_device(sampler, guidance_mode):
    assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    guidance = {} if guidance_mode is None else {"guidance_scale": 3.0, "guidance_mode": guidance_mode}
    config = SamplerConfig(sampler=sampler, steps=30, clip_sample=False, **guidance)
    mesh = jax.make_mesh((8,), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    schedule = make_schedule()
    cond = {"mu": jnp.linspace(-1, 1, 16)}
    null = {"mu": jnp.zeros(())}
    single = jax.jit(functools.partial(sample, gaussian_model_fn(schedule, STD), schedule, config=config,
                                       null_cond=null))
    sharded = jax.jit(functools.partial(sample, gaussian_model_fn(schedule, STD), schedule, config=config,
                                        null_cond=null, batch_sharding=batch_sharding))
    reference = np.asarray(single(jax.device_put(cond, jax.devices()[0]), jax.random.key(7)))
    out = sharded(jax.device_put(cond, NamedSharding(mesh, PartitionSpec("data"))), jax.random.key(7))
    assert out.sharding.is_equivalent_to(batch_sharding, 3)
    np.testing.assert_allclose(np.asarray(out), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_guided_batch_of_one_on_an_explicit_mesh_traces(sampler):
    """The doubled guidance batch of one ECG comes back from the split with another sharding type on an Explicit
    mesh (jax.make_mesh's default); the chain carries that prediction, so it must be pinned like x (this
    once failed to trace: 'carry input and carry output must have equal types')."""
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    schedule = make_schedule()
    config = SamplerConfig(sampler=sampler, steps=5, clip_sample=False, guidance_scale=3.0, guidance_mode="batched")
    fn = jax.jit(functools.partial(sample, gaussian_model_fn(schedule, STD), schedule, config=config,
                                   null_cond={"mu": jnp.zeros(())}, batch_sharding=batch_sharding))
    out = fn(jax.device_put({"mu": jnp.full((1,), 0.5)}, batch_sharding), jax.random.key(0))
    assert out.shape == (1, 128, 4) and out.sharding.is_equivalent_to(batch_sharding, 3)
    assert np.isfinite(np.asarray(out)).all()


def test_sample_rejects_a_batch_the_mesh_cannot_split():
    mesh = jax.make_mesh((8,), ("data",))
    schedule = make_schedule()
    with pytest.raises(ValueError, match="not divisible"):
        sample(
            gaussian_model_fn(schedule, 1.0), schedule, {"mu": jnp.zeros((12,))}, jax.random.key(0),
            SamplerConfig(steps=2), batch_sharding=NamedSharding(mesh, PartitionSpec("data")),
        )


def test_sample_starts_from_given_latents_and_checks_their_shape():
    """A point mass at 0.7: the optimal noise prediction is exact, so from any start DDIM lands on 0.7, and from
    given latents the chain is a deterministic function of them."""
    schedule = make_schedule()
    point_mass = lambda x, t, cond: (x - jnp.sqrt(schedule.alphas_cumprod[t])[:, None, None] * 0.7) / jnp.sqrt(
        1 - schedule.alphas_cumprod[t])[:, None, None]
    config = SamplerConfig(sampler="ddim", steps=5, clip_sample=False)
    cond = {"mu": jnp.zeros((2,))}
    start = jax.random.normal(jax.random.key(9), (2, 128, 4))
    run = jax.jit(lambda start, key: sample(point_mass, schedule, cond, key, config, initial_latents=start))
    np.testing.assert_allclose(np.asarray(run(start, jax.random.key(0))), 0.7, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(run(start, jax.random.key(0))), np.asarray(run(start, jax.random.key(1))))
    with pytest.raises(ValueError, match=r"initial_latents has shape \(2, 128, 3\)"):
        sample(point_mass, schedule, cond, jax.random.key(0), config, initial_latents=jnp.zeros((2, 128, 3)))


def test_sample_names_a_condition_field_without_the_batch_axis():
    """A scalar, a Python list or one field of another batch size was an IndexError ("tuple index out of range")
    or an XLA shape error from inside the network; now it is one sentence naming the field."""
    schedule = make_schedule()
    model_fn = gaussian_model_fn(schedule, 1.0)
    run = lambda cond: sample(model_fn, schedule, cond, jax.random.key(0), SamplerConfig(steps=2))
    with pytest.raises(ValueError, match=r"cond\['sex'\] is a scalar: .*batch axis first"):
        run({"mu": jnp.zeros((2,)), "sex": np.float32(1.0)})
    with pytest.raises(ValueError, match=r"cond\['sex'\]\[0\] is a Python float: .*one array"):
        run({"mu": jnp.zeros((2,)), "sex": [1.0, 0.0]})
    with pytest.raises(ValueError, match=r"same batch size .*cond\['mu'\] 2, .*cond\['sex'\] 3"):
        run({"mu": jnp.zeros((2,)), "sex": jnp.zeros((3,))})


def test_noise_level_grids_need_a_concrete_schedule():
    config = SamplerConfig(sampler="dpmpp_2m", steps=5, clip_sample=False)
    schedule = make_schedule()
    assert sampler_timesteps(config, schedule)[0] == 999
    with pytest.raises(ValueError, match="close over the schedule"):
        jax.jit(lambda schedule: sampler_timesteps(config, schedule))(schedule)


def test_generate_decodes_inside_the_same_jit():
    schedule = make_schedule()
    config = SamplerConfig(sampler="dpmpp_2m", steps=10, clip_sample=False)
    projection = jax.random.normal(jax.random.key(1), (4, 12 * 8))
    decode = lambda z: (z @ projection).reshape(z.shape[0], 1024, 12)
    cond = {"mu": jnp.zeros((4,))}
    model_fn = gaussian_model_fn(schedule, 1.0)
    ecg = jax.jit(functools.partial(generate, model_fn, decode, schedule, config=config))(cond, jax.random.key(3))
    latents = jax.jit(functools.partial(sample, model_fn, schedule, config=config))(cond, jax.random.key(3))
    assert ecg.shape == (4, 1024, 12)
    np.testing.assert_allclose(np.asarray(ecg), np.asarray(decode(latents)), atol=1e-4)


class TinyUNet(nn.Module):
    """Stand-in with the U-Net's call signature: (x_t, t, text_embedding, sex, age, heart_rate) -> eps."""

    @nn.compact
    def __call__(self, x_t, t, text_embedding, sex, age, heart_rate):
        features = jnp.concatenate([text_embedding, jnp.stack([sex, age, heart_rate, t / 1000.0], -1)], -1)
        return nn.Dense(4)(x_t) + nn.Dense(4)(features.astype(x_t.dtype))[:, None, :]


class TinyVAE(nn.Module):
    @nn.compact
    def __call__(self, z):
        return self.decode(z)

    @nn.compact
    def decode(self, z, latent_scale=0.18215):
        return jnp.repeat(nn.Dense(12)(z / latent_scale), 8, axis=1)


def _patient_cond(batch, text_dim=6):
    return {
        "text_embedding": jax.random.normal(jax.random.key(0), (batch, text_dim)),
        "sex": jnp.arange(batch) % 2,
        "age": jnp.linspace(20, 80, batch),
        "heart_rate": jnp.linspace(50, 110, batch),
    }


def _network_products(fn, *args) -> dict[str, set]:
    """The dtypes of every convolution and matmul `fn` traces to, by flax module path (nested jaxprs included)."""
    products: dict[str, set] = {}
    for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr):
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            path = str(eqn.source_info.name_stack)
            products.setdefault(path, set()).update(str(v.aval.dtype) for v in eqn.invars)
    return products


def test_bf16_sampling_runs_both_networks_in_bf16():
    """`sample --dtype bfloat16` gets the U-Net and VAE as a model directory loads them: float32 parameters, no
    compute dtype of their own. Every convolution and matmul must then run in bf16, except the one the U-Net
    keeps in float32 on purpose (each cross-attention's value combiner). Casting only the parameters and inputs,
    as the samplers once did, left 56 of the published U-Net's 59 convolutions in float32: its float32 time
    tables promote every layer after them."""
    unet, vae = UNet(), VAE()
    x, t = jnp.zeros((2, 128, 4)), jnp.full((2,), 500, jnp.int32)
    cond = _patient_cond(2, unet.text_dim)
    unet_vars = jax.eval_shape(unet.init, jax.random.key(0), x, t, cond["text_embedding"], cond["sex"], cond["age"],
                               cond["heart_rate"])
    vae_vars = jax.eval_shape(lambda z: vae.init(jax.random.key(0), z, method="decode"), x)
    for dtype, expected in ((None, "float32"), (jnp.bfloat16, "bfloat16")):
        in_unet = _network_products(lambda v, x, dtype=dtype: unet_model_fn(unet, v, dtype)(x, t, cond), unet_vars, x)
        in_vae = _network_products(lambda v, z, dtype=dtype: vae_decode_fn(vae, v, dtype)(z), vae_vars, x)
        combiners = {path for path in in_unet if path.endswith("cross_attention/value_combiner")}
        assert len(combiners) == 13 and all(in_unet[path] == {"float32"} for path in combiners)
        wrong = {path: dtypes for path, dtypes in {**in_unet, **in_vae}.items()
                 if path not in combiners and dtypes != {expected}}
        assert not wrong, f"{dtype}: products not in {expected}: {sorted(wrong.items())[:5]} ({len(wrong)} in all)"


class GaussianDenoiser(nn.Module):
    """The closed-form optimal network for N(mean, std^2) latents, called like the U-Net, with the precision of its
    compute dtype: its inputs arrive in that dtype (as `unet_model_fn` sends them), the closed form is evaluated in
    float32 (as a U-Net looks up its float32 timestep tables) and its output is rounded to the dtype."""

    mean: float
    std: float
    prediction_type: str
    dtype: Any = None

    @nn.compact
    def __call__(self, x_t, t, text_embedding, sex, age, heart_rate):
        assert x_t.dtype == (self.dtype or jnp.float32) and text_embedding.dtype == x_t.dtype
        schedule = make_schedule(ScheduleConfig(prediction_type=self.prediction_type))
        out = gaussian_optimal_model_fn(schedule, self.mean, self.std)(x_t.astype(jnp.float32), t, None)
        return out.astype(self.dtype or jnp.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_bf16_network_keeps_the_default_samplers_right_at_the_published_scale(prediction_type):
    """The fast samplers' Gaussian check (sampler_validation.py) through `unet_model_fn` with a network computing in
    bf16, at the published latent std 0.18 and a mean away from 0: the sampler's own state and arithmetic stay
    float32, so a bf16 network moves the samples' spread and mean by far less than the check's tolerances."""
    schedule = make_schedule(ScheduleConfig(prediction_type=prediction_type))
    mean, std, n = 0.5, 0.18, 1024
    cond = _patient_cond(n)
    for config in (sampler_config("dpmpp_2m"), sampler_config("ddim", data_std=std)):
        config = dataclasses.replace(config, clip_sample=False)
        abar = float(schedule.alphas_cumprod[int(sampler_timesteps(config, schedule)[0])])
        z = jax.random.normal(jax.random.key(1), (n, 128, 4))
        noised = np.sqrt(abar) * mean + np.sqrt(abar * std**2 + 1 - abar) * z  # the check's exact start
        latents = {}
        for dtype in (None, jnp.bfloat16):
            model_fn = unet_model_fn(GaussianDenoiser(mean, std, prediction_type), {}, dtype)
            out = jax.jit(lambda x, model_fn=model_fn, config=config: sample(
                model_fn, schedule, cond, jax.random.key(2), config, initial_latents=x))(noised)
            assert out.dtype == jnp.float32
            latents[dtype] = np.asarray(out, np.float64)
        bf16 = latents[jnp.bfloat16]
        std_ratio, mean_error = bf16.std() / std, (bf16.mean() - mean) / std
        assert abs(std_ratio - 1) <= STD_RATIO_TOLERANCE and abs(mean_error) <= MEAN_ERROR_TOLERANCE, (
            config.sampler, std_ratio, mean_error)
        # The same samples, not only the same spread: bf16 moved them by 0.0009-0.0096 std (RMS) on 2026-12-06; a
        # float8 network (3 mantissa bits) moved them by 0.020-0.12 and fails here.
        rms = np.sqrt(np.mean((bf16 - latents[None]) ** 2)) / std
        assert rms < 0.015, (config.sampler, rms)


@pytest.mark.slow
def test_jit_generate_with_flax_modules_and_guidance():
    unet, vae = TinyUNet(), TinyVAE()
    cond = _patient_cond(4)
    unet_vars = unet.init(jax.random.key(1), jnp.zeros((4, 128, 4)), jnp.zeros((4,), jnp.int32), cond["text_embedding"],
                          cond["sex"], cond["age"], cond["heart_rate"])
    vae_vars = vae.init(jax.random.key(2), jnp.zeros((4, 128, 4)))
    schedule = make_schedule()
    config = SamplerConfig(sampler="ddim", steps=5, guidance_scale=3.0)
    run = jit_generate(unet, vae, schedule, config)
    null = fixed_null_condition(6)
    ecg = run(unet_vars, vae_vars, cond, jax.random.key(4), null)
    assert ecg.shape == (4, 1024, 12) and bool(jnp.all(jnp.isfinite(ecg)))
    # the same thing assembled by hand from the adapters
    by_hand = generate(unet_model_fn(unet, unet_vars), vae_decode_fn(vae, vae_vars), schedule, cond, jax.random.key(4),
                       config, null_cond=null)
    np.testing.assert_allclose(np.asarray(ecg), np.asarray(by_hand), atol=1e-4)
    latents = jit_generate(unet, None, schedule, config)(unet_vars, None, cond, jax.random.key(4), null)
    assert latents.shape == (4, 128, 4)
    # the decoder gets the latents' scale (a U-Net trained with a measured one records it in generation.json)
    np.testing.assert_allclose(np.asarray(ecg), np.asarray(vae.apply(vae_vars, latents, method="decode")), atol=1e-4)
    rescaled = jit_generate(unet, vae, schedule, config, latent_scale=0.5)(unet_vars, vae_vars, cond, jax.random.key(4), null)
    np.testing.assert_allclose(np.asarray(rescaled), np.asarray(vae.apply(vae_vars, latents, 0.5, method="decode")),
                               atol=1e-4)
    assert not np.allclose(np.asarray(rescaled), np.asarray(ecg))
    # bfloat16 compute keeps float32 outputs and stays close
    bf16 = jit_generate(unet, vae, schedule, config, compute_dtype=jnp.bfloat16)(unet_vars, vae_vars, cond, jax.random.key(4), null)
    assert bf16.dtype == jnp.float32 and float(jnp.abs(bf16 - ecg).max()) < 0.25 * float(jnp.abs(ecg).max())


def test_a_record_names_the_grid_that_runs():
    """Manifests and run fingerprints record `SamplerConfig.record()`: a default grid (None) is recorded as the grid
    that runs, so a run made before a default grid changed is another run, not one a resume would complete with
    ECGs from another grid."""
    assert SamplerConfig(sampler="ddpm", data_std=0.18).record()["timestep_spacing"] == "data_std"
    assert SamplerConfig(sampler="ddpm").record()["timestep_spacing"] == "logsnr"
    assert SamplerConfig(sampler="ddim", timestep_spacing="trailing").record()["timestep_spacing"] == "trailing"
    record = SamplerConfig(sampler="dpmpp_2m", steps=7).record()
    assert record == {**dataclasses.asdict(SamplerConfig(sampler="dpmpp_2m", steps=7)), "timestep_spacing": "logsnr"}
