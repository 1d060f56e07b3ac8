"""Reverse-process samplers: DDPM (faithful), DDIM and DPM-Solver++(2M), as pure jittable functions.

The whole reverse chain is one `lax.scan` over the timesteps, so compile time does not grow with the
number of steps, and `generate` runs the VAE decode inside the same jitted function. Every random draw
comes from the caller's key and has the global batch shape (noise for step i from `fold_in(key, i)`),
so a batch sharded over any mesh gives the same samples as one device.

The faithful sampler reproduces diffusers 0.27.2 `DDPMScheduler(beta_schedule="linear",
clip_sample=True, variance_type="fixed_small")` stepping with 1000 inference steps, as the published
DiffuSETS code does.

Fast samplers and the latent scale. The published VAE's latents have a standard deviation near 0.18, so
the samples are shaped where the noise level sigma = sqrt((1 - abar) / abar) is about 0.03 to 1, a
region a grid uniform in t crosses in two or three steps. The validated defaults (`SAMPLER_DEFAULTS`)
therefore choose trained timesteps evenly in log sigma (DPM-Solver++) or in arctan(sigma / data std)
(DDIM: on Gaussian data of that std a DDIM step shrinks the spread by cos of the step in arctan(sigma / std),
so even steps there are the best first-order grid), and end with a second-order
step from the smallest trained noise level (sigma ~ 0.03 at t = 0) to the clean sample: a first-order
step there returns the posterior mean, which is flatter than the data by sqrt(1 + sigma^2 / std^2)
(4 % at std 0.1). `diffusion.sampler_validation` measures every setting on Gaussian data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.diffusion.guidance import GUIDANCE_MODES, condition_batch_size, guided_model_fn
from diffusets_jax.diffusion.schedule import NoiseSchedule, predict_x0_and_eps
from diffusets_jax.ecg.shapes import LATENT_SHAPE
from diffusets_jax.models.precision import cast_floating, with_compute_dtype
from diffusets_jax.parallel import constrain_to, leading_axis_shards

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
DecodeFn = Callable[[jax.Array], jax.Array]

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m")
# Even in t (diffusers' names) | even in a function of the trained noise levels sigma_t = sqrt((1 - abar_t) / abar_t)
T_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
SIGMA_SPACINGS: tuple[str, ...] = ("logsnr", "karras", "data_std")
TIMESTEP_SPACINGS: tuple[str, ...] = T_SPACINGS + SIGMA_SPACINGS
FINAL_STEP_ORDERS: tuple[int, ...] = (1, 2)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


@dataclasses.dataclass(frozen=True)
class SamplerDefaults:
    """What a sampler uses unless told otherwise: the settings that pass the Gaussian check
    (benchmarks/sampler_quality.py) for data std 0.1 to 1."""

    steps: int
    timestep_spacing: str
    final_step_order: int


SAMPLER_DEFAULTS: dict[str, SamplerDefaults] = {
    # 1000 steps: the published chain, every timestep (every grid is all of them). Fewer steps on a grid even in
    # t are flat at the published latent std 0.18 (std ratio 0.81 at 100 steps, 0.72 at 50, against the
    # published chain's 0.959); the grid set from the latents' std gives 0.957 and 0.946 (0.949 / 0.920 "logsnr",
    # the grid without the std). The posterior sampler's default chain is 100 of these steps.
    "ddpm": SamplerDefaults(steps=1000, timestep_spacing="data_std", final_step_order=1),
    # first order: only a grid matched to the latents' std keeps 50 steps within 3 %; without the std it
    # takes "logsnr" (see SamplerConfig.effective_timestep_spacing)
    "ddim": SamplerDefaults(steps=50, timestep_spacing="data_std", final_step_order=2),
    # within 1 % at every data std from 0.1 to 1 on the log-SNR grid, which needs no data std
    "dpmpp_2m": SamplerDefaults(steps=20, timestep_spacing="logsnr", final_step_order=2),
}
DEFAULT_STEPS: dict[str, int] = {name: defaults.steps for name, defaults in SAMPLER_DEFAULTS.items()}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings (hashable, so it can be a static jit argument).

    sampler: "ddpm" (ancestral, fixed-small variance), "ddim" or "dpmpp_2m" (DPM-Solver++ 2M,
        multistep, x0-predicting, first order on the first step).
    steps: number of network evaluations (times 2 with guidance in "sequential" mode). None: the
        sampler's default (`SAMPLER_DEFAULTS`: ddpm 1000, ddim 50, dpmpp_2m 20).
    eta: DDIM stochasticity; 0 is deterministic DDIM, 1 with all steps is DDPM.
    timestep_spacing: how `steps` of the T trained timesteps are chosen, always descending and distinct.
        Even in t (diffusers' names): "trailing" starts at T - 1, "leading" is diffusers' DDIM default,
        "linspace" rounds an even grid over [0, T - 1]. Even in a function of the trained noise levels
        sigma_t = sqrt((1 - abar_t) / abar_t), from t = T - 1 down to t = 0 (the nearest trained timestep
        to each point; where several points round to one timestep the rest are re-spaced): "logsnr" even in
        log sigma, "karras" even in sigma^(1/7) (Karras et al. 2022), "data_std" even in
        arctan(sigma / data_std), which spends the steps where sigma is near the data's std.
        All give T-1 … 0 when steps = T. None: the sampler's validated grid (`SAMPLER_DEFAULTS`), which for
        ddpm and ddim depends on `data_std` (`effective_timestep_spacing` says which grid runs).
    clip_sample: clip predicted x0 to [-clip_range, clip_range] (the faithful config does, on latents).
        None: as the model directs (`pipeline.ECGGenerator` resolves it from the model directory); `sample`
        refuses an unresolved None.
    guidance_scale: classifier-free guidance weight w (out_null + w (out_cond - out_null)); 1 = none.
    guidance_mode: "batched" (doubled batch, one call) or "sequential" (two calls).
    final_step_order: the step from the last timestep to the clean sample (ddim, dpmpp_2m). 1 returns the
        predicted x0 (diffusers' "lower order final"); 2 integrates the noise prediction, extrapolated
        linearly in sigma from the last two evaluations, down to sigma = 0 (second-order Adams-Bashforth
        in sigma; exact when the noise prediction along the path is affine in sigma, as it is both for
        smooth data densities, where it vanishes at sigma = 0, and for point masses, where it is constant).
        ddpm keeps its own ancestral final step (1). None: the sampler's default.
    data_std: the standard deviation of the model's latents (the diffusion space), which the "data_std"
        spacing needs; recorded in the model directory (`diffusion.latent_std`). None: unknown, or as the model
        directs: a sampler built before the model is loaded (`sampler_config` in the CLI) gets it from there,
        and with timestep_spacing None its grid follows.
    """

    sampler: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    timestep_spacing: str | None = None
    clip_sample: bool | None = True
    clip_range: float = 1.0
    guidance_scale: float = 1.0
    guidance_mode: str = "batched"
    latent_shape: tuple[int, ...] = LATENT_SHAPE
    final_step_order: int | None = None
    data_std: float | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        defaults = SAMPLER_DEFAULTS[self.sampler]
        # Resolved here so a config's repr and record say what runs; the grid stays None until sampling
        # because the validated one depends on data_std, which may arrive with the model.
        if self.steps is None:
            object.__setattr__(self, "steps", defaults.steps)
        if self.final_step_order is None:
            object.__setattr__(self, "final_step_order", defaults.final_step_order)
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {self.guidance_mode!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.eta < math.inf:
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.eta != 0.0 and self.sampler != "ddim":  # ddpm's noise is fixed, dpmpp_2m has none: it would be ignored
            raise ValueError(f"eta {self.eta:g} (--eta) is DDIM's noise; the {self.sampler} sampler has none to set: "
                             "leave eta at 0, or choose the ddim sampler")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (1 = no guidance), got {self.guidance_scale}")
        if not 0.0 < self.clip_range < math.inf:
            raise ValueError(f"clip_range must be a finite number > 0, got {self.clip_range}")
        if self.final_step_order not in FINAL_STEP_ORDERS:
            raise ValueError(f"final_step_order must be one of {FINAL_STEP_ORDERS}, got {self.final_step_order!r}")
        if self.sampler == "ddpm" and self.final_step_order != 1:
            raise ValueError("final_step_order=2 is for ddim and dpmpp_2m; ddpm ends with its own ancestral step (1)")
        if self.data_std is not None and not (np.isfinite(self.data_std) and self.data_std > 0):
            raise ValueError(f"data_std must be a positive number (the latents' standard deviation), got {self.data_std}")
        if self.timestep_spacing == "data_std" and self.data_std is None:
            raise ValueError("timestep_spacing='data_std' needs data_std, the standard deviation of the model's "
                             "latents (recorded in the model directory); or choose timestep_spacing='logsnr'")

    @property
    def effective_timestep_spacing(self) -> str:
        """The grid that runs: `timestep_spacing`, or the sampler's validated one ("logsnr" for ddpm and ddim
        without `data_std`)."""
        if self.timestep_spacing is not None:
            return self.timestep_spacing
        spacing = SAMPLER_DEFAULTS[self.sampler].timestep_spacing
        return "logsnr" if spacing == "data_std" and self.data_std is None else spacing

    def record(self) -> dict[str, Any]:
        """Every setting, with the grid that runs in place of a default one (None): what manifests and run
        fingerprints record, so that a run made before a default grid changed is another run, not one that a
        resume would complete with ECGs from another grid."""
        return {**dataclasses.asdict(self), "timestep_spacing": self.effective_timestep_spacing}

    @classmethod
    def faithful(cls) -> SamplerConfig:
        """The published sampler: 1000 ancestral DDPM steps, x0 clipped to [-1, 1], no guidance."""
        return cls()

    @classmethod
    def fast(cls, guidance_scale: float = 1.0) -> SamplerConfig:
        """DPM-Solver++(2M), 20 steps on the log-SNR grid, second-order final step, no clipping: 50x fewer
        network calls than `faithful`, within 1 % of the data's std on Gaussian data of std 0.1 to 1."""
        return cls(sampler="dpmpp_2m", clip_sample=False, guidance_scale=guidance_scale)


def sampler_config(sampler: str = "ddpm", *, steps: int | None = None, eta: float = 0.0,
                   guidance_scale: float = 1.0, clip_sample: bool | None = None,
                   data_std: float | None = None) -> SamplerConfig:
    """A SamplerConfig with the validated per-sampler defaults (`SAMPLER_DEFAULTS`): ddpm 1000 steps, clipping
    x0 as the model directs (the model directory's `diffusion.clip_sample`: on for the published model); ddim 50
    and dpmpp_2m 20 steps without clipping. `data_std`: the model's latent std (`diffusion.latent_std`); DDIM's
    validated grid needs it."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be a positive number of network evaluations, got {steps}")
    return SamplerConfig(
        sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale,
        clip_sample=(None if sampler == "ddpm" else False) if clip_sample is None else clip_sample,
        data_std=data_std,
    )


# The published model's latents (VAE posterior x 0.18215) have a standard deviation near 0.18 on MIMIC-IV-ECG (an
# independent reproduction measured it); a converted checkpoint comes with no data to measure, so this stands in.
PUBLISHED_LATENT_STD = 0.18


def resolve_for_model(config: SamplerConfig, diffusion: Any) -> SamplerConfig:
    """`config` with its "as the model directs" fields filled from a model directory's `DiffusionSpec`:
    `clip_sample=None` takes `diffusion.clip_sample`, `data_std=None` (DDIM's grid) the measured
    `diffusion.latent_std` or, for a converted checkpoint without one, `PUBLISHED_LATENT_STD`. Explicit choices
    are kept. The generator and `diagnose` both sample through this, so they sample alike."""
    if config.clip_sample is None:
        config = dataclasses.replace(config, clip_sample=bool(diffusion.clip_sample))
    if config.data_std is None:
        config = dataclasses.replace(config, data_std=float(diffusion.latent_std or PUBLISHED_LATENT_STD))
    return config


def _noise_levels(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), the noise-to-signal ratio of each trained timestep, float64."""
    abar = np.asarray(alphas_cumprod, np.float64)
    return np.sqrt((1.0 - abar) / abar)


def _evenly_in(u: np.ndarray, steps: int) -> np.ndarray:
    """`steps` distinct timesteps, T - 1 and 0 included, as evenly spaced in u (increasing in t) as integer
    timesteps allow: chosen from t = 0 up, each the nearest to an even division of what is left, so where
    the trained timesteps are too coarse for the grid (near t = 0) the remaining steps spread over the rest."""
    T = len(u)
    if steps == 1:
        return np.array([T - 1], np.int32)
    chosen = [0]
    for k in range(1, steps):
        remaining = steps - k
        target = u[chosen[-1]] + (u[-1] - u[chosen[-1]]) / remaining
        t = int(np.argmin(np.abs(u - target)))
        chosen.append(min(max(t, chosen[-1] + 1), T - remaining))
    return np.array(chosen[::-1], np.int32)


def make_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing", *,
                   alphas_cumprod: np.ndarray | None = None, data_std: float | None = None) -> np.ndarray:
    """The descending inference timesteps `(steps,)` int32, a subset of 0 … num_train_timesteps - 1.

    The noise-level spacings ("logsnr", "karras", "data_std") need the schedule's `alphas_cumprod`
    `(num_train_timesteps,)`, and "data_std" the latents' std (see `SamplerConfig.timestep_spacing`).
    """
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] for a {T}-step schedule, got {steps}")
    if spacing == "leading":
        timesteps = (np.arange(steps) * (T // steps))[::-1]
    elif spacing == "trailing":
        # diffusers' grid; the float arange can hold one element more, ~1e-12 from 0 (t = -1), for some steps
        # (61, 103, 121, ...), which made those step counts fail: the first `steps` elements are the grid.
        timesteps = np.round(np.arange(T, 0, -T / steps)[:steps]) - 1
    elif spacing == "linspace":
        timesteps = np.round(np.linspace(0, T - 1, steps))[::-1]
    elif spacing in SIGMA_SPACINGS:
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise ValueError(f"timestep_spacing={spacing!r} needs the schedule's alphas_cumprod ({T},)")
        sigma = _noise_levels(alphas_cumprod)
        if spacing == "logsnr":
            u = np.log(sigma)
        elif spacing == "karras":
            u = sigma ** (1.0 / KARRAS_RHO)
        else:
            if data_std is None or not data_std > 0:
                raise ValueError(f"timestep_spacing='data_std' needs a positive data_std, got {data_std}")
            u = np.arctan(sigma / data_std)
        timesteps = _evenly_in(u, steps)
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    timesteps = timesteps.astype(np.int32)
    if len(np.unique(timesteps)) != steps:
        raise ValueError(f"{spacing!r} spacing gives repeated timesteps for steps={steps}, T={T}")
    return timesteps


def check_steps(config: SamplerConfig, num_timesteps: int, flag: str = "--steps") -> None:
    """Refuse more steps than the model's schedule has timesteps, in one line naming the command's `flag`: every
    sampler's steps pass here (`sampler_timesteps`), and a command whose generator is built late checks first."""
    if not 1 <= config.steps <= num_timesteps:
        raise ValueError(f"steps {config.steps} ({flag}) is more than this model's {num_timesteps}-step schedule "
                         f"has: give {flag} from 1 to {num_timesteps}")


def sampler_timesteps(config: SamplerConfig, schedule: NoiseSchedule) -> np.ndarray:
    """The timesteps `(config.steps,)` int32 that `sample` visits, descending.

    The noise-level spacings are chosen from the schedule's values, so the schedule must be concrete (closed
    over by the jitted function, as `jit_generate` does), not a traced argument.
    """
    check_steps(config, schedule.num_timesteps)
    spacing = config.effective_timestep_spacing
    alphas_cumprod = None
    if spacing in SIGMA_SPACINGS:
        try:
            alphas_cumprod = np.asarray(schedule.alphas_cumprod)
        except jax.errors.TracerArrayConversionError:
            raise ValueError(
                f"timestep_spacing={spacing!r} chooses timesteps from the schedule's values: close over the "
                "schedule (functools.partial, jit_generate) instead of passing it to jit as an argument"
            ) from None
    return make_timesteps(schedule.num_timesteps, config.steps, spacing,
                          alphas_cumprod=alphas_cumprod, data_std=config.data_std)


def _abar_at(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """alpha_bar_t, with alpha_bar_{-1} = 1 (the clean end of the chain, diffusers' `one`)."""
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], jnp.float32(1.0))


def _scalar_timestep(value: jax.Array | int, name: str, where: str) -> jax.Array:
    """`value` as a scalar int32 timestep, or a one-line ValueError naming `name`.

    The steps gather abar at t and broadcast it against `(batch, 128, 4)` from the right, so a per-sample `(batch,)`
    t (as the U-Net takes) lined up with the latent channels: with a batch of 4 each channel stepped with another
    sample's t, silently, and other batches failed deep in a broadcast naming neither argument.
    """
    value = jnp.asarray(value, jnp.int32)
    if value.ndim != 0:
        raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, expected one timestep shared by the batch "
                         f"(an int or a 0-d array, e.g. t[0] of the U-Net's (batch,) t)")
    return value


