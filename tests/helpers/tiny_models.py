"""A tiny random VAE + U-Net model directory, conditioned like a real one (recorded embedder, prompt style,
patient features), for generation, output and CLI tests."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import numpy as np

from diffusets_jax.conditioning.spec import ConditioningSpec, EmbedderSpec
from diffusets_jax.diffusion.schedule import DiffusionSpec
from diffusets_jax.models import model_dir as model_dirs
from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE
from diffusets_jax.parallel import jit_run_once

TEXT_DIM = 16
FAKE_EMBEDDER = f"fake-embedding-{TEXT_DIM}"  # the name `openai_conditioning()` records


def tiny_vae_unet(text_dim: int = TEXT_DIM):
    """`(vae, vae_variables, unet, unet_variables)`: random weights, the published block structure, tiny widths.

    The same every call: initialised once per process and width, each caller getting its own dicts (of the same
    immutable arrays). About 30 tests and fixtures build a tiny model directory, and each fresh `init` cost about
    3 CPU-seconds of tracing and loading from the compilation cache even when it did not compile.
    """
    vae, vae_vars, unet, unet_vars = _tiny_vae_unet(text_dim)
    return vae, jax.tree.map(lambda x: x, vae_vars), unet, jax.tree.map(lambda x: x, unet_vars)


@functools.cache
def _tiny_vae_unet(text_dim: int):
    vae = VAE(widths=(16, 16, 16), groups=4, num_res_blocks=1)
    unet = UNet(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=16,
                up_attention_dims=(32, 16), num_heads=2, bottleneck_heads=2, text_dim=text_dim)
    key_vae, key_unet = jax.random.split(jax.random.PRNGKey(0))
    vae_vars = jit_run_once(vae.init, key_vae, np.zeros((1, 1024, 12), np.float32), jax.random.PRNGKey(1))
    ones = np.ones((1,), np.float32)
    unet_vars = jit_run_once(unet.init, key_unet, np.zeros((1, 128, 4), np.float32), np.zeros((1,), np.int32),
                             np.zeros((1, text_dim), np.float32), ones, ones, ones)
    return vae, vae_vars, unet, unet_vars


def openai_conditioning(text_dim: int = TEXT_DIM, patient_features: str = "normalised",
                        prompt_style: str = "ordered") -> ConditioningSpec:
    """An OpenAI-compatible embedder (tests point it at tests.helpers.fake_openai_server) of `text_dim` width, named
    for its width as `tiny_ecg_dataset`'s is: a tiny model of that width fits the dataset's recorded embeddings."""
    name = f"fake-embedding-{text_dim}"
    embedder = EmbedderSpec("openai", name, text_dim, embedder_id=f"openai/{name}/{text_dim}")
    return ConditioningSpec(embedder, prompt_style, patient_features)


def tiny_model_dir(path: str | os.PathLike, text_dim: int = TEXT_DIM, patient_features: str = "normalised",
                   diffusion: DiffusionSpec | None = None) -> Path:
    """Write the tiny VAE and U-Net into model directory `path` (as `train --model-dir` would); returns it."""
    vae, vae_vars, unet, unet_vars = tiny_vae_unet(text_dim)
    model_dirs.write_component(path, "vae", vae, vae_vars, provenance={"source": "test"})
    vae_uid = model_dirs.read_index(path).components["vae"]["uid"]
    model_dirs.write_component(path, "unet", unet, unet_vars, provenance={"source": "test"},
                               conditioning=openai_conditioning(text_dim, patient_features),
                               diffusion=diffusion or DiffusionSpec(), vae_uid=vae_uid)
    return Path(path)


def replace_vae_if_unlocked(path: str | os.PathLike) -> bool:
    """Another process finishing a `train vae --overwrite` into model directory `path` now: replace its VAE (other
    weights, a new uid) if a writer could take the directory's index lock at once; returns whether it did. Called
    from inside a reader's load, it says whether that reader keeps writers out while it loads."""
    import fcntl

    with open(Path(path) / model_dirs._LOCK_FILE) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    vae, vae_vars, _, _ = tiny_vae_unet()
    model_dirs.write_component(path, "vae", vae, jax.tree.map(lambda x: np.asarray(x) + 1.0, vae_vars),
                               provenance={"source": "retrained"}, overwrite=True)
    return True


def replace_unet(path: str | os.PathLike, text_dim: int = TEXT_DIM) -> None:
    """Export a freshly initialised tiny U-Net over model directory `path`'s (as another run's `train unet
    --overwrite` would), keeping its conditioning, diffusion and VAE link: a new uid, for tests of a model replaced
    while a run reads it."""
    _, _, unet, unet_vars = tiny_vae_unet(text_dim)
    index = model_dirs.read_index(path)
    model_dirs.write_component(path, "unet", unet, unet_vars, provenance={"source": "retrained"},
                               conditioning=index.conditioning, diffusion=index.diffusion,
                               vae_uid=index.components["unet"]["vae_uid"], overwrite=True)
