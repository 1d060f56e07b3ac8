"""Posterior sampling and editing (diffusion/posterior.py, diffusion/editing.py) against exact answers.

The linear-Gaussian latent toy (tests/helpers/linear_gaussian_latent.py) has a Gaussian chain law and a
linear decoder, so the posterior the sampler targets, p_chain(z) N(y; M D z, R), is Gaussian in closed form.

Tolerances (N independent runs, each returning one particle):
- mean: every coordinate within 0.12 exact posterior standard deviations. The Monte-Carlo standard error is
  1 / sqrt(N) = 0.022 sd at N = 2048, so 0.12 is 5.4 standard errors; it also has to absorb the sampler's
  finite-K bias (selecting one of K weighted particles is exact only as K grows), measured at < 0.04 sd
  for K = 64 on this toy. DPS-like guidance (K = 1) is off by 0.6 sd here, so the test can fail.
- covariance: the sample covariance whitened by the exact one has eigenvalues within [0.8, 1.2]. For an
  exact sampler they fall within about (1 +- sqrt(8 / N))^2 = [0.88, 1.13] at N = 2048 (Marchenko-Pastur
  edges); measured [0.91, 1.09] for K = 64 and [0.79, 1.30] for K = 1.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffusets_jax.diffusion.editing import edit
from diffusets_jax.diffusion.observations import drift_basis, make_observation
from diffusets_jax.diffusion.posterior import PosteriorConfig, ddim_sigma, posterior_sample, strength_timestep
from diffusets_jax.diffusion.samplers import SamplerConfig, ddim_step
from diffusets_jax.diffusion.schedule import make_schedule
from tests.helpers.linear_gaussian_latent import (
    ECG_SHAPE,
    LATENT_SHAPE,
    LinearGaussianLatentModel,
    gaussian_log_evidence,
    gaussian_posterior,
    moment_errors,
)

SCHEDULE = make_schedule()
TOY = LinearGaussianLatentModel(SCHEDULE)
STEPS = 50
RUNS = 2048
NOISE_STD = 0.5
MEAN_TOLERANCE = 0.12
EIGEN_RANGE = (0.8, 1.2)


def _chain_config(sampler="ddpm", eta=0.0):
    # DDIM on the grid and with the first-order last step that TOY.chain_law follows, so its law is exact: DDIM's
    # defaults (a log-SNR grid without data_std, a second-order last step) are checked in test_diffusion_samplers.
    exact = {"timestep_spacing": "trailing", "final_step_order": 1} if sampler == "ddim" else {}
    return SamplerConfig(sampler=sampler, steps=STEPS, eta=eta, clip_sample=False, latent_shape=LATENT_SHAPE,
                         **exact)


@functools.cache
def _compiled_posterior(particles):
    config = PosteriorConfig(sampler=_chain_config(), particles=particles,
                             twist_variance=float(np.mean(np.diag(TOY.decoder @ TOY.sigma @ TOY.decoder.T))))
    return jax.jit(functools.partial(posterior_sample, TOY.model_fn, TOY.decode_fn, SCHEDULE, config=config))


def _cond(n):
    return {"index": jnp.arange(n, dtype=jnp.float32)}  # the toy ignores it; it carries the batch size


def _observed_ecg(seed):
    """An ECG drawn from the toy's prior, and its rng for the observation noise."""
    rng = np.random.default_rng(seed)
    z = TOY.mu + np.linalg.cholesky(TOY.sigma) @ rng.normal(size=TOY.mu.shape)
    return (TOY.decoder @ z).reshape(ECG_SHAPE), rng


def _check_moments(samples, mean, cov):
    mean_error, eigenvalues = moment_errors(samples, mean, cov)
    assert mean_error < MEAN_TOLERANCE, f"sample mean off by {mean_error:.3f} posterior sd"
    assert EIGEN_RANGE[0] < eigenvalues.min() and eigenvalues.max() < EIGEN_RANGE[1], f"whitened cov eig {eigenvalues}"


def _leads_and_window_case():
    """Leads 0 and 2 of the toy over its first 7.5 of 10 s (6 of 8 samples): 12 noisy values of 24."""
    clean, rng = _observed_ecg(seed=1)
    noisy = clean + NOISE_STD * rng.normal(size=ECG_SHAPE)
    lead_mask = np.array([True, False, True])
    observation = make_observation(np.broadcast_to(noisy, (RUNS, *ECG_SHAPE)), noise_std=NOISE_STD,
                                   window=(0.0, 7.5), mask=lead_mask[None, None, :])
    mask = np.zeros(ECG_SHAPE, bool)
    mask[:6] = lead_mask
    np.testing.assert_array_equal(np.asarray(observation.mask[0]), mask)  # window x leads
    prior_mean, prior_cov = TOY.chain_law(STEPS, eta=1.0)
    rows = TOY.observed_rows(mask)
    noise_cov = NOISE_STD**2 * np.eye(rows.shape[0])
    return observation, (prior_mean, prior_cov, rows, noise_cov, noisy[mask])


