"""Observation models for posterior sampling: what part of an ECG is seen, how noisily, and with what drift.

One linear-Gaussian family covers every use the sampler offers:

    y = M * (x + B c) + n,    n ~ N(0, noise_std^2 I),    c ~ N(0, tau^2 I)    (c only with a drift model)

- `x` is the ECG `(batch, 1024, 12)` (mV, standard lead order), `y` the observed values, same shape.
- `M` is an element-wise 0/1 mask `(batch, 1024, 12)`: a subset of leads (reconstruct 12 leads from one or
  two), a time window (complete a cropped strip), their product, or any pattern (the 2.5 s columns of a
  printed 12-lead sheet; samples a recorder dropped). Unobserved entries of `y` are ignored.
- `noise_std` (mV) says how closely the sample must follow the observed values: ~0.01-0.05 for
  reconstruction and denoising, larger (0.1-0.3) for a digital twin whose new report should be free to
  change the morphology.
- Baseline wander is a low-frequency drift `B c` per lead: `B` is the orthonormal DCT-II basis
  `(1024, n_basis)` of every cosine up to `cutoff_hz`, and the Gaussian prior on `c` is marginalised in
  closed form (Woodbury identity), so the likelihood stays Gaussian and cheap. The sampler then produces a
  clean ECG and `estimate_drift` returns the wander it separated. As `drift_std_mv` grows the model tends
  to observing `y` through a high-pass filter; a finite value says how large wander is expected to be.

The likelihood is evaluated on whatever `(batch, length, leads)` shape the values have, so tests use tiny
linear-Gaussian toys; lead names only apply to 12-lead ECGs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusets_jax.ecg.leads import STANDARD_LEADS, UnknownLeadError, canonical_lead_name
from diffusets_jax.ecg.shapes import ECG_LENGTH, ECG_SECONDS, NUM_LEADS

# 40 bpm: every cosine below the slowest heart rate's fundamental is baseline, not ECG. It is also the
# high-pass corner the AHA/ACCF/HRS recommendations accept for zero-phase baseline removal (Kligfield et al.
# 2007, Circulation 115:1306).
DEFAULT_DRIFT_CUTOFF_HZ = 0.67
# Typical wander is a few tenths of a mV; 1 mV RMS is a weak prior that still leaves QRS-scale content to x.
DEFAULT_DRIFT_STD_MV = 1.0


@struct.dataclass
class Observation:
    """A batch of observations y = mask * (x + drift) + noise, one per generated ECG.

    values: `(batch, length, leads)` float32 y in mV (zero where unobserved).
    mask: `(batch, length, leads)` float32, 1 where observed.
    noise_std: `(batch,)` float32 > 0, the observation noise in mV.
    drift_std: `(batch,)` float32 >= 0, the RMS amplitude per sample of the drift prior (mV); 0 = no drift.
    drift_basis: `(length, n_basis)` orthonormal columns spanning the drift, or None for no drift model.
    drift_eigenvalues: `(batch, leads, n_basis)` float32 >= 0 and drift_eigenvectors `(batch, leads, n_basis,
        n_basis)` (columns): G = B^T diag(mask) B = V diag(L) V^T per sample and lead, with a drift model (else
        None). They depend on the mask only, so `make_observation` computes them in float64 NumPy: see
        `_drift_terms` for why not in the likelihood. A new mask needs a new observation from `make_observation`.

    Build one with `make_observation`; shard it with `map_samples` (every per-sample array) like the conditions.
    """

    values: jax.Array
    mask: jax.Array
    noise_std: jax.Array
    drift_std: jax.Array
    drift_basis: jax.Array | None = None
    drift_eigenvalues: jax.Array | None = None
    drift_eigenvectors: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])

    def map_samples(self, fn: Callable[[jax.Array], jax.Array]) -> Observation:
        """This observation with `fn` applied to every array with a batch axis first (to shard, place or repeat
        them per sample); the drift basis, shared by all samples, is kept as it is."""
        per_sample = ("values", "mask", "noise_std", "drift_std", "drift_eigenvalues", "drift_eigenvectors")
        return self.replace(**{name: fn(getattr(self, name)) for name in per_sample
                               if getattr(self, name) is not None})


def lead_mask(leads: str | Sequence[str], *, available: Sequence[str] | None = None, what: str = "leads"
              ) -> np.ndarray:
    """`(12,)` bool mask over the standard leads from names ("I,II" or ["I", "aVL"]; any usual spelling).

    `available`: the leads the reference actually has; asking for another is an error. Raises ValueError
    (one line, naming `what`) for an empty list, an unknown name or an unavailable lead.
    """
    names = [part for part in (leads.split(",") if isinstance(leads, str) else leads) if str(part).strip()]
    if not names:
        raise ValueError(f"{what}: no lead named; give one or more of {', '.join(STANDARD_LEADS)} (e.g. 'I,II')")
    mask = np.zeros((NUM_LEADS,), bool)
    for name in names:
        try:
            mask[STANDARD_LEADS.index(canonical_lead_name(name))] = True
        except UnknownLeadError as err:
            raise ValueError(f"{what}: {err}") from None
    if available is not None:
        have = {canonical_lead_name(name) for name in available}
        missing = [lead for lead, on in zip(STANDARD_LEADS, mask, strict=True) if on and lead not in have]
        if missing:
            raise ValueError(f"{what}: lead(s) {', '.join(missing)} not in the reference, which has "
                             f"{', '.join(lead for lead in STANDARD_LEADS if lead in have) or 'none'}")
    return mask


def window_mask(start_s: float, end_s: float, *, length: int = ECG_LENGTH, seconds: float = ECG_SECONDS,
                what: str = "window") -> np.ndarray:
    """`(length,)` bool mask of the samples whose time n * seconds / length lies in [start_s, end_s)."""
    start_s, end_s = float(start_s), float(end_s)
    if not 0.0 <= start_s < end_s <= seconds:
        raise ValueError(f"{what}: need 0 <= start < end <= {seconds:g} s, got start={start_s:g}, end={end_s:g}")
    times = np.arange(length) * (seconds / length)
    mask = (times >= start_s) & (times < end_s)
    if not mask.any():
        raise ValueError(f"{what}: [{start_s:g}, {end_s:g}) s holds no sample at {length / seconds:g} Hz; widen it")
    return mask


def drift_basis(length: int = ECG_LENGTH, seconds: float = ECG_SECONDS,
                cutoff_hz: float = DEFAULT_DRIFT_CUTOFF_HZ) -> np.ndarray:
    """Orthonormal DCT-II basis `(length, n_basis)` of the cosines with frequency <= cutoff_hz (DC included).

    Column k is cos(pi k (n + 1/2) / length), frequency k / (2 seconds) Hz; 14 columns for 10 s at 0.67 Hz.
    """
    if not cutoff_hz >= 0.0:
        raise ValueError(f"drift cutoff_hz must be >= 0 Hz, got {cutoff_hz}")
    n_basis = min(int(math.floor(2.0 * seconds * cutoff_hz)) + 1, length)
    n = np.arange(length)[:, None] + 0.5
    k = np.arange(n_basis)[None, :]
    basis = np.cos(np.pi * k * n / length) * math.sqrt(2.0 / length)
    basis[:, 0] = math.sqrt(1.0 / length)
    return basis.astype(np.float32)


def _per_sample(value: float | Sequence[float] | np.ndarray, batch: int, what: str, minimum: float,
                strict: bool) -> np.ndarray:
    array = np.broadcast_to(np.asarray(value, np.float64), (batch,)) if np.ndim(value) == 0 else np.asarray(
        value, np.float64)
    if array.shape != (batch,):
        raise ValueError(f"{what}: give one value or one per sample ({batch}), got shape {array.shape}")
    bad = ~np.isfinite(array) | ((array <= minimum) if strict else (array < minimum))
    if bad.any():
        relation = ">" if strict else ">="
        hint = "; use a small value such as 0.01 mV for a near-exact observation" if strict else ""
        raise ValueError(f"{what}: must be {relation} {minimum:g} mV, got {array[bad][0]:g}{hint}")
    return array.astype(np.float32)


def make_observation(
    values: np.ndarray,
    *,
    noise_std: float | Sequence[float],
    leads: str | Sequence[str] | None = None,
    available_leads: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
    drift_cutoff_hz: float | None = None,
    drift_std_mv: float | Sequence[float] = DEFAULT_DRIFT_STD_MV,
    seconds: float = ECG_SECONDS,
) -> Observation:
    """An `Observation` of `values` `(batch, length, leads)` or one record `(length, leads)` (batch 1).

    The observed entries are the product of every mask given (all entries when none is): `leads` (names,
    12-lead values only; default `available_leads`, or all), `window` (start_s, end_s), and an explicit
    element-wise `mask` broadcastable to the values. NaN values count as unobserved (missing samples).
    `drift_cutoff_hz`: model baseline wander below this frequency (None: no drift model; the usual value
    is `DEFAULT_DRIFT_CUTOFF_HZ`), with prior RMS amplitude `drift_std_mv` per sample.
    Every problem raises a one-line ValueError naming the argument, before any model runs.
    """
    values = np.asarray(values, np.float32)
    if values.ndim == 2:
        values = values[None]
    if values.ndim != 3 or values.shape[0] < 1 or values.shape[1] < 1 or values.shape[2] < 1:
        raise ValueError(f"values: expected (batch, length, leads) or (length, leads), got shape {values.shape}")
    batch, length, n_leads = values.shape
    observed = np.isfinite(values)
    if leads is not None or available_leads is not None:
        if n_leads != NUM_LEADS:
            raise ValueError(f"leads: lead names need 12-lead values in the standard order, got {n_leads} leads")
        chosen = lead_mask(leads if leads is not None else list(available_leads), available=available_leads)
        observed &= chosen[None, None, :]
    if window is not None:
        if len(window) != 2:
            raise ValueError(f"window: give (start_s, end_s), got {window!r}")
        observed &= window_mask(window[0], window[1], length=length, seconds=seconds)[None, :, None]
    if mask is not None:
        mask = np.asarray(mask)
        try:
            observed &= np.broadcast_to(mask.astype(bool), values.shape)
        except ValueError:
            raise ValueError(f"mask: shape {mask.shape} does not broadcast to the values' {values.shape}") from None
    empty = ~observed.reshape(batch, -1).any(axis=1)
    if empty.any():
        raise ValueError(f"observation: sample {int(np.argmax(empty))} observes nothing (all entries masked or NaN)")
    noise = _per_sample(noise_std, batch, "noise_std", 0.0, strict=True)
    basis = eigenvalues = eigenvectors = None
    drift = np.zeros((batch,), np.float32)
    if drift_cutoff_hz is not None:
        basis = drift_basis(length, seconds, float(drift_cutoff_hz))
        drift = _per_sample(drift_std_mv, batch, "drift_std_mv", 0.0, strict=False)
        eigenvalues, eigenvectors = _drift_gram_eigen(basis, observed)
        basis, eigenvalues, eigenvectors = jnp.asarray(basis), jnp.asarray(eigenvalues), jnp.asarray(eigenvectors)
    return Observation(
        values=jnp.asarray(np.where(observed, values, 0.0)),
        mask=jnp.asarray(observed.astype(np.float32)),
        noise_std=jnp.asarray(noise),
        drift_std=jnp.asarray(drift),
        drift_basis=basis,
        drift_eigenvalues=eigenvalues,
        drift_eigenvectors=eigenvectors,
    )


def _drift_gram_eigen(basis: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues `(batch, leads, n_basis)` (clipped at 0: G is a Gram matrix) and eigenvectors `(batch, leads,
    n_basis, n_basis)` (columns) of G = B^T diag(mask) B per sample and lead, in float64, returned as float32.

    basis: `(length, n_basis)` as the likelihood uses it (float32); observed: `(batch, length, leads)` bool.
    """
    basis = basis.astype(np.float64)
    # optimize: as one contraction after another (a matmul) 20x faster than NumPy's default loop (1 s at batch 64).
    gram = np.einsum("lk,blc,lj->bckj", basis, observed.astype(np.float64), basis, optimize=True)
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    return np.maximum(eigenvalues, 0.0).astype(np.float32), eigenvectors.astype(np.float32)


