"""Observation models (diffusion/observations.py): masks from lead names and windows, one-line errors, and the
likelihood and drift estimate against dense closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from diffusets_jax.diffusion.observations import (
    DEFAULT_DRIFT_STD_MV,
    check_observation,
    drift_basis,
    estimate_drift,
    lead_mask,
    log_likelihood,
    make_observation,
    window_mask,
)
from diffusets_jax.ecg.leads import STANDARD_LEADS


def test_lead_mask_accepts_usual_spellings_and_names_bad_leads_in_one_line():
    mask = lead_mask("I, avl,V6")
    assert [lead for lead, on in zip(STANDARD_LEADS, mask, strict=True) if on] == ["I", "aVL", "V6"]
    np.testing.assert_array_equal(lead_mask(["LEAD II", "II"]), lead_mask("II"))
    for leads, message in (("I,X", r"^leads: unknown lead name 'X'; expected one of I, II"),
                           (" , ", r"^leads: no lead named"),
                           ([], r"^leads: no lead named")):
        with pytest.raises(ValueError, match=message) as err:
            lead_mask(leads)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^leads: lead\(s\) V1 not in the reference, which has I, II$"):
        lead_mask("I,V1", available=["II", "I"])


def test_window_mask_selects_samples_by_time_and_rejects_impossible_windows():
    mask = window_mask(2.5, 5.0)
    times = np.arange(1024) / 102.4
    np.testing.assert_array_equal(mask, (times >= 2.5) & (times < 5.0))
    assert mask.sum() == 256
    for start, end in ((5.0, 5.0), (-1.0, 2.0), (3.0, 11.0)):
        with pytest.raises(ValueError, match=r"^window: need 0 <= start < end <= 10 s"):
            window_mask(start, end)
    with pytest.raises(ValueError, match="holds no sample"):
        window_mask(0.1, 1.0, length=8)  # samples at 0 and 1.25 s


def test_make_observation_multiplies_masks_and_treats_nan_as_unobserved():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 1024, 12)).astype(np.float32)
    values[1, 10, 0] = np.nan
    obs = make_observation(values, noise_std=[0.05, 0.1], leads="I,II", window=(0.0, 5.0))
    expected = np.zeros((2, 1024, 12), bool)
    expected[:, :512, :2] = True
    expected[1, 10, 0] = False
    np.testing.assert_array_equal(np.asarray(obs.mask, bool), expected)
    np.testing.assert_array_equal(np.asarray(obs.values), np.where(expected, values, 0.0))
    np.testing.assert_allclose(np.asarray(obs.noise_std), [0.05, 0.1])
    assert obs.drift_basis is None and obs.batch_size == 2
    # one record (length, leads) becomes a batch of one; the reference's leads are the default
    single = make_observation(values[0], noise_std=0.1, available_leads=["V1", "I"])
    assert single.values.shape == (1, 1024, 12)
    np.testing.assert_array_equal(np.asarray(single.mask[0, 0], bool), lead_mask("I,V1"))


@pytest.mark.parametrize("kwargs, message", [
    ({"noise_std": 0.0}, r"^noise_std: must be > 0 mV, got 0; use a small value such as 0.01 mV"),
    ({"noise_std": [0.1, 0.2, 0.3]}, r"^noise_std: give one value or one per sample \(2\)"),
    ({"noise_std": 0.1, "leads": "I,Z"}, r"^leads: unknown lead name 'Z'"),
    ({"noise_std": 0.1, "mask": np.ones((3, 5))}, r"^mask: shape \(3, 5\) does not broadcast"),
    ({"noise_std": 0.1, "mask": np.zeros((1024, 12))}, r"^observation: sample 0 observes nothing"),
    ({"noise_std": 0.1, "drift_cutoff_hz": 0.67, "drift_std_mv": -1.0}, r"^drift_std_mv: must be >= 0 mV"),
    ({"noise_std": 0.1, "window": (0.0, 1.0, 2.0)}, r"^window: give \(start_s, end_s\)"),
])
def test_make_observation_rejects_bad_inputs_with_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        make_observation(np.zeros((2, 1024, 12), np.float32), **kwargs)
    assert "\n" not in str(err.value)


def test_lead_names_need_twelve_lead_values():
    with pytest.raises(ValueError, match=r"^leads: lead names need 12-lead values"):
        make_observation(np.zeros((4, 3)), noise_std=0.1, leads="I")


def test_drift_basis_is_orthonormal_and_spans_the_cosines_below_the_cutoff():
    basis = drift_basis(cutoff_hz=0.67)
    assert basis.shape == (1024, 14)  # frequencies k / 20 Hz for k = 0 .. 13 (13 / 20 = 0.65 <= 0.67)
    np.testing.assert_allclose(basis.T @ basis, np.eye(14), atol=1e-5)
    t = (np.arange(1024) + 0.5) / 102.4
    wander = 0.4 * np.cos(2 * np.pi * 0.3 * t) + 0.2  # breathing at 0.3 Hz plus an offset: in the span
    np.testing.assert_allclose(basis @ (basis.T @ wander), wander, atol=1e-4)
    qrs_band = np.cos(2 * np.pi * 8.0 * t)  # 8 Hz is orthogonal to it
    assert np.abs(basis.T @ qrs_band).max() < 1e-3


def _dense_log_likelihood(values, mask, ecg, noise_std, extra, basis=None, drift_std=0.0):
    total = np.zeros(values.shape[0])
    for b in range(values.shape[0]):
        for lead in range(values.shape[2]):
            seen = mask[b, :, lead]
            if not seen.any():
                continue
            cov = (noise_std[b] ** 2 + extra) * np.eye(seen.sum())
            if basis is not None:
                cov = cov + drift_std[b] ** 2 * basis.shape[0] / basis.shape[1] * basis[seen] @ basis[seen].T
            total[b] += multivariate_normal(ecg[b, seen, lead], cov).logpdf(values[b, seen, lead])
    return total


@pytest.mark.parametrize("cutoff", [None, 1.5])
def test_log_likelihood_matches_the_dense_gaussian(cutoff):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 16, 4))
    ecg = rng.normal(size=(3, 16, 4))
    mask = rng.random((3, 16, 4)) < 0.6
    mask[2, :, 1] = False  # a lead with nothing observed contributes nothing
    noise, drift = np.array([0.3, 0.5, 0.8]), np.array([0.0, 0.6, 1.2])
    obs = make_observation(np.where(mask, values, np.nan), noise_std=noise, drift_cutoff_hz=cutoff,
                           drift_std_mv=drift)
    basis = None if cutoff is None else drift_basis(16, 10.0, cutoff).astype(np.float64)
    for extra in (0.0, 0.25):
        got = np.asarray(log_likelihood(obs, jnp.asarray(ecg, jnp.float32), extra))
        np.testing.assert_allclose(got, _dense_log_likelihood(values, mask, ecg, noise, extra, basis, drift),
                                   rtol=1e-5)


def test_estimate_drift_is_the_posterior_mean_of_the_wander():
    rng = np.random.default_rng(2)
    length, leads = 32, 2
    basis = drift_basis(length, 10.0, 0.3).astype(np.float64)  # 7 cosines
    mask = np.ones((1, length, leads), bool)
    mask[0, 20:, 1] = False
    values, ecg = rng.normal(size=(1, length, leads)), rng.normal(size=(1, length, leads))
    noise, drift_std = 0.2, 0.9
    obs = make_observation(np.where(mask, values, np.nan), noise_std=noise, drift_cutoff_hz=0.3, drift_std_mv=drift_std)
    got = np.asarray(estimate_drift(obs, jnp.asarray(ecg, jnp.float32)))[0]
    tau2 = drift_std**2 * length / basis.shape[1]
    for lead in range(leads):
        seen = mask[0, :, lead]
        # c | r ~ Gaussian with mean tau^2 B_s^T (tau^2 B_s B_s^T + noise^2 I)^{-1} r; the drift is B c everywhere
        residual = (values - ecg)[0, seen, lead]
        gain = tau2 * basis[seen].T @ np.linalg.inv(tau2 * basis[seen] @ basis[seen].T + noise**2 * np.eye(seen.sum()))
        np.testing.assert_allclose(got[:, lead], basis @ (gain @ residual), atol=1e-4)
    no_drift = make_observation(values, noise_std=noise)
    np.testing.assert_array_equal(np.asarray(estimate_drift(no_drift, jnp.asarray(ecg))), 0.0)


def _dense_drift_posterior(values, mask, ecg, noise_std, basis, drift_std):
    """float64 closed forms for one sample: grad_x log p(y | x) = Cov^-1 r on the observed entries and the drift's
    posterior mean tau^2 B B_s^T Cov^-1 r, with Cov = noise^2 I + tau^2 B_s B_s^T per lead."""
    tau2 = drift_std**2 * basis.shape[0] / basis.shape[1]
    grad, drift = np.zeros(values.shape), np.zeros(values.shape)
    for lead in range(values.shape[1]):
        seen = mask[:, lead]
        cov = noise_std**2 * np.eye(seen.sum()) + tau2 * basis[seen] @ basis[seen].T
        solved = np.linalg.solve(cov, (values - ecg)[seen, lead])
        grad[seen, lead] = solved
        drift[:, lead] = tau2 * basis @ (basis[seen].T @ solved)
    return grad, drift


@pytest.mark.parametrize("noise_std", [0.001, 0.0003])
@pytest.mark.parametrize("window", [(0.0, 5.0), (2.0, 4.5)])
def test_a_windowed_drift_observation_with_small_noise_stays_finite_and_exact(noise_std, window):
    """`--observe-window 0,5 --drift --noise-std 0.001`: the window leaves some cosines almost unobserved, and the
    float32 Cholesky factor of noise^2 I + tau^2 B^T M B was NaN (the Gram matrix's rounding times tau^2 = 73 mV^2
    outweighs noise^2): the likelihood, its gradient and the drift estimate were NaN, and with them the sampler's
    last weighting (the exact likelihood) and log evidence."""
    rng = np.random.default_rng(3)
    values = (0.2 * rng.normal(size=(1, 1024, 2))).astype(np.float32)
    ecg = (values + 0.01 * rng.normal(size=values.shape) + 0.3).astype(np.float32)  # a 0.3 mV offset: the drift
    obs = make_observation(values, noise_std=noise_std, window=window, drift_cutoff_hz=0.67)
    mask = np.asarray(obs.mask, bool)
    basis = drift_basis(1024, 10.0, 0.67).astype(np.float64)
    got = np.asarray(log_likelihood(obs, jnp.asarray(ecg)))
    grad = np.asarray(jax.grad(lambda x: jnp.sum(log_likelihood(obs, x)))(jnp.asarray(ecg)))[0]
    drift = np.asarray(estimate_drift(obs, jnp.asarray(ecg)))[0]
    assert np.isfinite(got).all() and np.isfinite(grad).all() and np.isfinite(drift).all()
    values64, ecg64 = values.astype(np.float64), ecg.astype(np.float64)
    expected = _dense_log_likelihood(values64, mask, ecg64, [noise_std], 0.0, basis, [DEFAULT_DRIFT_STD_MV])
    expected_grad, expected_drift = _dense_drift_posterior(values64[0], mask[0], ecg64[0], noise_std, basis,
                                                           DEFAULT_DRIFT_STD_MV)
    # Taken as r.r - tau^2 u^T S^-1 u in float32, the quadratic form cancelled: 2 % off at 0.001 mV, 18 % at 0.0003.
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-3 * np.abs(expected_grad).max())
    # Where observed the drift is pinned (about -0.3 mV); outside the window it extrapolates cosines the window
    # barely sees (the float64 answer reaches tens of mV), where float32 keeps a few digits.
    np.testing.assert_allclose(drift[mask[0]], expected_drift[mask[0]], atol=1e-4)
    np.testing.assert_allclose(drift, expected_drift, atol=0.02 * np.abs(expected_drift).max())


def test_the_drift_eigenbasis_comes_with_the_observation_and_is_sharded_with_it():
    """G = B^T diag(mask) B is eigendecomposed by `make_observation` (float64 NumPy), not inside the jitted chain;
    `map_samples` applies one function to every per-sample array, eigenbasis included."""
    mask = np.ones((3, 1024, 12), bool)
    mask[1, 512:] = False
    obs = make_observation(np.where(mask, 0.1, np.nan), noise_std=0.01, drift_cutoff_hz=0.67)
    assert obs.drift_eigenvalues.shape == (3, 12, 14) and obs.drift_eigenvectors.shape == (3, 12, 14, 14)
    basis = drift_basis().astype(np.float64)
    gram = basis.T @ (mask[1, :, 0, None] * basis)
    vectors, values = np.asarray(obs.drift_eigenvectors[1, 0], np.float64), np.asarray(obs.drift_eigenvalues[1, 0])
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, gram, atol=1e-6)
    assert values.min() >= 0.0
    np.testing.assert_allclose(np.asarray(obs.drift_eigenvalues[0]), 1.0, atol=1e-6)  # all observed: G = I
    doubled = obs.map_samples(lambda a: jnp.repeat(a, 2, axis=0))
    for name in ("values", "mask", "noise_std", "drift_std", "drift_eigenvalues", "drift_eigenvectors"):
        assert getattr(doubled, name).shape[0] == 6
    assert doubled.drift_basis.shape == (1024, 14)
    check_observation(doubled, (1024, 12), 6)
    with pytest.raises(ValueError, match=r"^observation: drift_eigenvalues has none, expected \(3, 12, 14\); build"):
        check_observation(obs.replace(drift_eigenvalues=None), (1024, 12), 3)
    assert make_observation(np.zeros((1, 1024, 12)), noise_std=0.1).map_samples(jnp.asarray).drift_eigenvalues is None


def test_check_observation_names_the_mismatch():
    obs = make_observation(np.zeros((2, 1024, 12)), noise_std=0.1)
    check_observation(obs, (1024, 12), 2)
    with pytest.raises(ValueError, match=r"^observation: values have shape \(2, 1024, 12\), expected \(4, 1024, 12\)"):
        check_observation(obs, (1024, 12), 4)
    with pytest.raises(ValueError, match=r"expected \(2, 512, 12\)"):
        check_observation(obs, (512, 12), 2)
