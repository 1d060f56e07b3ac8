"""A synthetic latent dataset (what `diffusets-jax encode` writes: TFRecord shards, TFDS metadata and a card) whose
scaled latents are independent per-channel Gaussians of known mean and std, for tests that need the right answer
of a statistic in closed form."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffusets_jax.conditioning.spec import ConditioningSpec
from diffusets_jax.data.card import write_card
from diffusets_jax.data.latents import latent_features
from diffusets_jax.data.shards import example_serializer, shard_filename, write_shard, write_tfds_metadata
from diffusets_jax.ecg.shapes import LATENT_CHANNELS, LATENT_LENGTH

NAME = "gaussian_latents"
LOGVAR = -12.0  # posterior std 0.0025: draws from the posterior are the means up to a negligible jitter


def gaussian_latents(n: int, channel_mean: Sequence[float], channel_std: Sequence[float], seed: int) -> np.ndarray:
    """`(n, 128, 4)` float32 latents, element `[i, l, c]` drawn from N(channel_mean[c], channel_std[c]^2)."""
    rng = np.random.default_rng(seed)
    shape = (n, LATENT_LENGTH, LATENT_CHANNELS)
    return (np.asarray(channel_mean) + np.asarray(channel_std) * rng.standard_normal(shape)).astype(np.float32)


def write_gaussian_latent_dataset(path: str | os.PathLike, *, splits: Mapping[str, int], conditioning: ConditioningSpec,
                                  vae_uid: str | None, latent_scale: float, channel_mean: Sequence[float],
                                  channel_std: Sequence[float], seed: int = 0) -> Path:
    """Write the dataset into `path`: per split, latents whose *scaled* values (latent_mean x latent_scale) are
    `gaussian_latents(n, channel_mean, channel_std, seed + split index)`, conditions varying per example, and a
    card naming `conditioning`'s embedder and `vae_uid` as the encoding VAE. Returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dim = conditioning.embedder.dim
    serialize = example_serializer(latent_features(dim))
    for offset, (split, n) in enumerate(splits.items()):
        scaled = gaussian_latents(n, channel_mean, channel_std, seed + offset)
        rng = np.random.default_rng(seed + 100 + offset)
        records = (serialize({
            "latent_mean": scaled[i] / np.float32(latent_scale),
            "latent_logvar": np.full((LATENT_LENGTH, LATENT_CHANNELS), LOGVAR, np.float32),
            "text_embedding": rng.standard_normal(dim).astype(np.float32),
            "sex": i % 2, "age": 30.0 + i % 50, "heart_rate": 55.0 + (7 * i) % 60,
            "prompt": f"record {i}", "subject_id": i, "study_id": i}) for i in range(n))
        write_shard(path / shard_filename(NAME, split, 0, 1), records)
    write_tfds_metadata(path, NAME, latent_features(dim), {split: [n] for split, n in splits.items()},
                        description="synthetic Gaussian latents for tests")
    vae = {"model_dir": "/synthetic", "uid": vae_uid, "provenance": {}}
    write_card(path, kind="latents", name=NAME, config=None, version="1.0.0", conditioning=conditioning,
               splits=dict(splits), derived_from={"vae": vae})
    return path
