"""The compiled posterior sampler, editor and digital twin with tiny random U-Net and VAE modules: shapes,
sharding over the 8 simulated devices, determinism, strength 0 identity, and bad inputs caught before any
compilation. Exactness is tested on the linear-Gaussian toy in test_diffusion_posterior.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffusets_jax.diffusion.editing import jit_digital_twin, jit_edit, vae_encode_fn
from diffusets_jax.diffusion.guidance import fixed_null_condition
from diffusets_jax.diffusion.observations import make_observation
from diffusets_jax.diffusion.posterior import PosteriorConfig, jit_posterior_generate, posterior_sample
from diffusets_jax.diffusion.samplers import SamplerConfig, unet_model_fn, vae_decode_fn
from diffusets_jax.diffusion.schedule import make_schedule
from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE
from tests.helpers.random_variables import random_variables

TEXT_DIM = 8
BATCH = 8
SCHEDULE = make_schedule()
VAE_MODULE = VAE(widths=(16, 16, 16), groups=4, num_res_blocks=1)
UNET_MODULE = UNet(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=16, up_attention_dims=(32, 16),
                   num_heads=2, bottleneck_heads=2, text_dim=TEXT_DIM)
CHAIN = SamplerConfig(sampler="ddpm", steps=4, clip_sample=True)
CONFIG = PosteriorConfig(sampler=CHAIN, particles=2)


@functools.cache
def variables():
    vae_vars = random_variables(VAE_MODULE, jnp.zeros((1, 1024, 12)), jax.random.key(0), seed=1)
    unet_vars = random_variables(UNET_MODULE, jnp.zeros((1, 128, 4)), jnp.zeros((1,), jnp.int32),
                                 jnp.zeros((1, TEXT_DIM)), jnp.ones((1,)), jnp.ones((1,)), jnp.ones((1,)), seed=2)
    return unet_vars, vae_vars


@functools.cache
def mesh_sharding():
    return NamedSharding(jax.make_mesh((8,), ("data",)), PartitionSpec("data"))


def patient_cond(batch=BATCH):
    return {"text_embedding": jax.random.normal(jax.random.key(3), (batch, TEXT_DIM)),
            "sex": (jnp.arange(batch) % 2).astype(jnp.float32), "age": jnp.linspace(30.0, 80.0, batch),
            "heart_rate": jnp.linspace(55.0, 100.0, batch)}


def reference_ecgs(batch=BATCH):
    t = np.arange(1024) / 102.4
    leads = np.linspace(0.3, 1.2, 12)
    ecg = np.sin(2 * np.pi * 1.1 * t)[None, :, None] * leads[None, None, :] * np.linspace(0.8, 1.2, batch)[:, None, None]
    return ecg.astype(np.float32)


def shard(tree):
    return jax.device_put(tree, mesh_sharding())


@pytest.mark.slow
def test_jit_posterior_generate_is_sharded_and_deterministic():
    unet_vars, vae_vars = variables()
    observation = make_observation(reference_ecgs(), noise_std=0.1, leads="I,II", window=(0.0, 5.0))
    run = jit_posterior_generate(UNET_MODULE, VAE_MODULE, SCHEDULE, CONFIG, batch_sharding=mesh_sharding())
    result = run(unet_vars, vae_vars, shard(patient_cond()), shard(observation), jax.random.key(7))
    assert result.ecg.shape == (BATCH, 1024, 12) and result.latents.shape == (BATCH, 128, 4)
    assert result.ess.shape == (BATCH, CHAIN.steps) and result.log_evidence.shape == (BATCH,)
    for array in (result.ecg, result.latents, result.ess, result.log_evidence):
        assert bool(jnp.all(jnp.isfinite(array)))
    assert {shard.data.shape[0] for shard in result.ecg.addressable_shards} == {1}  # one sample per device
    assert float(result.ess.min()) >= 1.0 - 1e-4 and float(result.ess.max()) <= CONFIG.particles + 1e-4
    again = run(unet_vars, vae_vars, shard(patient_cond()), shard(observation), jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(result.ecg), np.asarray(again.ecg))
    other = run(unet_vars, vae_vars, shard(patient_cond()), shard(observation), jax.random.key(8))
    assert not np.allclose(np.asarray(result.ecg), np.asarray(other.ecg))
    # (that one device gives the same samples is tested on the toy model, where a second compile is cheap)


@pytest.mark.slow
def test_a_windowed_drift_observation_with_small_noise_weighs_the_particles():
    """`--observe-window 0,5 --drift --noise-std 0.001`: the exact likelihood of the last weighting was NaN (a
    float32 Cholesky factor of a not positive definite matrix), so the log evidence was NaN and the final choice
    among the K particles ignored the observation. The chain stays sharded and elementwise (no eigh in it)."""
    unet_vars, vae_vars = variables()
    observation = make_observation(reference_ecgs(), noise_std=0.001, window=(0.0, 5.0), drift_cutoff_hz=0.67)
    run = jit_posterior_generate(UNET_MODULE, VAE_MODULE, SCHEDULE, CONFIG, batch_sharding=mesh_sharding())
    result = run(unet_vars, vae_vars, shard(patient_cond()), shard(observation), jax.random.key(7))
    for array in (result.ecg, result.latents, result.ess, result.log_evidence):
        assert bool(jnp.all(jnp.isfinite(array)))
    assert {shard.data.shape[0] for shard in result.ecg.addressable_shards} == {1}


@pytest.mark.slow
def test_jit_edit_strength_zero_is_the_reconstruction_and_one_ignores_the_input():
    unet_vars, vae_vars = variables()
    editor = jit_edit(UNET_MODULE, VAE_MODULE, SCHEDULE, SamplerConfig(sampler="ddim", steps=4, clip_sample=True),
                      batch_sharding=mesh_sharding())
    ecg, cond = shard(jnp.asarray(reference_ecgs())), shard(patient_cond())
    reconstruction = jax.jit(lambda v, x: VAE_MODULE.apply(
        v, VAE_MODULE.apply(v, x, method="encode")[0] * 0.18215, method="decode"))(vae_vars, ecg)
    unchanged = editor(unet_vars, vae_vars, ecg, cond, jax.random.key(1), 0.0)
    np.testing.assert_allclose(np.asarray(unchanged), np.asarray(reconstruction), atol=1e-5)
    edited = editor(unet_vars, vae_vars, ecg, cond, jax.random.key(1), 0.6)
    generated = editor(unet_vars, vae_vars, ecg, cond, jax.random.key(1), 1.0)
    from_other = editor(unet_vars, vae_vars, shard(jnp.asarray(reference_ecgs()[::-1])), cond, jax.random.key(1), 1.0)
    np.testing.assert_array_equal(np.asarray(generated), np.asarray(from_other))
    assert not np.allclose(np.asarray(edited), np.asarray(unchanged), atol=1e-3)
    assert not np.allclose(np.asarray(edited), np.asarray(generated), atol=1e-3)
    for strength in (-0.1, 1.5, [0.2, 0.3]):
        with pytest.raises(ValueError, match=r"^strength: must be one number in \[0, 1\]"):
            editor(unet_vars, vae_vars, ecg, cond, jax.random.key(1), strength)
    with pytest.raises(ValueError, match=r"^ecg: expected ECGs shaped \(batch=8, 1024, 12\)"):
        editor(unet_vars, vae_vars, jnp.asarray(reference_ecgs(4)), cond, jax.random.key(1), 0.5)


@pytest.mark.slow
def test_jit_digital_twin_with_guidance_starts_from_the_reference():
    unet_vars, vae_vars = variables()
    config = PosteriorConfig(sampler=SamplerConfig(sampler="ddpm", steps=3, clip_sample=False, guidance_scale=2.0),
                             particles=2)
    twin = jit_digital_twin(UNET_MODULE, VAE_MODULE, SCHEDULE, config, batch_sharding=mesh_sharding())
    reference = shard(jnp.asarray(reference_ecgs()))
    observation = shard(make_observation(reference_ecgs(), noise_std=0.2, leads="V1,V2,V3", drift_cutoff_hz=0.67))
    null = fixed_null_condition(TEXT_DIM)
    result = twin(unet_vars, vae_vars, reference, observation, shard(patient_cond()), jax.random.key(2), 0.7, null)
    assert result.ecg.shape == (BATCH, 1024, 12) and bool(jnp.all(jnp.isfinite(result.ecg)))
    kept = twin(unet_vars, vae_vars, reference, observation, shard(patient_cond()), jax.random.key(2), 0.0, null)
    encode = vae_encode_fn(VAE_MODULE, vae_vars)
    decode = vae_decode_fn(VAE_MODULE, vae_vars)
    # the same computation, fused differently inside the chain's program: float32 rounding (since main's decoder
    # runs short convolutions as one matmul, up to 2e-5 mV on values near 1 mV); a wrong start is off by ~0.1 mV
    np.testing.assert_allclose(np.asarray(kept.ecg), np.asarray(decode(encode(reference, None))), rtol=1e-4, atol=1e-4)


def test_bad_inputs_fail_before_anything_is_computed():
    unet_vars, vae_vars = variables()
    model, decode = unet_model_fn(UNET_MODULE, unet_vars), vae_decode_fn(VAE_MODULE, vae_vars)
    cond, key = patient_cond(), jax.random.key(0)
    sample = functools.partial(posterior_sample, model, decode, SCHEDULE, cond, key)
    wrong_batch = make_observation(reference_ecgs(4), noise_std=0.1)
    with pytest.raises(ValueError, match=r"^observation: values have shape \(4, 1024, 12\), expected \(8, 1024, 12\)"):
        sample(CONFIG, observation=wrong_batch)
    observation = make_observation(reference_ecgs(), noise_std=0.1)
    with pytest.raises(ValueError, match=r"^eta: posterior sampling needs a stochastic chain"):
        sample(PosteriorConfig(sampler=SamplerConfig(sampler="ddim", eta=0.0, clip_sample=False)), observation=observation)
    with pytest.raises(ValueError, match=r"^clip_sample: None means 'as the model directs'"):
        sample(PosteriorConfig(), observation=observation)
    with pytest.raises(ValueError, match=r"^strength: a strength below 1 needs start_latents"):
        sample(CONFIG, strength=0.5)
    with pytest.raises(ValueError, match=r"^start_latents: shape \(8, 64, 4\), expected \(8, 128, 4\)"):
        sample(CONFIG, start_latents=jnp.zeros((8, 64, 4)), strength=0.5)
    with pytest.raises(ValueError, match=r"^batch: 6 samples do not split over the 8 batch shards"):
        posterior_sample(model, decode, SCHEDULE, patient_cond(6), key, CONFIG, batch_sharding=mesh_sharding())
    for kwargs, message in (({"sampler": SamplerConfig(sampler="dpmpp_2m")}, r"^sampler: posterior sampling and "
                             "editing run ddpm or ddim, got 'dpmpp_2m'"),
                            ({"particles": 0}, r"^particles: must be >= 1"),
                            ({"resample_ess": 1.5}, r"^resample_ess: must be in \[0, 1\]"),
                            ({"twist_variance": -1.0}, r"^twist_variance: must be >= 0"),
                            ({"max_shift": 0.0}, r"^max_shift: must be > 0")):
        with pytest.raises(ValueError, match=message):
            PosteriorConfig(**kwargs)
    with pytest.raises(ValueError, match=r"^encoding: must be one of \('mean', 'sample'\)"):
        vae_encode_fn(VAE_MODULE, vae_vars, encoding="mode")