def test_ddim_sigma_is_the_noise_ddim_step_adds():
    x = jnp.zeros((1, 4, 2))
    for t, prev in ((999, 979), (500, 480), (19, -1), (3, 2)):
        for eta in (0.3, 1.0):
            with_noise, _ = ddim_step(SCHEDULE, x, t, prev, x, jnp.ones_like(x), eta=eta)
            np.testing.assert_allclose(np.asarray(with_noise)[0, 0, 0], float(ddim_sigma(SCHEDULE, t, prev, eta)),
                                       rtol=1e-6, atol=1e-9)


def test_strength_maps_to_training_timesteps():
    got = [int(strength_timestep(s, 1000)) for s in (0.0, 0.0004, 0.25, 0.5, 1.0)]
    assert got == [-1, -1, 249, 499, 999]


@pytest.mark.slow
def test_posterior_matches_the_exact_gaussian_posterior_for_leads_times_window():
    observation, (prior_mean, prior_cov, rows, noise_cov, observed) = _leads_and_window_case()
    result = _compiled_posterior(64)(_cond(RUNS), jax.random.key(0), observation=observation)
    mean, cov = gaussian_posterior(prior_mean, prior_cov, rows, noise_cov, observed)
    assert np.trace(cov) < 0.35 * np.trace(prior_cov)  # informative: the observation removes most prior variance
    _check_moments(np.asarray(result.latents), mean, cov)
    # The decoded ECGs are decode(latents) and the evidence estimate is unbiased in Z: averaged over the runs
    # it matches log p(y) (its spread over runs is ~0.3 nats, so the mean of N = 2048 is good to ~0.02).
    np.testing.assert_allclose(np.asarray(result.ecg), np.asarray(TOY.decode_fn(result.latents)), atol=1e-5)
    log_z = np.asarray(result.log_evidence, np.float64)
    log_mean_z = np.log(np.mean(np.exp(log_z - log_z.max()))) + log_z.max()
    assert abs(log_mean_z - gaussian_log_evidence(prior_mean, prior_cov, rows, noise_cov, observed)) < 0.1
    assert result.ess.shape == (RUNS, STEPS) and float(result.ess.min()) >= 1.0 - 1e-4


@pytest.mark.slow
def test_single_particle_guidance_fails_the_same_check():
    """K = 1 is DPS-style guidance without weights: biased, so the exactness check above must reject it."""
    observation, (prior_mean, prior_cov, rows, noise_cov, observed) = _leads_and_window_case()
    result = _compiled_posterior(1)(_cond(RUNS), jax.random.key(0), observation=observation)
    mean, cov = gaussian_posterior(prior_mean, prior_cov, rows, noise_cov, observed)
    with pytest.raises(AssertionError):
        _check_moments(np.asarray(result.latents), mean, cov)


@pytest.mark.slow
def test_posterior_separates_a_low_frequency_drift_from_a_noisy_ecg():
    """Denoising plus baseline wander on two of the three leads: y = M (D z + B c) + n with a Gaussian drift
    prior. (All 24 values observed make the posterior keep 12% of the prior variance; K = 64 particles then
    degenerate and the bias reaches 0.4 sd, so the test stays at the main test's level of information.)"""
    clean, rng = _observed_ecg(seed=2)
    length, leads = ECG_SHAPE
    basis = drift_basis(length, 10.0, cutoff_hz=0.1).astype(np.float64)  # 3 cosines, DC included
    drift_std = 0.7
    tau2 = drift_std**2 * length / basis.shape[1]
    wander = basis @ (np.sqrt(tau2) * rng.normal(size=(basis.shape[1], leads)))
    noisy = clean + wander + NOISE_STD * rng.normal(size=ECG_SHAPE)
    lead_mask = np.array([True, True, False])
    observation = make_observation(np.broadcast_to(noisy, (RUNS, *ECG_SHAPE)), noise_std=NOISE_STD,
                                   mask=lead_mask[None, None, :], drift_cutoff_hz=0.1, drift_std_mv=drift_std)
    result = _compiled_posterior(64)(_cond(RUNS), jax.random.key(1), observation=observation)
    prior_mean, prior_cov = TOY.chain_law(STEPS, eta=1.0)
    # Row (l, c) of the flattened ECG: the drift couples the samples of one lead, so its covariance is
    # kron(tau^2 B B^T over samples, identity over leads).
    noise_cov = NOISE_STD**2 * np.eye(length * leads) + np.kron(tau2 * basis @ basis.T, np.eye(leads))
    seen = np.broadcast_to(lead_mask, ECG_SHAPE).reshape(-1)
    mean, cov = gaussian_posterior(prior_mean, prior_cov, TOY.decoder[seen], noise_cov[np.ix_(seen, seen)],
                                   noisy.reshape(-1)[seen])
    assert np.trace(cov) < 0.35 * np.trace(prior_cov)
    _check_moments(np.asarray(result.latents), mean, cov)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0)])
