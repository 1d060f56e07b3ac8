"""The DiffuSETS ECG-text CLIP model: Net1D ECG tower + linear projector, MLP text projector, learned temperature.

Its ECG tower, `encode_ecg`, is the feature extractor of the evaluation metrics (FID, precision/recall,
CLIP score; reference section 8). Projections are returned unnormalised, as in the reference.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusets_jax.models.net1d import Net1D

# CLIP's initial temperature 0.07, stored as log(1 / 0.07).
LOGIT_SCALE_INIT = math.log(1 / 0.07)


class TextProjector(nn.Module):
    """Text embedding `(batch, text_dim) -> (batch, embed_dim)`: Linear -> ReLU -> Linear."""

    hidden_dim: int = 2048
    embed_dim: int = 64

    @nn.compact
    def __call__(self, text: jax.Array) -> jax.Array:
        return nn.Dense(self.embed_dim, name="linear_2")(nn.relu(nn.Dense(self.hidden_dim, name="linear_1")(text)))


class CLIP(nn.Module):
    """ECG / report-embedding contrastive model. Defaults are the published model (22.0 M parameters).

    The ECG tower's fields mirror `Net1D`'s (the tower is built from them); `text_dim` is the report
    embedding size (1536 for text-embedding-ada-002). Variables: `params` and `batch_stats`.
    """

    in_channels: int = 12
    base_filters: int = 64
    filters: tuple[int, ...] = (64, 128, 128, 256, 256, 512, 1024)
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 3, 3, 4, 4)
    kernel_size: int = 16
    group_width: int = 16
    dropout_rate: float = 0.5
    text_dim: int = 1536
    text_hidden_dim: int = 2048
    embed_dim: int = 64

    def setup(self) -> None:
        self.ecg_encoder = Net1D(
            in_channels=self.in_channels, base_filters=self.base_filters, filters=self.filters,
            blocks_per_stage=self.blocks_per_stage, kernel_size=self.kernel_size, group_width=self.group_width,
            dropout_rate=self.dropout_rate,
        )
        self.ecg_projector = nn.Dense(self.embed_dim)
        self.text_projector = TextProjector(self.text_hidden_dim, self.embed_dim)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), (), jnp.float32)

    def ecg_features(self, ecg: jax.Array, train: bool = False) -> jax.Array:
        """Net1D pooled features: ECG `(batch, 1024, 12)` (mV, standard lead order) -> `(batch, filters[-1])`."""
        return self.ecg_encoder(ecg, train)

    def encode_ecg(self, ecg: jax.Array, train: bool = False) -> jax.Array:
        """ECG `(batch, 1024, 12)` -> unnormalised projection `(batch, embed_dim)`: the metrics' feature space."""
        return self.ecg_projector(self.ecg_features(ecg, train))

    def encode_text(self, text_embedding: jax.Array) -> jax.Array:
        """Report embedding `(batch, text_dim)` -> unnormalised projection `(batch, embed_dim)`."""
        if text_embedding.shape[-1] != self.text_dim:
            raise ValueError(f"CLIP.encode_text expects (batch, {self.text_dim}) embeddings, got {text_embedding.shape}")
        return self.text_projector(text_embedding)

    def __call__(self, ecg: jax.Array, text_embedding: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """-> `(ecg_proj (batch, embed_dim), text_proj (batch, embed_dim), logit_scale ())`.

        `logit_scale` is the raw learned parameter, log(1 / temperature); the contrastive loss multiplies the
        cosine similarities by `exp(logit_scale)`.
        """
        return self.encode_ecg(ecg, train), self.encode_text(text_embedding), self.logit_scale
