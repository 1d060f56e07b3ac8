"""A latent diffusion model whose every distribution is Gaussian and known in closed form.

Latents z0 ~ N(mu, Sigma) of shape (4, 2) (8 values), a linear "VAE decoder" ecg = D z (8 samples x 3
leads), and the exact noise predictor E[eps | z_t] = sqrt(1 - a) (a Sigma + (1 - a) I)^{-1} (z_t - sqrt(a) mu)
for a = alpha_bar_t. Every step of the DDIM/DDPM chain is then an affine map plus Gaussian noise, so the
law of the chain's output (from noise, or from an SDEdit start) is Gaussian with a mean and covariance
propagated here in float64; conditioning it on a linear-Gaussian observation gives the exact posterior the
sampler must reproduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.diffusion.samplers import make_timesteps
from diffusets_jax.diffusion.schedule import NoiseSchedule

LATENT_SHAPE = (4, 2)
ECG_SHAPE = (8, 3)
DIM = 8


class LinearGaussianLatentModel:
    """The toy; `model_fn`, `decode_fn` and `encode_fn` plug into the samplers like a U-Net and a VAE."""

    def __init__(self, schedule: NoiseSchedule, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        rotation, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
        self.eigenvalues = np.linspace(0.3, 1.5, DIM)  # a correlated prior, scales around the latents' unit
        self.eigenvectors = rotation
        self.sigma = rotation @ np.diag(self.eigenvalues) @ rotation.T
        self.mu = 0.5 * rng.normal(size=DIM)
        self.decoder = rng.normal(size=(int(np.prod(ECG_SHAPE)), DIM)) / np.sqrt(DIM)
        self.schedule = schedule
        self.abar = np.asarray(schedule.alphas_cumprod, np.float64)
        self._lam = jnp.asarray(self.eigenvalues, jnp.float32)
        self._q = jnp.asarray(rotation, jnp.float32)
        self._mu = jnp.asarray(self.mu, jnp.float32)
        self._decoder = jnp.asarray(self.decoder, jnp.float32)
        self._pinv = jnp.asarray(np.linalg.pinv(self.decoder), jnp.float32)

    # -- the model, as the samplers see it -------------------------------------------------------------
    def model_fn(self, x_t: jax.Array, t: jax.Array, cond) -> jax.Array:
        """E[eps | x_t] `(N, 4, 2)`, through Sigma's eigenbasis so each particle costs a few dot products."""
        a = self.schedule.alphas_cumprod[t][:, None]
        centred = x_t.reshape(x_t.shape[0], DIM) - jnp.sqrt(a) * self._mu
        gain = jnp.sqrt(1.0 - a) / (a * self._lam + 1.0 - a)
        return (((centred @ self._q) * gain) @ self._q.T).reshape(x_t.shape)

    def decode_fn(self, z: jax.Array) -> jax.Array:
        return (z.reshape(z.shape[0], DIM) @ self._decoder.T).reshape((z.shape[0], *ECG_SHAPE))

    def encode_fn(self, ecg: jax.Array, key: jax.Array) -> jax.Array:
        """Least squares (the decoder's pseudo-inverse): decode(encode(x)) projects x onto the decoder's range."""
        return (ecg.reshape(ecg.shape[0], -1) @ self._pinv.T).reshape((ecg.shape[0], *LATENT_SHAPE))

    # -- exact laws ------------------------------------------------------------------------------------
    def _abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.abar[t])

    def chain_law(self, steps: int, eta: float, start_t: int | None = None, start_mean=None, start_cov=None,
                  spacing: str = "trailing") -> tuple[np.ndarray, np.ndarray]:
        """Mean `(8,)` and covariance `(8, 8)` of the chain's output, started at `start_t` (None: T - 1 from
        N(0, I)) with the given law, over the grid's steps below the start (as `posterior_sample` runs it)."""
        grid = make_timesteps(self.abar.shape[0], steps, spacing)
        prev = np.concatenate([grid[1:], [-1]])
        mean = np.zeros(DIM) if start_mean is None else np.asarray(start_mean, np.float64)
        cov = np.eye(DIM) if start_cov is None else np.asarray(start_cov, np.float64)
        start_t = int(grid[0]) if start_t is None else start_t
        eye = np.eye(DIM)
        for t, p in zip(grid, prev, strict=True):
            if p >= start_t:
                continue
            t = min(int(t), start_t)
            a, ap = self._abar(t), self._abar(int(p))
            eps_gain = np.sqrt(1 - a) * np.linalg.inv(a * self.sigma + (1 - a) * eye)  # eps = G (x - sqrt(a) mu)
            x0_gain = (eye - np.sqrt(1 - a) * eps_gain) / np.sqrt(a)
            x0_offset = eps_gain @ self.mu * np.sqrt(1 - a)
            var = 0.0 if p < 0 else eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
            direction = np.sqrt(max(1 - ap - var, 0.0))
            gain = np.sqrt(ap) * x0_gain + direction * eps_gain
            offset = np.sqrt(ap) * x0_offset - direction * eps_gain @ (np.sqrt(a) * self.mu)
            mean = gain @ mean + offset
            cov = gain @ cov @ gain.T + var * eye
        return mean, cov

    def observed_rows(self, mask: np.ndarray) -> np.ndarray:
        """Rows of the decoder for the observed entries of an `(8, 3)` mask (row-major, as decode_fn reshapes)."""
        return self.decoder[np.asarray(mask, bool).reshape(-1)]


def gaussian_posterior(prior_mean, prior_cov, rows, noise_cov, observed):
    """z | y for z ~ N(prior_mean, prior_cov), y = rows z + n, n ~ N(0, noise_cov): (mean, cov)."""
    precision = np.linalg.inv(prior_cov) + rows.T @ np.linalg.solve(noise_cov, rows)
    cov = np.linalg.inv(precision)
    mean = cov @ (np.linalg.solve(prior_cov, prior_mean) + rows.T @ np.linalg.solve(noise_cov, observed))
    return mean, cov


def gaussian_log_evidence(prior_mean, prior_cov, rows, noise_cov, observed) -> float:
    """log N(observed; rows prior_mean, rows prior_cov rows^T + noise_cov)."""
    cov = rows @ prior_cov @ rows.T + noise_cov
    residual = observed - rows @ prior_mean
    _, log_det = np.linalg.slogdet(2 * np.pi * cov)
    return float(-0.5 * (residual @ np.linalg.solve(cov, residual) + log_det))


def moment_errors(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[float, np.ndarray]:
    """(largest |sample mean - mean| in units of the exact standard deviation, eigenvalues of the sample
    covariance whitened by the exact one: all 1 when the covariances agree)."""
    samples = np.asarray(samples, np.float64).reshape(samples.shape[0], -1)
    mean_error = float(np.max(np.abs(samples.mean(0) - mean) / np.sqrt(np.diag(cov))))
    whiten = np.linalg.inv(np.linalg.cholesky(cov))
    return mean_error, np.linalg.eigvalsh(whiten @ np.cov(samples.T) @ whiten.T)