def test_edit_strengths_give_the_exact_laws(sampler, eta):
    """Strength 0 is decode(encode(x)); strength 1 ignores x and has the generation law; in between the law
    is that of the chain started from the forward-noised encoding. One compiled program serves all three."""
    runs = 4096
    config = _chain_config(sampler, eta)
    traces = []

    def traced_edit(*args):
        traces.append(1)  # runs once per compilation
        return edit(TOY.model_fn, TOY.encode_fn, TOY.decode_fn, SCHEDULE, *args, config=config)

    run = jax.jit(traced_edit)
    clean, rng = _observed_ecg(seed=3)
    ecg = jnp.asarray(np.broadcast_to(clean + 0.3 * rng.normal(size=ECG_SHAPE), (runs, *ECG_SHAPE)), jnp.float32)
    other = jnp.asarray(np.broadcast_to(_observed_ecg(seed=4)[0], (runs, *ECG_SHAPE)), jnp.float32)
    key = jax.random.key(5)
    chain_eta = 1.0 if sampler == "ddpm" else eta

    unchanged = run(ecg, _cond(runs), key, jnp.float32(0.0))
    np.testing.assert_allclose(np.asarray(unchanged), np.asarray(TOY.decode_fn(TOY.encode_fn(ecg, key))), atol=1e-6)
    assert not np.allclose(np.asarray(unchanged), np.asarray(ecg), atol=1e-2)  # a projection, not the input

    generated = run(ecg, _cond(runs), key, jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(generated), np.asarray(run(other, _cond(runs), key, jnp.float32(1.0))))
    _check_moments(np.asarray(TOY.encode_fn(generated, key)), *TOY.chain_law(STEPS, chain_eta))

    edited = run(ecg, _cond(runs), key, jnp.float32(0.5))
    start_t = int(strength_timestep(0.5, SCHEDULE.num_timesteps))
    abar = float(SCHEDULE.alphas_cumprod[start_t])
    z_in = np.asarray(TOY.encode_fn(ecg[:1], key), np.float64).reshape(-1)
    mean, cov = TOY.chain_law(STEPS, chain_eta, start_t=start_t, start_mean=np.sqrt(abar) * z_in,
                              start_cov=(1 - abar) * np.eye(z_in.size))
    _check_moments(np.asarray(TOY.encode_fn(edited, key)), mean, cov)
    # A traced strength outside [0, 1] cannot be refused before the call: NaN, not an edit from a clamped timestep.
    for outside in (-0.1, 1.5):
        assert np.isnan(np.asarray(run(ecg[:2], _cond(2), key, jnp.float32(outside)))).all(), outside
    assert len(traces) == 2  # the strength is an argument of one program per batch size, not a constant of three


def test_an_edit_between_grid_steps_starts_from_its_own_noise_level():
    """A strength rarely falls on the grid: the edit's first step goes from the strength's own timestep (249 for
    0.25) to the next grid step below (199 on 5 trailing steps), not from the grid step above it (399), which
    reads the noised latent as noisier than it is: 0.25 sd off in mean here, covariance eigenvalues down to 0.67.
    (On 50 steps the two are too close for this check: 0.04 sd.)"""
    runs = 4096
    config = SamplerConfig(sampler="ddim", steps=5, timestep_spacing="trailing", clip_sample=False,
                           latent_shape=LATENT_SHAPE)
    clean, _ = _observed_ecg(seed=3)
    ecg = jnp.asarray(np.broadcast_to(clean, (runs, *ECG_SHAPE)), jnp.float32)
    key = jax.random.key(6)
    run = jax.jit(lambda ecg, cond, key: edit(TOY.model_fn, TOY.encode_fn, TOY.decode_fn, SCHEDULE, ecg, cond, key,
                                              0.25, config=config))
    edited = run(ecg, _cond(runs), key)
    start_t = int(strength_timestep(0.25, SCHEDULE.num_timesteps))
    abar = float(SCHEDULE.alphas_cumprod[start_t])
    z_in = np.asarray(TOY.encode_fn(ecg[:1], key), np.float64).reshape(-1)
    mean, cov = TOY.chain_law(5, 0.0, start_t=start_t, start_mean=np.sqrt(abar) * z_in,
                              start_cov=(1 - abar) * np.eye(z_in.size))
    _check_moments(np.asarray(TOY.encode_fn(edited, key)), mean, cov)


