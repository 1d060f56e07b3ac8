"""Noise schedule, forward process and training losses for latent diffusion.

The schedule is a `flax.struct.dataclass` pytree so it can be passed into (or closed over by) jitted
functions; its prediction type is static metadata because it changes the traced computation.

Faithful DiffuSETS values (arXiv 2501.05932, reference code with diffusers 0.27.2 `DDPMScheduler`):
linear betas 0.00085 -> 0.012 over T = 1000 (not "scaled_linear"), epsilon prediction, training
timesteps uniform in [1, 998] (`randint(1, 999)`), loss = sum of squared error over the latent divided
by the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusets_jax.models.vae import LATENT_SCALE

PredictionType = Literal["epsilon", "v_prediction"]
LossReduction = Literal["sum_per_sample", "mean"]
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
LOSS_REDUCTIONS: tuple[str, ...] = ("sum_per_sample", "mean")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """How to build a `NoiseSchedule`. The defaults are the faithful DiffuSETS values.

    beta_schedule: "linear" (betas evenly spaced from beta_start to beta_end) or "cosine"
        (Nichol & Dhariwal 2021, alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas capped at 0.999).
    prediction_type: what the network predicts, "epsilon" (faithful) or "v_prediction"
        (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022), for new models.
    """

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    cosine_s: float = 0.008
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.beta_schedule == "linear" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"linear betas need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )


FAITHFUL_SCHEDULE = ScheduleConfig()


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """The diffusion a U-Net was trained with: its schedule and the latent space it denoises.

    The same shape as a U-Net config's `diffusion` section (`config.diffusion_section`), resolved: sampling reads
    it from the model directory, so a U-Net is always sampled with the schedule, prediction type and latent scale
    it was trained with.

    latent_scale: the factor the VAE posterior was multiplied by (the VAE decoder divides by it).
    scale_by_std: whether `latent_scale` was measured as 1 / std of the training latents.
    clip_sample: whether DDPM clips the predicted latent to [-1, 1] by default (the published sampler does).
    latent_std: the standard deviation of the scaled training latents (what the U-Net saw; ~0.18 for the
        published model on MIMIC), measured at export; None when unknown (a converted checkpoint). Fast samplers
        are validated at this scale.
    """

    schedule: ScheduleConfig = FAITHFUL_SCHEDULE
    latent_scale: float = LATENT_SCALE
    scale_by_std: bool = False
    clip_sample: bool = True
    latent_std: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.latent_scale < math.inf:
            raise ValueError(f"latent_scale must be a positive number, got {self.latent_scale}")
        if self.latent_std is not None and not 0.0 < self.latent_std < math.inf:
            raise ValueError(f"latent_std must be a positive number or null, got {self.latent_std}")

    def to_json(self) -> dict[str, Any]:
        return {"schedule": dataclasses.asdict(self.schedule), "latent_scale": self.latent_scale,
                "scale_by_std": self.scale_by_std, "clip_sample": self.clip_sample, "latent_std": self.latent_std}

    @classmethod
    def from_json(cls, data: Any, where: str) -> DiffusionSpec:
        """From a model index's (or a resolved config's) `diffusion` object; one-line errors naming `where`."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: 'diffusion' must be an object")
        unknown = sorted(set(data) - {"schedule", "latent_scale", "scale_by_std", "clip_sample", "latent_std"})
        if unknown:
            raise ValueError(f"{where}: diffusion has unknown fields {unknown}")
        try:
            schedule = ScheduleConfig(**dict(data.get("schedule", {})))
            return cls(schedule=schedule, latent_scale=float(data.get("latent_scale", LATENT_SCALE)),
                       scale_by_std=bool(data.get("scale_by_std", False)),
                       clip_sample=bool(data.get("clip_sample", True)), latent_std=data.get("latent_std"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: diffusion: {err}") from None


@struct.dataclass
class NoiseSchedule:
    """Discrete-time DDPM schedule. All arrays are float32 of shape `(num_timesteps,)`.

    alphas_cumprod[t] is alpha_bar_t = prod_{s <= t} (1 - beta_s), t = 0 … T-1 (diffusers indexing).
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def _reference_float32_linspace(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` on an x86 CPU, rounding included.

    Why emulate rounding: the faithful DDPM step at t = 1 computes beta_t = 1 - abar_1 / abar_0, a
    cancellation that turns a one-ulp difference in abar into ~1e-4 relative error in the step. PyTorch
    fills float32 linspace in 8-wide vector chunks, each chunk `base + k * step` from the nearer end
    (ATen RangeFactoriesKernel, AVX2). Reproducing that gives the reference betas bit for bit.
    """
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    step = f32((end32 - start32) / f32(n - 1))
    lanes, halfway = 8, n // 2
    betas = np.empty(n, np.float32)
    vectorised = (n // lanes) * lanes
    for chunk in range(0, vectorised, lanes):
        base = f32(start32 + step * f32(chunk)) if chunk < halfway else f32(end32 - step * f32(n - chunk - 1))
        betas[chunk : chunk + lanes] = base + np.arange(lanes, dtype=np.float32) * step
    for idx in range(vectorised, n):  # scalar tail
        betas[idx] = f32(start32 + step * f32(idx)) if idx < halfway else f32(end32 - step * f32(n - idx - 1))
    return betas


def make_schedule(config: ScheduleConfig = FAITHFUL_SCHEDULE) -> NoiseSchedule:
    """Build the schedule as float32 arrays.

    Linear betas are rounded exactly as the reference's float32 `torch.linspace`, alphas = 1 - betas in
    float32, and the cumulative product is accumulated in float64 (as ATen's CPU `cumprod` does for
    float32) and rounded once: this matches the reference `alphas_cumprod` to <= 2 ulp and the DDPM step
    to ~1e-7 (tests/test_diffusion_schedule.py, tests/test_diffusion_samplers.py).
    """
    n = config.num_timesteps
    if config.beta_schedule == "linear":
        betas = _reference_float32_linspace(config.beta_start, config.beta_end, n)
    else:
        steps = np.arange(n + 1, dtype=np.float64) / n
        alpha_bar = np.cos((steps + config.cosine_s) / (1.0 + config.cosine_s) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    alphas = np.float32(1.0) - betas
    alphas_cumprod = np.cumprod(alphas.astype(np.float64))
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas=jnp.asarray(alphas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        prediction_type=config.prediction_type,
    )


def _per_sample(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Gather `values[t]` and reshape so it broadcasts against an array of rank `ndim` (batch first)."""
    gathered = values[jnp.asarray(t, jnp.int32)]
    return gathered.reshape(gathered.shape + (1,) * (ndim - gathered.ndim))


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    x0, noise: `(batch, 128, 4)` (any trailing shape); t: `(batch,)` int or a scalar.
    """
    abar = _per_sample(schedule.alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0, the v-prediction target. Shapes as `q_sample`."""
    abar = _per_sample(schedule.alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """What the network should output for `q_sample(schedule, x0, t, noise)`: the noise, or v."""
    if schedule.prediction_type == "epsilon":
        return noise
    return velocity(schedule, x0, t, noise)


def predict_x0_and_eps(
    schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Turn a network output into (predicted x0, predicted noise), whatever the prediction type.

    model_output, x_t: `(batch, 128, 4)`; t: `(batch,)` or scalar int. Computed in float32.
    """
    x_t = x_t.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)
    abar = _per_sample(schedule.alphas_cumprod, t, x_t.ndim)
    sqrt_abar, sqrt_one_minus = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if schedule.prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sqrt_one_minus * eps) / sqrt_abar
    else:
        x0 = sqrt_abar * x_t - sqrt_one_minus * model_output
        eps = sqrt_one_minus * x_t + sqrt_abar * model_output
    return x0, eps


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Training-loss options. Defaults are faithful.

    t_min, t_max: training timesteps are drawn uniformly from [t_min, t_max] inclusive; the reference draws
        `randint(1, 999)`, i.e. [1, 998], never training on t = 0 or t = 999.
    reduction: "sum_per_sample" (faithful: squared error summed over the latent, averaged over the batch)
        or "mean" (averaged over every element; 512 times smaller for a (128, 4) latent, so scale the
        learning rate accordingly).
    """

    t_min: int = 1
    t_max: int = 998
    reduction: str = "sum_per_sample"

    def __post_init__(self) -> None:
        if self.reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}, got {self.reduction!r}")
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(f"need 0 <= t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")


FAITHFUL_LOSS = LossConfig()


def sample_timesteps(key: jax.Array, batch_size: int, config: LossConfig = FAITHFUL_LOSS) -> jax.Array:
    """Training timesteps `(batch,)` int32, uniform in [config.t_min, config.t_max]."""
    return jax.random.randint(key, (batch_size,), config.t_min, config.t_max + 1, dtype=jnp.int32)


def reduce_squared_error(prediction: jax.Array, target: jax.Array, reduction: str) -> jax.Array:
    """Scalar loss from `(batch, ...)` prediction and target, in float32."""
    squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    if reduction == "sum_per_sample":
        return jnp.sum(squared) / squared.shape[0]
    if reduction == "mean":
        return jnp.mean(squared)
    raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")


def diffusion_loss(
    schedule: NoiseSchedule,
    model_fn: ModelFn,
    x0: jax.Array,
    cond: Any,
    key: jax.Array,
    config: LossConfig = FAITHFUL_LOSS,
) -> jax.Array:
    """The denoising loss for one batch: draw t and noise, noise x0, predict, compare with the target.

    x0: clean latents `(batch, 128, 4)`; cond: per-sample condition pytree passed through to
    `model_fn(x_t, t, cond)`. Pure and jit-friendly; the random draws depend only on `key` and the
    global batch shape, so they do not change with the sharding.
    """
    if config.t_max >= schedule.num_timesteps:
        raise ValueError(f"LossConfig.t_max={config.t_max} must be < num_timesteps={schedule.num_timesteps}")
    t_key, noise_key = jax.random.split(key)
    t = sample_timesteps(t_key, x0.shape[0], config)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32).astype(x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    prediction = model_fn(x_t, t, cond)
    return reduce_squared_error(prediction, training_target(schedule, x0, t, noise), config.reduction)
