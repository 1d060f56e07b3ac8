"""The evaluation feature space: the trained CLIP's ECG tower (reference spec section 8).

FID, rFID, precision/recall and the CLIP score all compare ECGs through `CLIP.encode_ecg` (Net1D -> linear
projector, 64-d, unnormalised). This module runs it in fixed-size batches under one jit, so any number of
ECGs (an array or a stream of batches) becomes an `(n, 64)` feature array for the metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.ecg.shapes import ECG_LENGTH, ECG_RATE_HZ

ArrayLike = np.ndarray | jax.Array


@functools.partial(jax.jit, static_argnames=("clip", "method"))
def _apply(clip: nn.Module, method: str, variables: Mapping[str, Any], inputs: jax.Array) -> jax.Array:
    # One compiled function per (model config, method, batch shape), shared by every call: modules are
    # hashable dataclasses, so repeated feature extraction (e.g. real set, then each checkpoint) reuses it.
    return clip.apply(variables, inputs, method=method)


def _batches(data: ArrayLike | Iterable[ArrayLike], batch_size: int) -> Iterable[ArrayLike]:
    if hasattr(data, "ndim"):
        return (data[i : i + batch_size] for i in range(0, data.shape[0], batch_size))
    return data


def _check_ecgs(batch: ArrayLike, in_channels: int) -> None:
    """One-line ValueError unless `batch` is `(n, 1024, in_channels)`. Net1D ends in mean pooling, so it takes any
    length: a 10-second record at its recorded 500 Hz, `(n, 5000, 12)`, gave features of a time base the CLIP never
    saw, and FID, precision/recall and the CLIP score computed on them were silently meaningless."""
    shape = tuple(np.shape(batch))
    if len(shape) != 3 or shape[2] != in_channels:
        raise ValueError(f"clip_ecg_features: ecgs has shape {shape}, expected (n, {ECG_LENGTH}, {in_channels}) mV, "
                         "leads last (ecgs[None] for one ECG; transpose (n, 12, 1024) PyTorch-layout arrays)")
    if shape[1] != ECG_LENGTH:
        raise ValueError(f"clip_ecg_features: ecgs has {shape[1]} samples per record, expected {ECG_LENGTH} (10 s at "
                         f"{ECG_RATE_HZ} Hz, the CLIP's time base): resample whole records first, "
                         "ecg.resample.resample_to_length(ecgs, axis=1)")


def _apply_in_batches(fn, variables, data, batch_size: int, check=None) -> np.ndarray:
    """Run `fn(variables, batch)` over `data`, padding the last short batch so only one shape compiles; `check(batch)`
    first, where given."""
    outputs = []
    for batch in _batches(data, batch_size):
        if check is not None:
            check(batch)
        rows = int(batch.shape[0])
        if rows == 0:
            continue
        batch = jnp.asarray(batch)
        if rows < batch_size and hasattr(data, "ndim"):
            batch = jnp.pad(batch, ((0, batch_size - rows),) + ((0, 0),) * (batch.ndim - 1))
        outputs.append(np.asarray(fn(variables, batch))[:rows])
    if not outputs:
        raise ValueError("no inputs given")
    return np.concatenate(outputs)


def clip_ecg_features(
    clip: nn.Module, variables: Mapping[str, Any], ecgs: ArrayLike | Iterable[ArrayLike], batch_size: int = 256
) -> np.ndarray:
    """ECGs `(n, 1024, 12)` (mV, standard lead order; or an iterable of such batches) -> CLIP ECG features
    `(n, embed_dim)` via `clip.apply(variables, ecg, method="encode_ecg")` in inference mode."""
    encode = functools.partial(_apply, clip, "encode_ecg")
    return _apply_in_batches(encode, variables, ecgs, batch_size,
                             check=functools.partial(_check_ecgs, in_channels=clip.in_channels))


def clip_text_features(
    clip: nn.Module, variables: Mapping[str, Any], text_embeddings: ArrayLike, batch_size: int = 256
) -> np.ndarray:
    """Report embeddings `(n, 1536)` -> projected text features `(n, embed_dim)` (`method="encode_text"`)."""
    encode = functools.partial(_apply, clip, "encode_text")
    return _apply_in_batches(encode, variables, text_embeddings, batch_size)
