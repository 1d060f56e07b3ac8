"""Classifier-free guidance (diffusets_jax/diffusion/guidance.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.diffusion.guidance import (
    UNKNOWN_PATIENT_VALUE,
    broadcast_null_condition,
    drop_conditions,
    fixed_null_condition,
    guided_model_fn,
)
from diffusets_jax.diffusion.samplers import SamplerConfig, sample
from diffusets_jax.diffusion.schedule import make_schedule


def patient_cond(batch, text_dim=8):
    return {
        "text_embedding": jax.random.normal(jax.random.key(0), (batch, text_dim)) + 5.0,
        "sex": (jnp.arange(batch) % 2).astype(jnp.int32),
        "age": jnp.linspace(20, 80, batch),
        "heart_rate": jnp.linspace(50, 110, batch),
    }


def test_fixed_null_condition():
    null = fixed_null_condition(8)
    assert null["text_embedding"].shape == (8,) and float(jnp.abs(null["text_embedding"]).sum()) == 0
    assert all(float(null[k]) == UNKNOWN_PATIENT_VALUE for k in ("sex", "age", "heart_rate"))
    full = broadcast_null_condition(null, patient_cond(3))
    assert full["text_embedding"].shape == (3, 8) and full["sex"].dtype == jnp.int32


def test_a_null_condition_of_another_width_is_named():
    # Was "Incompatible types for broadcasting: input type=float32[16] ..." from inside the guided chain.
    with pytest.raises(ValueError, match=r"null_cond\['text_embedding'\] has shape \(16,\).*expected \(8,\)"):
        broadcast_null_condition(fixed_null_condition(16), patient_cond(3))


def test_drop_probability_zero_is_the_identity_and_one_drops_everything():
    cond = patient_cond(16)
    null = fixed_null_condition(8)
    assert drop_conditions(cond, jax.random.key(0), 0.0, null) is cond
    dropped = jax.jit(drop_conditions)(cond, jax.random.key(0), 1.0, null)
    np.testing.assert_array_equal(dropped["text_embedding"], 0.0)
    for field in ("sex", "age", "heart_rate"):
        np.testing.assert_array_equal(dropped[field], UNKNOWN_PATIENT_VALUE)


def test_drop_draws_the_same_samples_under_x64():
    # A Python-float p drew its Bernoulli uniforms in float64 under jax_enable_x64: another set was dropped.
    cond, null = patient_cond(64), fixed_null_condition(8)
    drops = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            drops.append(np.asarray(jax.jit(drop_conditions, static_argnums=2)(cond, jax.random.key(0), 0.5, null)["age"]))
    np.testing.assert_array_equal(drops[1], drops[0])


def test_drop_is_per_sample_joint_and_at_the_requested_rate():
    cond = patient_cond(4096)
    null = fixed_null_condition(8)
    dropped = jax.jit(drop_conditions)(cond, jax.random.key(1), jnp.float32(0.2), null)  # traced p
    text_dropped = np.asarray(jnp.all(dropped["text_embedding"] == 0, axis=-1))
    assert text_dropped.mean() == pytest.approx(0.2, abs=0.02)
    for field in ("sex", "age", "heart_rate"):  # every field of a sample is dropped together
        np.testing.assert_array_equal(np.asarray(dropped[field] == UNKNOWN_PATIENT_VALUE), text_dropped)
    kept = ~text_dropped
    np.testing.assert_array_equal(np.asarray(dropped["age"])[kept], np.asarray(cond["age"])[kept])
    # different keys drop different samples
    other = jax.jit(drop_conditions)(cond, jax.random.key(2), 0.2, null)
    assert not np.array_equal(np.asarray(jnp.all(other["text_embedding"] == 0, axis=-1)), text_dropped)


def test_learned_null_condition_receives_gradients():
    cond = patient_cond(64)

    def loss(null):
        dropped = drop_conditions(cond, jax.random.key(3), 0.5, null)
        return jnp.sum(dropped["text_embedding"]) + jnp.sum(dropped["age"])

    grads = jax.jit(jax.grad(loss))(fixed_null_condition(8))
    n_dropped = float(grads["age"])
    assert 16 < n_dropped < 48  # d loss / d null_age = number of dropped samples
    np.testing.assert_allclose(np.asarray(grads["text_embedding"]), n_dropped)


def linear_model_fn(x_t, t, cond):
    """Depends on every condition field, so guidance arithmetic is visible."""
    shift = cond["text_embedding"].mean(-1) + cond["sex"] + 0.01 * cond["age"] + 0.001 * cond["heart_rate"]
    return 0.5 * x_t + shift[:, None, None] + 1e-3 * t[:, None, None]


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_guided_output_is_the_cfg_combination(mode):
    cond = patient_cond(6)
    null = fixed_null_condition(8)
    x = jax.random.normal(jax.random.key(4), (6, 128, 4))
    t = jnp.arange(6, dtype=jnp.int32) * 100
    guided = jax.jit(guided_model_fn(linear_model_fn, null, 4.0, mode))(x, t, cond)
    out_cond = linear_model_fn(x, t, cond)
    out_null = linear_model_fn(x, t, broadcast_null_condition(null, cond))
    np.testing.assert_allclose(np.asarray(guided), np.asarray(out_null + 4.0 * (out_cond - out_null)), rtol=1e-5, atol=1e-5)


def test_guidance_scale_one_is_the_plain_model_and_missing_null_is_an_error():
    assert guided_model_fn(linear_model_fn, None, 1.0) is linear_model_fn
    with pytest.raises(ValueError, match="null condition"):
        guided_model_fn(linear_model_fn, None, 2.0)
    with pytest.raises(ValueError, match="mode"):
        guided_model_fn(linear_model_fn, fixed_null_condition(8), 2.0, "parallel")


def test_guided_sampling_batched_equals_sequential_and_scale_zero_is_unconditional():
    """Gaussian data whose mean is the condition's age / 100 (null age -1 -> mean -0.01): scale 0 samples the
    null-conditional distribution; batched and sequential guidance give the same samples."""
    schedule = make_schedule()

    def model_fn(x_t, t, cond):
        abar = schedule.alphas_cumprod[t][:, None, None]
        mu = (cond["age"] / 100.0)[:, None, None]
        return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu)  # optimal eps for unit-variance data

    cond = {"age": jnp.full((32,), 60.0)}
    null = {"age": jnp.asarray(UNKNOWN_PATIENT_VALUE)}
    run = lambda config: np.asarray(
        jax.jit(functools.partial(sample, model_fn, schedule, config=config, null_cond=null))(cond, jax.random.key(5))
    )
    base = dict(sampler="dpmpp_2m", steps=20, clip_sample=False)
    conditional = run(SamplerConfig(**base))
    unconditional = run(SamplerConfig(**base, guidance_scale=0.0))
    assert conditional.mean() == pytest.approx(0.6, abs=0.04)
    assert unconditional.mean() == pytest.approx(-0.01, abs=0.04)
    batched = run(SamplerConfig(**base, guidance_scale=3.0, guidance_mode="batched"))
    sequential = run(SamplerConfig(**base, guidance_scale=3.0, guidance_mode="sequential"))
    np.testing.assert_allclose(batched, sequential, atol=1e-5)
    assert batched.mean() > conditional.mean() + 0.5  # guidance pushes away from the null mean
