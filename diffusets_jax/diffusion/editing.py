"""Editing (SDEdit) and digital twins: re-generate a real ECG under new text and patient conditions.

Edit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic differential
equations"): encode the ECG with the VAE, noise the latent by the forward process to the timestep
`strength * T`, and run the reverse chain from there under the new conditions. What survives is what the
noise at that level leaves: as in SDEdit, low strengths are expected to keep the recording's rhythm, axis
and morphology and change details, high strengths only its coarse layout; strength 1 starts from pure noise, so it is
generation under the new conditions (in distribution, whatever the input); strength 0 runs no step and
returns the VAE reconstruction decode(encode(x)).

Digital twin: several ECGs for one patient from their own recording and a changed report (say, new atrial
fibrillation or hyperkalaemia). It is posterior sampling (`posterior.posterior_sample`) under the new
conditions, started like an edit from the patient's encoded recording, with an observation of that
recording. It keeps:
- what the observation pins down: the observed leads and window, up to `noise_std` (a larger noise_std,
  e.g. 0.2 mV, lets the report move the morphology; a smaller one, e.g. 0.05 mV, keeps the observed leads
  nearly as recorded and lets the report act on the unobserved ones);
- what the edit strength keeps of the recording's latent (rhythm and layout at low strength);
- and draws everything else from the model under the new report, sex, age and heart rate.
For the report to change the rhythm (new AF), observe little (one lead, a large noise_std) or rely on
the edit alone; to change repolarisation (hyperkalaemia), observing all leads with 0.1-0.2 mV is the
natural first try. These are starting points, not validated settings: no trained checkpoint was available
when this was written, so only the tests' toy and random models have been run.

Cost: an edit at strength s runs about s * steps network calls; a twin additionally differentiates through
the U-Net and decoder for K particles (see `posterior`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.diffusion.guidance import condition_batch_size
from diffusets_jax.diffusion.observations import Observation
from diffusets_jax.diffusion.posterior import (
    ModelFn,
    PosteriorConfig,
    PosteriorResult,
    posterior_sample,
)
from diffusets_jax.diffusion.samplers import DecodeFn, SamplerConfig, unet_model_fn, vae_decode_fn
from diffusets_jax.diffusion.schedule import NoiseSchedule
from diffusets_jax.models.vae import LATENT_SCALE

EncodeFn = Callable[[jax.Array, jax.Array], jax.Array]
ENCODINGS: tuple[str, ...] = ("mean", "sample")
# 50 DDIM steps for a whole chain (an edit runs the part below its start); clipping as the model directs.
EDIT_SAMPLER = SamplerConfig(sampler="ddim", steps=50, clip_sample=None)
POSTERIOR_DEFAULTS = PosteriorConfig()


def vae_encode_fn(vae: nn.Module, variables: Any, latent_scale: float | None = None, encoding: str = "mean"
                  ) -> EncodeFn:
    """Adapt a VAE to `encode_fn(ecg (B, 1024, 12), key) -> scaled latent (B, 128, 4)`, float32.

    encoding: "mean" (the encoder's posterior mean, deterministic; the key is unused) or "sample" (a
    reparameterised draw, `VAE.sample_latent`). `latent_scale`: the factor the diffusion model's latents
    carry (None: the published 0.18215). Encoding runs once per edit, so it stays in float32 whatever the
    sampler's compute dtype, and strength 0 reproduces the float32 reconstruction.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding: must be one of {ENCODINGS}, got {encoding!r}")
    scale = LATENT_SCALE if latent_scale is None else float(latent_scale)

    def encode_fn(ecg: jax.Array, key: jax.Array) -> jax.Array:
        mean, logvar = vae.apply(variables, ecg.astype(jnp.float32), method="encode")
        if encoding == "mean":
            return mean * scale
        return vae.sample_latent(mean, logvar, key, scale)

    return encode_fn


def _check_strength(strength: Any) -> None:
    """One-line ValueError for a strength outside [0, 1]; traced strengths are checked by the jitted wrappers."""
    if isinstance(strength, jax.core.Tracer):
        return
    values = np.asarray(strength, np.float64)
    if values.ndim != 0 or not 0.0 <= float(values) <= 1.0:
        raise ValueError(f"strength: must be one number in [0, 1] (0 = reconstruction, 1 = new generation), "
                         f"got {strength!r}")


def _check_ecg(ecg: Any, batch: int, what: str) -> None:
    shape = tuple(np.shape(ecg))
    if len(shape) != 3 or shape[0] != batch:
        raise ValueError(f"{what}: expected ECGs shaped (batch={batch}, 1024, 12), one per sample of the conditions, "
                         f"got {shape}")