def test_an_edit_above_the_grids_first_step_starts_there():
    """On a "leading" grid (800, 600, ... for 5 steps) a strength of 0.9 (timestep 899) is above the grid's first
    step: the chain starts at 800, so the encoding must be noised to 800, not to 899 and then read as 800 (which
    leaves the latent noisier than the chain takes it to be). Same noise: the same edit as a strength at 800."""
    runs = 4096
    config = SamplerConfig(sampler="ddim", steps=5, timestep_spacing="leading", clip_sample=False,
                           latent_shape=LATENT_SHAPE)
    clean, _ = _observed_ecg(seed=3)
    ecg = jnp.asarray(np.broadcast_to(clean, (runs, *ECG_SHAPE)), jnp.float32)
    key = jax.random.key(7)
    run = jax.jit(lambda ecg, cond, key, strength: edit(TOY.model_fn, TOY.encode_fn, TOY.decode_fn, SCHEDULE, ecg,
                                                        cond, key, strength, config=config))
    edited = run(ecg, _cond(runs), key, jnp.float32(0.9))
    np.testing.assert_array_equal(np.asarray(edited), np.asarray(run(ecg, _cond(runs), key, jnp.float32(0.801))))
    abar = float(SCHEDULE.alphas_cumprod[800])
    z_in = np.asarray(TOY.encode_fn(ecg[:1], key), np.float64).reshape(-1)
    mean, cov = TOY.chain_law(5, 0.0, start_t=800, start_mean=np.sqrt(abar) * z_in,
                              start_cov=(1 - abar) * np.eye(z_in.size), spacing="leading")
    _check_moments(np.asarray(TOY.encode_fn(edited, key)), mean, cov)


def test_a_run_sharded_over_eight_devices_equals_the_single_device_run():
    """Every random draw is made for the global batch (particles of a sample stay on its device), so the
    sharding changes nothing but the layout; the drift path and resampling run under it too."""
    batch = 16
    config = PosteriorConfig(sampler=SamplerConfig(sampler="ddpm", steps=10, clip_sample=False,
                                                   latent_shape=LATENT_SHAPE), particles=4)
    clean, rng = _observed_ecg(seed=6)
    observation = make_observation(np.broadcast_to(clean + 0.1 * rng.normal(size=ECG_SHAPE), (batch, *ECG_SHAPE)),
                                   noise_std=0.1, window=(0.0, 5.0), drift_cutoff_hz=0.1)
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), PartitionSpec("data"))
    results = []
    for batch_sharding in (None, sharding):
        run = jax.jit(functools.partial(posterior_sample, TOY.model_fn, TOY.decode_fn, SCHEDULE, config=config,
                                        batch_sharding=batch_sharding))
        place = (lambda tree: tree) if batch_sharding is None else (lambda tree: jax.device_put(tree, sharding))
        results.append(run(place(_cond(batch)), jax.random.key(3), observation=place(observation)))
    single, sharded = results
    assert {shard.data.shape[0] for shard in sharded.latents.addressable_shards} == {batch // 8}
    assert float(single.ess.min()) < 4 - 1e-3  # the weights were uneven, so resampling decisions were exercised
    for name in ("latents", "ecg", "log_evidence"):
        np.testing.assert_allclose(np.asarray(getattr(sharded, name)), np.asarray(getattr(single, name)),
                                   rtol=1e-4, atol=1e-4, err_msg=name)
    # ESS is a ratio of exponentials of log-weights of order 1e3 (noise 0.1): float rounding moves it ~2e-4.
    np.testing.assert_allclose(np.asarray(sharded.ess), np.asarray(single.ess), rtol=1e-3)


def test_jax_enable_x64_draws_the_same_particles():
    """The resampling uniforms took the default dtype, float64 under jax_enable_x64: other random bits, so the
    same key resampled other particles (the toy is float32 throughout, so only the draws could differ)."""
    config = PosteriorConfig(sampler=SamplerConfig(sampler="ddpm", steps=6, clip_sample=False,
                                                   latent_shape=LATENT_SHAPE), particles=4, resample_ess=1.0)
    clean, rng = _observed_ecg(seed=6)
    observation = make_observation(np.broadcast_to(clean + 0.5 * rng.normal(size=ECG_SHAPE), (2, *ECG_SHAPE)),
                                   noise_std=2.0)
    results = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            run = jax.jit(functools.partial(posterior_sample, TOY.model_fn, TOY.decode_fn, SCHEDULE, config=config))
            results.append(np.asarray(run(_cond(2), jax.random.key(3), observation=observation).latents))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("particles, edit_strength", [(1, None), (2, None), (1, 0.5)])
def test_a_one_device_mesh_with_one_sample_runs(particles, edit_strength):
    """Regression: on a one-device Explicit-axis mesh with batch 1 a reshape can drop the batch sharding of a
    size-1 axis, and gathering particles by index had an ambiguous output sharding. Posterior runs (K = 1, 2)
    and an edit (no observation, SDEdit start) must run there and give the unsharded result."""
    config = PosteriorConfig(sampler=SamplerConfig(sampler="ddpm", steps=5, clip_sample=False,
                                                   latent_shape=LATENT_SHAPE), particles=particles, resample_ess=1.0)
    clean, _ = _observed_ecg(seed=7)
    if edit_strength is None:
        inputs = {"observation": make_observation(clean, noise_std=0.1)}
    else:
        inputs = {"start_latents": TOY.encode_fn(jnp.asarray(clean[None], jnp.float32), None),
                  "strength": jnp.float32(edit_strength)}
    sharding = NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), PartitionSpec("data"))
    results = []
    for batch_sharding in (sharding, None):
        place = (lambda tree: tree) if batch_sharding is None else (lambda tree: jax.device_put(tree, sharding))
        run = jax.jit(functools.partial(posterior_sample, TOY.model_fn, TOY.decode_fn, SCHEDULE, config=config,
                                        batch_sharding=batch_sharding))
        placed = {k: v if k == "strength" else place(v) for k, v in inputs.items()}  # the strength is a scalar
        results.append(run(place(_cond(1)), jax.random.key(0), **placed))
    np.testing.assert_allclose(np.asarray(results[0].latents), np.asarray(results[1].latents), rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(results[0].ecg)))


