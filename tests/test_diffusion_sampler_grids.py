"""Timestep grids of the samplers (diffusets_jax/diffusion/samplers.py): the noise-level spacings pick distinct
trained timesteps evenly in log sigma, sigma^(1/7) or arctan(sigma / data std).

Known answers come from synthetic schedules on which the chosen function of sigma is exactly linear in t, so
the even grid must be the even grid in t."""

import numpy as np
import pytest

from diffusets_jax.diffusion.samplers import KARRAS_RHO, SamplerConfig, make_timesteps, sampler_timesteps
from diffusets_jax.diffusion.schedule import make_schedule

T = 1000
REAL_ABAR = np.asarray(make_schedule().alphas_cumprod)


def abar_from_sigma(sigma):
    """alpha_bar for a noise level sigma = sqrt((1 - abar) / abar)."""
    return 1.0 / (1.0 + np.asarray(sigma, np.float64) ** 2)


def linear_in_t(low, high):
    return np.linspace(low, high, T)


SYNTHETIC = {
    "logsnr": (abar_from_sigma(np.exp(linear_in_t(np.log(0.03), np.log(25.0)))), None),
    "karras": (abar_from_sigma(linear_in_t(0.03 ** (1 / KARRAS_RHO), 25.0 ** (1 / KARRAS_RHO)) ** KARRAS_RHO), None),
    "data_std": (abar_from_sigma(0.2 * np.tan(linear_in_t(np.arctan(0.03 / 0.2), np.arctan(25.0 / 0.2)))), 0.2),
}


@pytest.mark.parametrize("spacing", sorted(SYNTHETIC))
@pytest.mark.parametrize("steps", [2, 4, 10, 28])
def test_grid_is_even_in_t_where_its_variable_is_linear_in_t(spacing, steps):
    # 999 / (steps - 1) is a whole number for these step counts, so the even grid has exact integer points
    abar, data_std = SYNTHETIC[spacing]
    expected = np.linspace(999, 0, steps).astype(np.int32)
    np.testing.assert_array_equal(
        make_timesteps(T, steps, spacing, alphas_cumprod=abar, data_std=data_std), expected)


@pytest.mark.parametrize("spacing,data_std", [("logsnr", None), ("karras", None), ("data_std", 0.1), ("data_std", 1.0)])
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50, 200, 999, 1000])
def test_grids_are_distinct_descending_trained_timesteps_from_999_to_0(spacing, data_std, steps):
    timesteps = make_timesteps(T, steps, spacing, alphas_cumprod=REAL_ABAR, data_std=data_std)
    assert timesteps.dtype == np.int32 and timesteps.shape == (steps,)
    assert timesteps[0] == 999 and (steps == 1 or timesteps[-1] == 0)
    assert np.all(np.diff(timesteps) < 0)
    if steps == T:
        np.testing.assert_array_equal(timesteps, np.arange(999, -1, -1))


def test_logsnr_grid_is_even_in_log_sigma_where_the_trained_timesteps_allow():
    """On the published schedule the trained timesteps near t = 0 are coarse in log sigma (t = 0, 1 differ by
    0.35); the grid takes them one by one there and spaces the rest evenly, each step within a few percent of
    the even division of what is left."""
    log_sigma = 0.5 * np.log((1 - REAL_ABAR.astype(np.float64)) / REAL_ABAR)
    timesteps = make_timesteps(T, 20, "logsnr", alphas_cumprod=REAL_ABAR)
    gaps = -np.diff(log_sigma[timesteps])
    locked = -np.diff(timesteps) == 1
    free = gaps[~locked]
    assert locked[-1] and free.max() / free.min() < 1.15, (timesteps, gaps)
    # the free steps share the log-sigma range the locked ones leave
    assert free.sum() + gaps[locked].sum() == pytest.approx(log_sigma[999] - log_sigma[0])


def test_data_std_grid_spends_its_steps_where_sigma_is_near_the_data_std():
    sigma = np.sqrt((1 - REAL_ABAR.astype(np.float64)) / REAL_ABAR)
    near = lambda timesteps, std: int(np.sum((sigma[timesteps] > std / 3) & (sigma[timesteps] < 3 * std)))
    small = make_timesteps(T, 50, "data_std", alphas_cumprod=REAL_ABAR, data_std=0.1)
    large = make_timesteps(T, 50, "data_std", alphas_cumprod=REAL_ABAR, data_std=1.0)
    uniform_t = make_timesteps(T, 50, "trailing")
    assert near(small, 0.1) > 2 * near(uniform_t, 0.1) and near(large, 1.0) > near(uniform_t, 1.0)
    assert near(small, 0.1) > near(large, 0.1) and near(large, 1.0) > near(small, 1.0)


def test_grid_arguments_are_checked():
    with pytest.raises(ValueError, match="needs the schedule's alphas_cumprod"):
        make_timesteps(T, 10, "logsnr")
    with pytest.raises(ValueError, match="positive data_std"):
        make_timesteps(T, 10, "data_std", alphas_cumprod=REAL_ABAR)
    with pytest.raises(ValueError, match="steps must be in"):
        make_timesteps(T, 0, "karras", alphas_cumprod=REAL_ABAR)


def test_sampler_timesteps_follow_the_config():
    schedule = make_schedule()
    config = SamplerConfig(sampler="ddim", steps=30, data_std=0.18)
    np.testing.assert_array_equal(sampler_timesteps(config, schedule),
                                  make_timesteps(T, 30, "data_std", alphas_cumprod=REAL_ABAR, data_std=0.18))
    np.testing.assert_array_equal(sampler_timesteps(SamplerConfig(sampler="ddim", steps=4, timestep_spacing="leading"),
                                                    schedule), [750, 500, 250, 0])
