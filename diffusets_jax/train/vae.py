"""VAE training (reference section 5): reconstruction + annealed KL, AdamW with one-cycle.

Loss per batch = sum of squared error over (1024 x 12) averaged over the batch
               + w * KL(N(mean, exp(logvar)) || N(0, 1)) summed over the 4 latent channels and averaged
                 over batch and latent length.
The reference sets w = (epoch + 1) / 10 for the first 10 epochs ("per_epoch", faithful); the paper
describes a linear ramp from 0, available as "linear" (per step, from 0 to 1 over the same epochs).
Validation: reconstruction MAE in mV of the posterior mean, and the two loss terms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusets_jax.config import module_fields
from diffusets_jax.ecg.shapes import ECG_LENGTH, NUM_LEADS
from diffusets_jax.models.precision import cast_floating, with_compute_dtype
from diffusets_jax.models.vae import LATENT_SCALE, VAE
from diffusets_jax.train.loop import Task
from diffusets_jax.train.optim import learning_rate_schedule, make_optimizer, steps_per_epoch

KL_SCHEDULES = ("per_epoch", "linear")


def build_vae(config: ml_collections.ConfigDict) -> VAE:
    """The VAE from `config.model` (its fields; empty = the published model)."""
    return VAE(**module_fields(config))


def kl_weight(step: jax.Array, steps_in_epoch: int, anneal_epochs: float, schedule: str) -> jax.Array:
    """KL weight at optimiser step `step` (0-based): reaches 1 after `anneal_epochs` epochs."""
    step = jnp.asarray(step, jnp.float32)
    if anneal_epochs <= 0:
        return jnp.ones((), jnp.float32)
    if schedule == "per_epoch":
        epoch = jnp.floor(step / steps_in_epoch)
        return jnp.minimum(1.0, (epoch + 1.0) / anneal_epochs)
    if schedule == "linear":
        return jnp.minimum(1.0, step / (anneal_epochs * steps_in_epoch))
    raise ValueError(f"train.kl_schedule must be one of {KL_SCHEDULES}, got {schedule!r}")


def vae_losses(recon: jax.Array, ecg: jax.Array, mean: jax.Array, logvar: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(reconstruction, kl)` terms, float32. recon/ecg `(batch, 1024, 12)`; mean/logvar `(batch, 128, 4)`."""
    recon, ecg, mean, logvar = (a.astype(jnp.float32) for a in (recon, ecg, mean, logvar))
    reconstruction = jnp.sum(jnp.square(recon - ecg)) / ecg.shape[0]
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)  # (batch, length)
    return reconstruction, jnp.mean(kl)


def vae_task(config: ml_collections.ConfigDict, num_steps: int) -> Task:
    """The generic loop's Task for `diffusets-jax train vae`. Batches: `{"ecg": (batch, 1024, 12)}` in mV."""
    tc = config.train
    model = build_vae(config)
    schedule = learning_rate_schedule(config.optimizer, num_steps)
    compute_dtype = jnp.dtype(tc.compute_dtype)
    # bf16 compute: convolutions and projections in bf16, GroupNorm statistics, the attention softmax and the
    # losses in float32, master parameters and optimiser state in float32.
    compute_model = with_compute_dtype(model, compute_dtype)
    steps_in_epoch = steps_per_epoch(config)
    anneal_epochs = float(tc.kl_anneal_epochs)
    kl_schedule = str(tc.kl_schedule)
    kl_weight(0, steps_in_epoch, anneal_epochs, kl_schedule)  # validate the name now, not inside jit

    def init_variables(key: jax.Array) -> dict[str, Any]:
        init_key, sample_key = jax.random.split(key)
        return model.init(init_key, jnp.zeros((1, ECG_LENGTH, model.in_channels)), sample_key)

    def loss_fn(params, model_state, batch, key, step):
        ecg = batch["ecg"]
        recon, mean, logvar = compute_model.apply({"params": cast_floating(params, compute_dtype)},
                                                  ecg.astype(compute_dtype), key)
        reconstruction, kl = vae_losses(recon, ecg, mean, logvar)
        weight = kl_weight(step, steps_in_epoch, anneal_epochs, kl_schedule)
        loss = reconstruction + weight * kl
        return loss, ({"reconstruction": reconstruction, "kl": kl, "kl_weight": weight}, model_state)

    def eval_fn(params, model_state, batch, key):
        ecg = batch["ecg"]
        variables = {"params": params}
        mean, logvar = model.apply(variables, ecg, method=VAE.encode)
        recon = model.apply(variables, mean * LATENT_SCALE, method=VAE.decode)  # posterior mean, no noise
        reconstruction, kl = vae_losses(recon, ecg, mean, logvar)
        return {"reconstruction_mae_mv": jnp.mean(jnp.abs(recon - ecg)), "reconstruction": reconstruction,
                "kl": kl}

    if model.in_channels != NUM_LEADS:
        raise ValueError(f"model.in_channels must be {NUM_LEADS} (12-lead ECGs), got {model.in_channels}")
    return Task("vae", init_variables, loss_fn, make_optimizer(config.optimizer, schedule), schedule, eval_fn, model)


