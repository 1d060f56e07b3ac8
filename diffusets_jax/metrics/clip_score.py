"""CLIP score: how well a generated ECG matches the text it was generated from.

Reference spec section 8: the cosine between the L2-normalised ECG features (CLIP ECG tower, 64-d) and the
L2-normalised projected text embedding (CLIP text tower on the 1536-d report embedding, 64-d), per pair,
averaged. Either give the two feature arrays, or the trained CLIP as a `(module, variables)` pair and raw
ECGs plus text embeddings (`clip_score_from_model`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.metrics.features import clip_ecg_features, clip_text_features

ArrayLike = np.ndarray | jax.Array

# Zero vectors get cosine 0 instead of NaN (a dead feature extractor shows up as a low score, not a crash).
_NORM_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class ClipScore:
    """`mean` cosine over pairs and the per-pair cosines `(n,)` (each in [-1, 1])."""

    mean: float
    per_pair: np.ndarray


@jax.jit
def pairwise_cosine(ecg_features: jax.Array, text_features: jax.Array) -> jax.Array:
    """Row-wise cosine of `(n, e)` and `(n, e)` -> `(n,)`, in float32."""
    ecg_features = ecg_features.astype(jnp.float32)
    text_features = text_features.astype(jnp.float32)
    ecg_unit = ecg_features / jnp.maximum(jnp.linalg.norm(ecg_features, axis=-1, keepdims=True), _NORM_FLOOR)
    text_unit = text_features / jnp.maximum(jnp.linalg.norm(text_features, axis=-1, keepdims=True), _NORM_FLOOR)
    return jnp.sum(ecg_unit * text_unit, axis=-1)


def clip_score(ecg_features: ArrayLike, text_features: ArrayLike) -> ClipScore:
    """CLIP score of paired `ecg_features` `(n, e)` and projected `text_features` `(n, e)` (not normalised)."""
    # Python lists of feature vectors failed below with "'list' object has no attribute 'ndim'".
    ecg_features, text_features = (x if hasattr(x, "ndim") else np.asarray(x) for x in (ecg_features, text_features))
    if ecg_features.ndim != 2 or ecg_features.shape != text_features.shape:
        raise ValueError(
            f"clip_score: expected paired features of equal shape (n, dim); got ECG {tuple(ecg_features.shape)} "
            f"and text {tuple(text_features.shape)}"
        )
    per_pair = np.asarray(pairwise_cosine(jnp.asarray(np.asarray(ecg_features)), jnp.asarray(np.asarray(text_features))), dtype=np.float64)
    if not np.all(np.isfinite(per_pair)):
        raise ValueError("clip_score: non-finite features (NaN or inf); check the CLIP model and its inputs")
    return ClipScore(mean=float(per_pair.mean()), per_pair=per_pair)


def clip_score_from_model(
    clip: nn.Module,
    variables: Mapping[str, Any],
    ecgs: ArrayLike,
    text_embeddings: ArrayLike,
    batch_size: int = 256,
) -> ClipScore:
    """CLIP score of `ecgs` `(n, 1024, 12)` (mV, standard lead order) against their conditioning
    `text_embeddings` `(n, 1536)`, through the trained CLIP (`diffusets_jax.models.clip.CLIP` and its
    variables): `encode_ecg` and `encode_text` projections, in inference mode, batched under jit."""
    if ecgs.shape[0] != text_embeddings.shape[0]:
        raise ValueError(f"clip_score: {ecgs.shape[0]} ECGs but {text_embeddings.shape[0]} text embeddings")
    return clip_score(
        clip_ecg_features(clip, variables, ecgs, batch_size),
        clip_text_features(clip, variables, text_embeddings, batch_size),
    )
