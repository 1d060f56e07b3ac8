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


def _apply_in_batches(fn, variables, data, batch_size: int) -> np.ndarray:
    """Run `fn(variables, batch)` over `data`, padding the last short batch so only one shape compiles."""
    outputs = []
    for batch in _batches(data, batch_size):
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
    return _apply_in_batches(encode, variables, ecgs, batch_size)


def clip_text_features(
    clip: nn.Module, variables: Mapping[str, Any], text_embeddings: ArrayLike, batch_size: int = 256
) -> np.ndarray:
    """Report embeddings `(n, 1536)` -> projected text features `(n, embed_dim)` (`method="encode_text"`)."""
    encode = functools.partial(_apply, clip, "encode_text")
    return _apply_in_batches(encode, variables, text_embeddings, batch_size)