def _clip(x0: jax.Array, clip_sample: bool, clip_range: float) -> jax.Array:
    return jnp.clip(x0, -clip_range, clip_range) if clip_sample else x0


def ddpm_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array | int,
    x_t: jax.Array,
    noise: jax.Array,
    prev_t: jax.Array | int | None = None,
    *,
    clip_sample: bool = True,
    clip_range: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral DDPM step t -> prev_t (default t - 1), exactly as diffusers' `DDPMScheduler.step`.

    Fixed-small variance (1 - abar_prev) / (1 - abar_t) * beta_t with beta_t = 1 - abar_t / abar_prev;
    no noise is added at t = 0. model_output, x_t, noise: `(batch, 128, 4)`; t, prev_t: scalar ints
    shared by the batch. Returns (x_prev, predicted x0 after clipping), float32.
    """
    t = _scalar_timestep(t, "t", "ddpm_step")
    prev_t = t - 1 if prev_t is None else _scalar_timestep(prev_t, "prev_t", "ddpm_step")
    x0, _ = predict_x0_and_eps(schedule, model_output, x_t, t)
    x0 = _clip(x0, clip_sample, clip_range)
    abar_t = schedule.alphas_cumprod[t]
    abar_prev = _abar_at(schedule, prev_t)
    beta_prod_t, beta_prod_prev = 1.0 - abar_t, 1.0 - abar_prev
    current_alpha = abar_t / abar_prev
    current_beta = 1.0 - current_alpha
    x0_coeff = (abar_prev**0.5 * current_beta) / beta_prod_t
    xt_coeff = current_alpha**0.5 * beta_prod_prev / beta_prod_t
    mean = x0_coeff * x0 + xt_coeff * x_t.astype(jnp.float32)
    variance = jnp.maximum(beta_prod_prev / beta_prod_t * current_beta, 1e-20)
    std = jnp.where(t > 0, variance**0.5, 0.0)
    return mean + std * noise.astype(jnp.float32), x0


def _x0_and_eps(schedule: NoiseSchedule, model_output: jax.Array, t: jax.Array, x_t: jax.Array,
                clip_sample: bool, clip_range: float) -> tuple[jax.Array, jax.Array]:
    """Predicted x0 and noise; when x0 is clipped the noise is recomputed from the clipped x0 (diffusers'
    `use_clipped_model_output`), so the pair stays consistent with x_t."""
    x0, eps = predict_x0_and_eps(schedule, model_output, x_t, t)
    if clip_sample:
        abar_t = schedule.alphas_cumprod[t]
        x0 = _clip(x0, clip_sample, clip_range)
        eps = (x_t.astype(jnp.float32) - abar_t**0.5 * x0) / (1.0 - abar_t) ** 0.5
    return x0, eps


def _ddim_update(schedule: NoiseSchedule, x0: jax.Array, eps: jax.Array, t: jax.Array, prev_t: jax.Array,
                 noise: jax.Array | None, eta: float) -> jax.Array:
    abar_t = schedule.alphas_cumprod[t]
    abar_prev = _abar_at(schedule, prev_t)
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    sigma = eta * variance**0.5
    direction = jnp.maximum(1.0 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
    x_prev = abar_prev**0.5 * x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise.astype(jnp.float32)
    return x_prev


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array | int,
    prev_t: jax.Array | int,
    x_t: jax.Array,
    noise: jax.Array | None = None,
    *,
    eta: float = 0.0,
    clip_sample: bool = False,
    clip_range: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step t -> prev_t (Song et al. 2021, eq. 12); prev_t = -1 means the clean end.

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)). When x0 is clipped the
    noise estimate is recomputed from the clipped x0 (diffusers' `use_clipped_model_output`), which keeps
    DDIM with eta = 1 over all T steps identical to ancestral DDPM. Shapes as `ddpm_step`; `noise` is only
    read when eta > 0. Returns (x_prev, predicted x0), float32.
    """
    t = _scalar_timestep(t, "t", "ddim_step")
    prev_t = _scalar_timestep(prev_t, "prev_t", "ddim_step")
    x_t = x_t.astype(jnp.float32)
    x0, eps = _x0_and_eps(schedule, model_output, t, x_t, clip_sample, clip_range)
    return _ddim_update(schedule, x0, eps, t, prev_t, noise, eta), x0


