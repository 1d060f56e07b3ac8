"""Noise schedule, forward process and losses (diffusets_jax/diffusion/schedule.py)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.diffusion.schedule import (
    LossConfig,
    ScheduleConfig,
    diffusion_loss,
    make_schedule,
    predict_x0_and_eps,
    q_sample,
    reduce_squared_error,
    sample_timesteps,
    training_target,
    velocity,
)

VECTORS = Path(__file__).parent / "data" / "reference_vectors.npz"


def test_faithful_alphas_cumprod_match_reference_scheduler():
    reference = np.load(VECTORS)["alphas_cumprod"]
    ours = np.asarray(make_schedule().alphas_cumprod)
    assert ours.dtype == np.float32 and ours.shape == (1000,)
    # within 2 ulp everywhere (the reference's float32 rounding is reproduced, not just approximated)
    np.testing.assert_array_max_ulp(ours, reference, maxulp=2)
    # the first 600 entries, which the sensitive small-t steps use, are bit-identical
    np.testing.assert_array_equal(ours[:600], reference[:600])


def test_linear_schedule_endpoints_and_monotonic():
    schedule = make_schedule()
    betas = np.asarray(schedule.betas)
    assert betas[0] == pytest.approx(0.00085, rel=1e-6) and betas[-1] == pytest.approx(0.012, rel=1e-6)
    assert np.all(np.diff(betas) > 0)
    np.testing.assert_allclose(np.asarray(schedule.alphas), 1 - betas, rtol=0, atol=0)
    assert schedule.num_timesteps == 1000 and schedule.prediction_type == "epsilon"


def test_cosine_schedule():
    schedule = make_schedule(ScheduleConfig(beta_schedule="cosine", num_timesteps=200))
    abar = np.asarray(schedule.alphas_cumprod)
    assert abar.shape == (200,)
    assert np.all(np.diff(abar) < 0) and 0 <= abar[-1] < 1e-3 and abar[0] > 0.999
    assert np.asarray(schedule.betas).max() <= 0.999
    # alpha_bar(t) follows cos^2 of the normalised time (Nichol & Dhariwal), checked at the midpoint
    s = 0.008
    expected = np.cos((100 / 200 + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    assert abar[99] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"beta_schedule": "quadratic"}, {"prediction_type": "sample"}, {"num_timesteps": 1}, {"beta_start": 0.1, "beta_end": 0.01}],
)
def test_schedule_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ScheduleConfig(**kwargs)


def test_schedule_is_a_pytree_usable_under_jit():
    schedule = make_schedule()
    leaves = jax.tree.leaves(schedule)
    assert len(leaves) == 3  # prediction_type is static metadata, not a leaf
    x0 = jnp.ones((2, 128, 4))
    out = jax.jit(q_sample)(schedule, x0, jnp.array([0, 999]), jnp.zeros_like(x0))
    abar = np.asarray(schedule.alphas_cumprod)
    np.testing.assert_allclose(np.asarray(out[:, 0, 0]), np.sqrt(abar[[0, 999]]), rtol=1e-6)


def test_q_sample_statistics():
    schedule = make_schedule()
    key_x, key_n = jax.random.split(jax.random.key(0))
    draw = jax.jit(
        lambda: q_sample(
            schedule, 0.7 + 0.2 * jax.random.normal(key_x, (256, 128, 4)), jnp.full((256,), 300),
            jax.random.normal(key_n, (256, 128, 4)),
        )
    )
    noisy = np.asarray(draw())
    abar = float(schedule.alphas_cumprod[300])
    assert noisy.mean() == pytest.approx(np.sqrt(abar) * 0.7, abs=0.01)
    assert noisy.var() == pytest.approx(abar * 0.04 + 1 - abar, rel=0.02)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_and_eps_inverts_the_training_target(prediction_type):
    schedule = make_schedule(ScheduleConfig(prediction_type=prediction_type))
    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(k1, (4, 128, 4))
    noise = jax.random.normal(k2, (4, 128, 4))
    t = jnp.array([1, 250, 600, 998])

    @jax.jit
    def round_trip(x0, noise):
        x_t = q_sample(schedule, x0, t, noise)
        target = training_target(schedule, x0, t, noise)
        return (target, *predict_x0_and_eps(schedule, target, x_t, t))

    target, x0_hat, eps_hat = round_trip(x0, noise)
    if prediction_type == "epsilon":
        np.testing.assert_array_equal(np.asarray(target), np.asarray(noise))
    else:
        abar = schedule.alphas_cumprod[t][:, None, None]
        np.testing.assert_allclose(target, jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(noise), atol=2e-4)
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=2e-3)


def test_velocity_has_unit_variance_for_unit_data():
    schedule = make_schedule()
    k1, k2 = jax.random.split(jax.random.key(2))
    draw = jax.jit(
        lambda: velocity(
            schedule, jax.random.normal(k1, (64, 128, 4)), jnp.full((64,), 500), jax.random.normal(k2, (64, 128, 4))
        )
    )
    v = np.asarray(draw())
    assert v.var() == pytest.approx(1.0, rel=0.02)


def test_training_timesteps_cover_exactly_the_faithful_range():
    t = np.asarray(sample_timesteps(jax.random.key(3), 200_000))
    assert t.dtype == np.int32 and t.min() == 1 and t.max() == 998
    counts = np.bincount(t, minlength=1000)
    assert counts[0] == 0 and counts[999] == 0
    assert counts[1:999].std() / counts[1:999].mean() < 0.1  # uniform


def test_reductions():
    pred = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    target = jnp.zeros_like(pred)
    total = float(np.sum(np.square(np.arange(24.0))))
    assert float(reduce_squared_error(pred, target, "sum_per_sample")) == pytest.approx(total / 2)
    assert float(reduce_squared_error(pred, target, "mean")) == pytest.approx(total / 24)
    with pytest.raises(ValueError, match="reduction"):
        LossConfig(reduction="sum")


@pytest.mark.parametrize(("reduction", "expected"), [("sum_per_sample", 512.0), ("mean", 1.0)])
def test_diffusion_loss_of_a_zero_predictor_is_the_noise_energy(reduction, expected):
    """Predicting zero noise costs E|eps|^2: 128 * 4 per sample summed, 1 per element averaged."""
    schedule = make_schedule()
    x0 = jnp.zeros((64, 128, 4))
    config = LossConfig(reduction=reduction)
    loss = jax.jit(lambda key: diffusion_loss(schedule, lambda x, t, c: jnp.zeros_like(x), x0, None, key, config))(
        jax.random.key(4)
    )
    assert float(loss) == pytest.approx(expected, rel=0.02)


def test_diffusion_loss_of_the_optimal_predictor_is_small_and_differentiable():
    """For x0 = 0 the noise is x_t / sqrt(1 - abar_t): a model knowing that has zero loss."""
    schedule = make_schedule()
    x0 = jnp.zeros((8, 128, 4))

    def model_fn(scale, x_t, t, cond):
        return scale * x_t / jnp.sqrt(1 - schedule.alphas_cumprod[t])[:, None, None]

    loss = lambda scale: diffusion_loss(schedule, lambda x, t, c: model_fn(scale, x, t, c), x0, None, jax.random.key(5))
    assert float(jax.jit(loss)(1.0)) < 1e-6
    value, grad = jax.jit(jax.value_and_grad(loss))(0.5)
    assert float(value) == pytest.approx(0.25 * 512, rel=0.05) and float(grad) < 0


def test_diffusion_loss_rejects_t_max_outside_the_schedule():
    schedule = make_schedule(ScheduleConfig(num_timesteps=100))
    with pytest.raises(ValueError, match="t_max"):
        diffusion_loss(schedule, lambda x, t, c: x, jnp.zeros((2, 128, 4)), None, jax.random.key(0))