@pytest.mark.parametrize("observed", [False, True])
def test_the_compiled_chain_holds_one_network_evaluation(observed):
    # The network (and, with an observation, the decoder and its gradient) is evaluated at one place in the
    # program, inside the loop: a second site (e.g. the start evaluated before the loop) doubles the compile.
    calls = {"model": 0, "decode": 0}

    def model_fn(x, t, cond):
        calls["model"] += 1
        return TOY.model_fn(x, t, cond)

    def decode_fn(z):
        calls["decode"] += 1
        return TOY.decode_fn(z)

    observation = _leads_and_window_case()[0] if observed else None
    config = PosteriorConfig(sampler=_chain_config(), particles=2)
    jax.jit(functools.partial(posterior_sample, model_fn, decode_fn, SCHEDULE, config=config,
                              observation=observation)).lower(_cond(RUNS if observed else 1), jax.random.key(0))
    # decode: the chain's one site, plus the output decode (and, with an observation, a shape check)
    assert calls == {"model": 1, "decode": 3 if observed else 1}, calls


def test_the_guidance_shift_is_capped_at_max_shift_noise_sds():
    """Observing every value sharply (noise_std 0.01) asks for a guidance shift of many noise sds per step. Capped at
    1e-6 sd, the proposal is the chain's own step, so one particle follows the chain that an uninformative
    observation (noise_std 1e6: gradient ~1e-12) gives from the same key; uncapped (max_shift 1) it does not."""
    clean, _ = _observed_ecg(seed=8)
    runs = 16
    observed = np.broadcast_to(clean, (runs, *ECG_SHAPE))

    def latents(noise_std, max_shift):
        config = PosteriorConfig(sampler=SamplerConfig(sampler="ddpm", steps=5, clip_sample=False,
                                                       latent_shape=LATENT_SHAPE), particles=1, max_shift=max_shift)
        run = jax.jit(functools.partial(posterior_sample, TOY.model_fn, TOY.decode_fn, SCHEDULE, config=config))
        result = run(_cond(runs), jax.random.key(9), observation=make_observation(observed, noise_std=noise_std))
        return np.asarray(result.latents)

    unguided = latents(1e6, 1.0)
    np.testing.assert_allclose(latents(0.01, 1e-6), unguided, atol=1e-4)
    assert not np.allclose(latents(0.01, 1.0), unguided, atol=1e-2)  # the cap made them equal, not a weak pull