@dataclasses.dataclass(frozen=True)
class _Chain:
    """What the scan body needs besides the carry."""

    model_fn: ModelFn
    schedule: NoiseSchedule
    cond: Any
    config: SamplerConfig
    noise_key: jax.Array
    constrain: Callable[[jax.Array], jax.Array]

    def predict(self, x: jax.Array, t: jax.Array) -> jax.Array:
        return self.model_fn(x, jnp.full((x.shape[0],), t, jnp.int32), self.cond)

    def noise(self, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return self.constrain(jax.random.normal(jax.random.fold_in(self.noise_key, i), shape, jnp.float32))


def _dpmpp_2m_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray) -> tuple[jax.Array, ...]:
    """Per-step coefficients (a, b, c) of x_next = a x + b D0 + c (D0 - D_prev), in the lambda = log(alpha/sigma)
    parameterisation of DPM-Solver++(2M) (Lu et al. 2022, midpoint form as in diffusers).

    a = sigma_next / sigma_t, b = alpha_next (1 - e^{-h}), c = b / (2 r) with r = h_prev / h; c = 0 on the
    first step (no history) and on the final step, which goes to sigma = 0 and therefore returns D0 (its
    second-order form is `_final_step_coefficients`).
    """
    n = len(timesteps)
    prev = np.concatenate([timesteps[1:], [-1]]).astype(np.int32)
    earlier = np.concatenate([[timesteps[0]], timesteps[:-1]]).astype(np.int32)
    abar_t = _abar_at(schedule, jnp.asarray(timesteps))
    abar_next = _abar_at(schedule, jnp.asarray(prev))
    abar_earlier = _abar_at(schedule, jnp.asarray(earlier))
    alpha_t, sigma_t = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
    alpha_next, sigma_next = jnp.sqrt(abar_next), jnp.sqrt(1.0 - abar_next)
    exp_neg_h = (alpha_t * sigma_next) / (sigma_t * alpha_next)  # e^{-h}, exactly 0 on the final step
    a = sigma_next / sigma_t
    b = alpha_next * (1.0 - exp_neg_h)
    second_order = (np.arange(n) >= 1) & (prev >= 0)
    if not second_order.any():
        return a, b, jnp.zeros_like(b)
    lam = lambda abar: 0.5 * (jnp.log(abar) - jnp.log1p(-abar))
    safe_next = jnp.where(jnp.asarray(prev) >= 0, abar_next, abar_t * 0.5)  # avoid log(0) where unused
    h = lam(safe_next) - lam(abar_t)
    h_prev = lam(abar_t) - lam(abar_earlier)
    c = jnp.where(jnp.asarray(second_order), b * h / (2.0 * jnp.where(second_order, h_prev, 1.0)), 0.0)
    return a, b, c


