"""Resampling: any 10-second record to the DiffuSETS time base (1024 samples) and back to a clinical rate."""

from __future__ import annotations

import numpy as np
import scipy.signal

from diffusets_jax.ecg.shapes import ECG_LENGTH


def resample_to_length(
    signal: np.ndarray, length: int = ECG_LENGTH, axis: int = 0, dtype: np.dtype = np.float32
) -> np.ndarray:
    """FFT-resample a whole record to `length` samples along `axis`, NaN -> 0 first (the DiffuSETS rule).

    `scipy.signal.resample` over the whole record, exactly as the reference preprocessing: a 10 s record at
    any sampling rate becomes (1024, 12) at an effective 102.4 Hz. Computed in float64, returned as `dtype`.
    """
    values = np.nan_to_num(np.asarray(signal, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.shape[axis] == length:
        return values.astype(dtype)
    return scipy.signal.resample(values, length, axis=axis).astype(dtype)


def resample_rate(
    signal: np.ndarray, fs_in: float, fs_out: float, axis: int = 0, dtype: np.dtype = np.float32
) -> np.ndarray:
    """FFT-resample from `fs_in` to `fs_out` Hz, keeping the duration: n samples -> round(n * fs_out / fs_in).

    The inverse of `resample_to_length` for writing records at a clinical rate, e.g. a generated (1024, 12)
    record at 102.4 Hz -> (5000, 12) at 500 Hz for WFDB output. NaN -> 0 as in `resample_to_length`.
    """
    if fs_in <= 0 or fs_out <= 0:
        raise ValueError(f"sampling rates must be positive, got fs_in={fs_in}, fs_out={fs_out}")
    n_out = int(round(np.asarray(signal).shape[axis] * float(fs_out) / float(fs_in)))
    return resample_to_length(signal, n_out, axis=axis, dtype=dtype)