def _drift_terms(observation: Observation, residual: jax.Array, variance: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per (sample, lead) pieces of the marginalised drift in the eigenbasis of G = B^T diag(mask) B = V L V^T:
    s = V^T S^{-1} u with u = B^T r `(batch, leads, n_basis)`, the eigenvalues d = variance + tau^2 L of
    S = variance I + tau^2 G `(batch, leads, n_basis)`, the drift's posterior mean coefficients a = tau^2 V s
    `(batch, leads, n_basis)`, and tau^2 `(batch,)`.

    tau^2 (variance of each basis coefficient) = drift_std^2 * length / n_basis, so that the drift's mean
    squared value per sample is drift_std^2.
    Why eigenvalues from `make_observation`, not a Cholesky factor of S: a window leaves cosines nearly unobserved
    (L near 0), and a float32 G's rounding (about 1e-7) times tau^2 (73 mV^2 by default) outweighs a small
    variance (1e-6 for 0.001 mV), so S was not positive definite and its factor NaN. With L from float64 and
    clipped at 0, d >= variance. An eigendecomposition inside the sampler's jitted, sharded chain hung on 8
    simulated devices; G does not depend on the ECG, so here only elementwise work and einsums remain.
    Why one refinement step: u's float32 rounding (about 1e-7 |u|) falls on the nearly unobserved directions
    too, where S^{-1} magnifies it up to 1 / variance; solving once more for the normal equations' remainder
    tau^2 (B^T M e - variance V s), with e = r - M B a far smaller than r, removes that error to first order.
    """
    basis, vectors = observation.drift_basis, observation.drift_eigenvectors
    length, n_basis = basis.shape
    tau2 = jnp.square(observation.drift_std) * (length / n_basis)
    d = variance[:, None, None] + tau2[:, None, None] * observation.drift_eigenvalues
    to_eigen = lambda a: jnp.einsum("bckj,bck->bcj", vectors, a)  # V^T a
    from_eigen = lambda a: jnp.einsum("bckj,bcj->bck", vectors, a)  # V a
    solved = to_eigen(jnp.einsum("lk,blc->bck", basis, residual)) / d
    corrected = residual - observation.mask * jnp.einsum("lk,bck->blc", basis, tau2[:, None, None] * from_eigen(solved))
    remainder = jnp.einsum("lk,blc->bck", basis, corrected) - variance[:, None, None] * from_eigen(solved)
    solved = solved + to_eigen(remainder) / d
    return solved, d, tau2[:, None, None] * from_eigen(solved), tau2


def log_likelihood(observation: Observation, ecg: jax.Array, extra_variance: jax.Array | float = 0.0) -> jax.Array:
    """log N(y; mask * x, noise_std^2 + extra_variance, drift marginalised), exact with constants, `(batch,)`.

    ecg: `(batch, length, leads)`. extra_variance: added to every observed entry's variance (the sampler's
    twisting uses it for the uncertainty of a denoised estimate); scalar or `(batch,)`.
    Per lead with n observed samples, residual r, s = noise_std^2 + extra:
    -1/2 [ (r.r - tau^2 u^T S^{-1} u) / s + (n - K) log s + log det S + n log 2 pi ]   (Woodbury),
    with r.r - tau^2 u^T S^{-1} u = |r - M B a|^2 + s tau^2 |S^{-1} u|^2 for the drift's posterior mean a =
    tau^2 S^{-1} u: two positive terms, where the difference lost everything to float32 cancellation at small
    noise (18 % off at 0.0003 mV with a window).
    """
    ecg = ecg.astype(jnp.float32)
    mask = observation.mask
    residual = mask * (observation.values - ecg)
    variance = jnp.square(observation.noise_std) + jnp.broadcast_to(jnp.asarray(extra_variance, jnp.float32),
                                                                      observation.noise_std.shape)
    count = jnp.sum(mask, axis=1)  # (batch, leads) observed samples per lead
    log_det = count * jnp.log(variance)[:, None]
    if observation.drift_basis is not None:
        solved, d, coefficients, tau2 = _drift_terms(observation, residual, variance)
        n_basis = observation.drift_basis.shape[1]
        residual = residual - mask * jnp.einsum("lk,bck->blc", observation.drift_basis, coefficients)
        quad = jnp.sum(jnp.square(residual), axis=1) \
            + (variance * tau2)[:, None] * jnp.sum(jnp.square(solved), axis=-1)
        log_det = log_det + jnp.sum(jnp.log(d), axis=-1) - n_basis * jnp.log(variance)[:, None]
        # A lead with no observed sample contributes nothing: its Gram matrix is zero and S = variance I.
    else:
        quad = jnp.sum(jnp.square(residual), axis=1)  # (batch, leads)
    per_lead = quad / variance[:, None] + log_det + count * math.log(2.0 * math.pi)
    return -0.5 * jnp.sum(per_lead, axis=-1)


def estimate_drift(observation: Observation, ecg: jax.Array) -> jax.Array:
    """The posterior mean of the drift B c given y and a clean ECG x, `(batch, length, leads)` (zeros without a
    drift model): tau^2 B S^{-1} B^T r with r = mask * (y - x). `y - drift` is the baseline-corrected record."""
    if observation.drift_basis is None:
        return jnp.zeros(observation.values.shape, jnp.float32)
    residual = observation.mask * (observation.values - ecg.astype(jnp.float32))
    _, _, coefficients, _ = _drift_terms(observation, residual, jnp.square(observation.noise_std))
    return jnp.einsum("lk,bck->blc", observation.drift_basis, coefficients)


def check_observation(observation: Observation, ecg_shape: tuple[int, ...], batch: int) -> None:
    """Raise a one-line ValueError when `observation` cannot observe ECGs of `ecg_shape` `(length, leads)` for
    a batch of `batch` samples. Shapes only, so it works on traced arrays before anything is computed."""
    values_shape = tuple(observation.values.shape)
    if values_shape != (batch, *ecg_shape):
        raise ValueError(f"observation: values have shape {values_shape}, expected {(batch, *ecg_shape)} "
                         "(one observed ECG per sample of the batch)")
    if tuple(observation.mask.shape) != values_shape:
        raise ValueError(f"observation: mask shape {tuple(observation.mask.shape)} differs from values {values_shape}")
    for name in ("noise_std", "drift_std"):
        if tuple(getattr(observation, name).shape) != (batch,):
            raise ValueError(f"observation: {name} has shape {tuple(getattr(observation, name).shape)}, "
                             f"expected ({batch},)")
    if observation.drift_basis is not None:
        if observation.drift_basis.shape[0] != ecg_shape[0]:
            raise ValueError(f"observation: drift basis has {observation.drift_basis.shape[0]} samples, "
                             f"the ECGs {ecg_shape[0]}")
        n_basis = observation.drift_basis.shape[1]
        expected = {"drift_eigenvalues": (batch, ecg_shape[1], n_basis),
                    "drift_eigenvectors": (batch, ecg_shape[1], n_basis, n_basis)}
        for name, shape in expected.items():
            array = getattr(observation, name)
            if array is None or tuple(array.shape) != shape:
                got = "none" if array is None else f"shape {tuple(array.shape)}"
                raise ValueError(f"observation: {name} has {got}, expected {shape}; build the observation with "
                                 "make_observation")