def _final_step_coefficients(schedule: NoiseSchedule, timesteps: np.ndarray) -> jax.Array:
    """Per-step e `(steps,)` of the second-order final step's term e (eps - eps_prev), zero before the last.

    With sigma = sqrt((1 - abar) / abar) the noise level, y = x / sqrt(abar) follows dy / dsigma = eps, and the
    first-order final step x0 = y_N - sigma_N eps_N is what both DDIM and DPM-Solver++ return. Taking eps
    affine in sigma through the last two evaluations adds sigma_N^2 / 2 times its slope:
    e = -sigma_N^2 / (2 (sigma_{N-1} - sigma_N)).
    """
    n = len(timesteps)
    if n < 2:
        return jnp.zeros((n,), jnp.float32)
    abar = schedule.alphas_cumprod[jnp.asarray(timesteps[-2:])]
    sigma_prev, sigma_last = jnp.sqrt((1.0 - abar) / abar)
    return jnp.zeros((n,), jnp.float32).at[-1].set(-(sigma_last**2) / (2.0 * (sigma_prev - sigma_last)))


def _run_chain(chain: _Chain, x: jax.Array, timesteps: np.ndarray) -> jax.Array:
    cfg = chain.config
    n = len(timesteps)
    ts = jnp.asarray(timesteps)
    prev_ts = jnp.asarray(np.concatenate([timesteps[1:], [-1]]).astype(np.int32))
    steps = jnp.arange(n, dtype=jnp.int32)

    if cfg.sampler == "ddpm":

        def body(x, xs):
            i, t, prev_t = xs
            out = chain.predict(x, t)
            x, _ = ddpm_step(
                chain.schedule, out, t, x, chain.noise(i, x.shape), prev_t,
                clip_sample=cfg.clip_sample, clip_range=cfg.clip_range,
            )
            return chain.constrain(x), None

        x, _ = jax.lax.scan(body, x, (steps, ts, prev_ts))
        return x

    # The second-order final step needs the previous noise prediction, carried from step to step.
    second_order_final = cfg.final_step_order == 2 and n >= 2
    e = _final_step_coefficients(chain.schedule, timesteps) if second_order_final else jnp.zeros((n,), jnp.float32)

    def finish(x_next, eps, previous_eps, e_i):
        return x_next + e_i * (eps - previous_eps) if second_order_final else x_next

    if cfg.sampler == "ddim":

        def body(carry, xs):
            x, previous_eps = carry
            i, t, prev_t, e_i = xs
            x0, eps = _x0_and_eps(chain.schedule, chain.predict(x, t), t, x, cfg.clip_sample, cfg.clip_range)
            noise = chain.noise(i, x.shape) if cfg.eta > 0 else None
            x_next = _ddim_update(chain.schedule, x0, eps, t, prev_t, noise, cfg.eta)
            return (chain.constrain(finish(x_next, eps, previous_eps, e_i)), chain.constrain(eps)), None

        (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), (steps, ts, prev_ts, e))
        return x

    a, b, c = _dpmpp_2m_coefficients(chain.schedule, timesteps)

    def body(carry, xs):
        x, previous_x0, previous_eps = carry
        t, a_i, b_i, c_i, e_i = xs
        x0, eps = _x0_and_eps(chain.schedule, chain.predict(x, t), t, x, cfg.clip_sample, cfg.clip_range)
        x_next = a_i * x + b_i * x0 + c_i * (x0 - previous_x0)
        # Every carried array is pinned, not only x: a guided prediction can come back with another sharding
        # type (batch 1, doubled batch, Explicit mesh axes), and a scan's carry must keep its type.
        return (chain.constrain(finish(x_next, eps, previous_eps, e_i)), chain.constrain(x0), chain.constrain(eps)), None

    (x, _, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x), jnp.zeros_like(x)), (ts, a, b, c, e))
    return x


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    cond: Any,
    key: jax.Array,
    config: SamplerConfig = SamplerConfig(),
    *,
    null_cond: Any = None,
    batch_sharding: jax.sharding.Sharding | None = None,
    initial_latents: jax.Array | None = None,
) -> jax.Array:
    """Run the reverse chain from z_T ~ N(0, I) and return latents `(batch, 128, 4)` float32.

    model_fn: `model_fn(x_t (B, 128, 4), t (B,) int32, cond) -> (B, 128, 4)` network output (noise or v, as
        `schedule.prediction_type` says). cond: pytree of per-sample arrays `(B, ...)`; B is read from it.
    null_cond: null condition (see `guidance.fixed_null_condition`), needed when config.guidance_scale != 1.
    batch_sharding: sharding of `(B, 128, 4)` arrays, e.g. `NamedSharding(mesh, P("data"))`; the chain's
        state is constrained to it. Random draws are made for the global batch, so results do not depend on it.
    initial_latents: start the chain from these `(batch, 128, 4)` instead of drawing z_T from `key` (fixed-noise
        diagnostics; the sampler check starts from the exact noised data distribution); `key` still drives
        the noise of the stochastic samplers.
    Pure: call it inside `jax.jit` (config static) or use `jit_generate`.
    """
    if config.clip_sample is None:
        raise ValueError("SamplerConfig.clip_sample is None ('as the model directs'): set it to True or False, or "
                         "sample through pipeline.ECGGenerator, which reads the model directory")
    batch = condition_batch_size(cond, "sample: cond")
    n_shards = leading_axis_shards(batch_sharding)
    if batch % n_shards:
        raise ValueError(f"sample: batch size {batch} is not divisible by the {n_shards} batch shards of the mesh")
    shape = (batch,) + tuple(config.latent_shape)
    if initial_latents is not None and tuple(initial_latents.shape) != shape:
        raise ValueError(f"sample: initial_latents has shape {tuple(initial_latents.shape)}, the batch and "
                         f"config.latent_shape need {shape}")
    timesteps = sampler_timesteps(config, schedule)
    constrain = constrain_to(batch_sharding)
    model = guided_model_fn(model_fn, null_cond, config.guidance_scale, config.guidance_mode)
    init_key, noise_key = jax.random.split(key)
    if initial_latents is None:
        x = constrain(jax.random.normal(init_key, shape, jnp.float32))
    else:
        x = constrain(jnp.asarray(initial_latents, jnp.float32))
    chain = _Chain(model, schedule, cond, config, noise_key, constrain)
    return _run_chain(chain, x, timesteps)


