"""Heart-rate MAE: does a generated ECG beat at the rate it was conditioned on?

MAE = mean |HR_condition - HR_measured|, the rate measured on each generated ECG at its own sampling rate
(102.4 Hz for the 1024-sample model output) by `diffusets_jax.ecg.heart_rate.detected_heart_rate`, shared with
data preparation so that the metric measures rates the same way the training labels were made. The default
method is the multi-lead consensus detector; `method="xqrs_first_lead"` is the published protocol (reference spec
section 8: XQRS lead by lead, the first lead with two beats), which at 102.4 Hz often counts T waves.

Records with fewer than two beats (flat or garbled output, non-finite samples) cannot be measured. They
are not silently dropped: the result carries their indices and count, the MAE is over measured records only,
and `failure_rate` belongs in any report next to the MAE (a model that emits flat lines must not score well).
Detection is CPU-bound, so `workers > 1` (or a shared `RecordPool`) spreads records over processes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike

# No JAX import here: worker processes import this module, and should start in a second, not load XLA.
from diffusets_jax.ecg.heart_rate import CONSENSUS, DETECTION_METHODS, detected_heart_rate
from diffusets_jax.ecg.shapes import ECG_RATE_HZ
from diffusets_jax.metrics.record_pool import RecordPool, record_pool


@dataclasses.dataclass(frozen=True)
class HeartRateMAE:
    """`mae` over measured records (NaN when none could be measured).

    Per record, shape `(n,)`: `measured_bpm` (NaN where failed), `lead` (for "xqrs_first_lead", the index in the
    input lead order of the lead that gave the rate; -1 for the consensus and where failed), `absolute_error` (NaN where failed). `failed` lists the
    indices of unmeasurable records; `errors` maps an index to the exception text where detection raised.
    """

    mae: float
    measured_bpm: np.ndarray
    lead: np.ndarray
    absolute_error: np.ndarray
    failed: np.ndarray
    errors: dict[int, str]

    @property
    def n_records(self) -> int:
        return int(self.measured_bpm.shape[0])

    @property
    def n_failed(self) -> int:
        return int(self.failed.shape[0])

    @property
    def n_measured(self) -> int:
        return self.n_records - self.n_failed

    @property
    def failure_rate(self) -> float:
        return self.n_failed / self.n_records if self.n_records else 0.0


def _measure_one(signal: np.ndarray, fs: float, method: str) -> tuple[float, int, str | None]:
    """(bpm, lead, error) for one `(samples, leads)` record; bpm NaN and lead -1 when unmeasurable."""
    if not np.all(np.isfinite(signal)):
        return float("nan"), -1, "non-finite samples"
    try:
        found = detected_heart_rate(signal, fs, method)
    except Exception as err:  # noqa: BLE001 -- one record's detector crash is that record's failure, recorded
        return float("nan"), -1, f"{type(err).__name__}: {err}"
    if found is None:
        return float("nan"), -1, None
    return float(found.bpm), int(found.lead), None


def _measure_chunk(signals: np.ndarray, fs: float, method: str) -> list[tuple[float, int, str | None]]:
    return [_measure_one(signal, fs, method) for signal in signals]


def measure_heart_rates(
    ecgs: ArrayLike, fs: float = ECG_RATE_HZ, workers: int | RecordPool = 1, method: str = CONSENSUS
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Heart rate of each ECG in `ecgs` `(batch, samples, leads)` (mV, channels last).

    Returns `(bpm (batch,), lead (batch,), errors)`, with NaN / -1 for records that could not be measured and
    `errors` holding the exception text of records where the detector raised.
    """
    if method not in DETECTION_METHODS:
        raise ValueError(f"method: unknown heart-rate method {method!r}; use one of {', '.join(DETECTION_METHODS)}")
    ecgs = np.asarray(ecgs, dtype=np.float64)  # also fetches a jax.Array from its device
    if ecgs.ndim != 3:
        raise ValueError(f"ecgs: expected shape (batch, samples, leads), got {ecgs.shape}")
    with record_pool(workers) as pool:
        results = pool.map(_measure_chunk, ecgs, fs, method)
    bpm = np.array([r[0] for r in results], dtype=np.float64)
    lead = np.array([r[1] for r in results], dtype=np.int64)
    errors = {i: r[2] for i, r in enumerate(results) if r[2] is not None}
    return bpm, lead, errors


def heart_rate_mae(
    ecgs: ArrayLike, condition_bpm: ArrayLike, fs: float = ECG_RATE_HZ, workers: int | RecordPool = 1, method: str = CONSENSUS
) -> HeartRateMAE:
    """MAE between the conditioning heart rates `(batch,)` (bpm) and the rates measured on `ecgs`
    `(batch, samples, leads)` sampled at `fs` Hz (`method`: "consensus" or the published "xqrs_first_lead")."""
    # The shape first: a single (samples, leads) record read as `samples` ECGs blamed condition_bpm's length.
    if np.ndim(ecgs) != 3:
        raise ValueError(f"ecgs: expected shape (batch, samples, leads), got {np.shape(ecgs)}")
    condition_bpm = np.asarray(condition_bpm, dtype=np.float64).reshape(-1)
    if condition_bpm.shape[0] != np.shape(ecgs)[0]:
        raise ValueError(
            f"condition_bpm has {condition_bpm.shape[0]} values for {np.shape(ecgs)[0]} ECGs; give one per ECG"
        )
    # A missing condition rate (NaN) made the MAE NaN after every record was measured; a rate per ECG is the input.
    unknown = np.flatnonzero(~np.isfinite(condition_bpm))
    if unknown.size:
        raise ValueError(
            f"condition_bpm is NaN or inf at {unknown.size} of {condition_bpm.size} ECGs (first at index "
            f"{unknown[0]}): pass only the ECGs with a conditioning heart rate"
        )
    measured, lead, errors = measure_heart_rates(ecgs, fs, workers, method)
    absolute_error = np.abs(measured - condition_bpm)
    failed = np.flatnonzero(np.isnan(measured))
    ok = ~np.isnan(measured)
    mae = float(np.mean(absolute_error[ok])) if ok.any() else float("nan")
    return HeartRateMAE(
        mae=mae, measured_bpm=measured, lead=lead, absolute_error=absolute_error, failed=failed, errors=errors
    )