def edit(
    model_fn: ModelFn,
    encode_fn: EncodeFn,
    decode_fn: DecodeFn,
    schedule: NoiseSchedule,
    ecg: jax.Array,
    cond: Any,
    key: jax.Array,
    strength: jax.Array | float,
    config: SamplerConfig = EDIT_SAMPLER,
    *,
    null_cond: Any = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """SDEdit: ECGs `(B, 1024, 12)` re-generated from `ecg` `(B, 1024, 12)` under `cond` at `strength` in [0, 1].

    The chain is `config`'s ("ddim", deterministic with eta 0, or "ddpm"); an edit at strength s runs the
    grid's steps below timestep `posterior.strength_timestep(s)`, about s * config.steps of them. Strength 0
    returns decode(encode(ecg)); strength 1 is generation from pure noise. Pure; see `jit_edit`.
    """
    _check_strength(strength)
    _check_ecg(ecg, condition_batch_size(cond), "ecg")
    encode_key, chain_key = jax.random.split(key)
    latents = encode_fn(ecg, encode_key)
    result = posterior_sample(model_fn, decode_fn, schedule, cond, chain_key, PosteriorConfig(sampler=config),
                              start_latents=latents, strength=strength, null_cond=null_cond,
                              batch_sharding=batch_sharding)
    return result.ecg


def digital_twin(
    model_fn: ModelFn,
    encode_fn: EncodeFn,
    decode_fn: DecodeFn,
    schedule: NoiseSchedule,
    reference: jax.Array,
    observation: Observation,
    cond: Any,
    key: jax.Array,
    strength: jax.Array | float,
    config: PosteriorConfig = POSTERIOR_DEFAULTS,
    *,
    null_cond: Any = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> PosteriorResult:
    """Twins of a patient's recording under new conditions: posterior sampling given `observation`, started
    from `reference` `(B, 1024, 12)` edited at `strength` (1: from noise, keeping only what is observed).

    For n twins of one patient repeat the recording, its observation and the new condition n times along the
    batch. Returns a PosteriorResult (ECGs `(B, 1024, 12)`, latents, log evidence, ESS). Pure; see
    `jit_digital_twin`.
    """
    _check_strength(strength)
    _check_ecg(reference, condition_batch_size(cond), "reference")
    encode_key, chain_key = jax.random.split(key)
    latents = encode_fn(reference, encode_key)
    return posterior_sample(model_fn, decode_fn, schedule, cond, chain_key, config, observation=observation,
                            start_latents=latents, strength=strength, null_cond=null_cond,
                            batch_sharding=batch_sharding)


def jit_edit(
    unet: nn.Module,
    vae: nn.Module,
    schedule: NoiseSchedule,
    config: SamplerConfig = EDIT_SAMPLER,
    *,
    encoding: str = "mean",
    batch_sharding: jax.sharding.Sharding | None = None,
    compute_dtype: Any = None,
    latent_scale: float | None = None,
) -> Callable[..., jax.Array]:
    """Compile-once editor `(unet_variables, vae_variables, ecg, cond, key, strength, null_cond=None) -> (B, 1024, 12)`.

    `strength` is an argument of the compiled program (a sweep over strengths compiles once); a number is
    checked to lie in [0, 1] before the call, and a traced one (under jax.vmap) outside it gives NaN ECGs.
    Recompiles only for a new batch size. Shard `ecg` and `cond` over the batch and replicate the variables
    before calling on a mesh.
    """

    def run(unet_variables, vae_variables, ecg, cond, key, strength, null_cond):
        return edit(unet_model_fn(unet, unet_variables, compute_dtype),
                    vae_encode_fn(vae, vae_variables, latent_scale, encoding),
                    vae_decode_fn(vae, vae_variables, compute_dtype, latent_scale),
                    schedule, ecg, cond, key, strength, config, null_cond=null_cond, batch_sharding=batch_sharding)

    compiled = jax.jit(run)

    def call(unet_variables: Any, vae_variables: Any, ecg: jax.Array, cond: Any, key: jax.Array,
             strength: float, null_cond: Any = None) -> jax.Array:
        _check_strength(strength)
        _check_ecg(ecg, condition_batch_size(cond), "ecg")
        return compiled(unet_variables, vae_variables, ecg, cond, key, jnp.asarray(strength, jnp.float32), null_cond)

    return call


def jit_digital_twin(
    unet: nn.Module,
    vae: nn.Module,
    schedule: NoiseSchedule,
    config: PosteriorConfig = POSTERIOR_DEFAULTS,
    *,
    encoding: str = "mean",
    batch_sharding: jax.sharding.Sharding | None = None,
    compute_dtype: Any = None,
    latent_scale: float | None = None,
) -> Callable[..., PosteriorResult]:
    """Compile-once twin generator `(unet_variables, vae_variables, reference, observation, cond, key, strength,
    null_cond=None) -> PosteriorResult`; strength is a checked argument as in `jit_edit`."""

    def run(unet_variables, vae_variables, reference, observation, cond, key, strength, null_cond):
        return digital_twin(unet_model_fn(unet, unet_variables, compute_dtype),
                            vae_encode_fn(vae, vae_variables, latent_scale, encoding),
                            vae_decode_fn(vae, vae_variables, compute_dtype, latent_scale),
                            schedule, reference, observation, cond, key, strength, config, null_cond=null_cond,
                            batch_sharding=batch_sharding)

    compiled = jax.jit(run)

    def call(unet_variables: Any, vae_variables: Any, reference: jax.Array, observation: Observation, cond: Any,
             key: jax.Array, strength: float, null_cond: Any = None) -> PosteriorResult:
        _check_strength(strength)
        _check_ecg(reference, condition_batch_size(cond), "reference")
        return compiled(unet_variables, vae_variables, reference, observation, cond, key,
                        jnp.asarray(strength, jnp.float32), null_cond)

    return call