def generate(
    model_fn: ModelFn,
    decode_fn: DecodeFn,
    schedule: NoiseSchedule,
    cond: Any,
    key: jax.Array,
    config: SamplerConfig = SamplerConfig(),
    *,
    null_cond: Any = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """`sample` then `decode_fn(latents)`, traced together so one jit covers chain and decoder.

    decode_fn: scaled latent `(B, 128, 4)` -> ECG `(B, 1024, 12)` (standard lead order, mV), e.g.
    `vae_decode_fn(vae, vae_variables)`. Returns whatever decode_fn returns.
    """
    latents = sample(model_fn, schedule, cond, key, config, null_cond=null_cond, batch_sharding=batch_sharding)
    return decode_fn(latents)


def unet_model_fn(unet: nn.Module, variables: Any, compute_dtype: Any = None) -> ModelFn:
    """Adapt a conditional U-Net to the sampler's model_fn.

    Calls `unet.apply(variables, x_t, t, text_embedding, sex, age, heart_rate)` with the fields of `cond`.
    compute_dtype (e.g. jnp.bfloat16): run the network in that dtype, its parameters and inputs cast to it
    (`models.precision`, as the trainers do); the sampler's state and arithmetic stay float32.
    """
    if compute_dtype is not None:
        unet = with_compute_dtype(unet, compute_dtype)
        variables = cast_floating(variables, compute_dtype)

    def model_fn(x_t: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        if compute_dtype is not None:
            x_t = x_t.astype(compute_dtype)
            cond = cast_floating(cond, compute_dtype)
        out = unet.apply(variables, x_t, t, cond["text_embedding"], cond["sex"], cond["age"], cond["heart_rate"])
        return out.astype(jnp.float32)

    return model_fn


def vae_decode_fn(vae: nn.Module, variables: Any, compute_dtype: Any = None, latent_scale: float | None = None
                  ) -> DecodeFn:
    """Adapt a VAE to `generate`'s decode_fn: `vae.apply(variables, z, latent_scale, method="decode")`, float32
    out. `latent_scale`: the factor the diffusion model's latents carry (None: the VAE's published default).
    `compute_dtype`: decode in that dtype, as `unet_model_fn` runs the U-Net."""
    if compute_dtype is not None:
        vae = with_compute_dtype(vae, compute_dtype)
        variables = cast_floating(variables, compute_dtype)
    scale = () if latent_scale is None else (float(latent_scale),)

    def decode_fn(z: jax.Array) -> jax.Array:
        if compute_dtype is not None:
            z = z.astype(compute_dtype)
        return vae.apply(variables, z, *scale, method="decode").astype(jnp.float32)

    return decode_fn


def jit_generate(
    unet: nn.Module,
    vae: nn.Module | None,
    schedule: NoiseSchedule,
    config: SamplerConfig = SamplerConfig(),
    *,
    batch_sharding: jax.sharding.Sharding | None = None,
    compute_dtype: Any = None,
    latent_scale: float | None = None,
) -> Callable[..., jax.Array]:
    """Compile-once generator `(unet_variables, vae_variables, cond, key, null_cond) -> (B, 1024, 12)`.

    `latent_scale`: the scale of the U-Net's latents (the model directory's `diffusion.latent_scale`; None: published 0.18215).

    With `vae=None` it returns latents `(B, 128, 4)` and ignores vae_variables. Variables are arguments,
    not constants baked into the program, so one compiled function serves any checkpoint of the same
    shapes; it recompiles only for a new batch size. `config` (sampler, steps, grid, guidance scale) is built
    into the program: a sweep over steps or guidance scales needs one `jit_generate` per value. Shard `cond`
    over the batch (and replicate the variables) before calling when running on a mesh.
    """

    def run(unet_variables: Any, vae_variables: Any, cond: Any, key: jax.Array, null_cond: Any = None) -> jax.Array:
        model_fn = unet_model_fn(unet, unet_variables, compute_dtype)
        if vae is None:
            return sample(model_fn, schedule, cond, key, config, null_cond=null_cond, batch_sharding=batch_sharding)
        decode_fn = vae_decode_fn(vae, vae_variables, compute_dtype, latent_scale)
        return generate(model_fn, decode_fn, schedule, cond, key, config, null_cond=null_cond,
                        batch_sharding=batch_sharding)

    return jax.jit(run)
