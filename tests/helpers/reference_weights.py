"""Rebuild the published models' state dicts with the parity fill rule (tests/data/PARITY_README.md).

The reference vectors in tests/data/reference_vectors.npz were computed by the PyTorch modules holding
exactly these weights, so converting these state dicts and running the Flax models must reproduce them.
"""

from __future__ import annotations

import json
import zlib
from functools import cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "data"
MODELS = ("vae_encoder", "vae_decoder", "unet", "clip")


@cache
def reference_vectors() -> dict[str, np.ndarray]:
    with np.load(DATA / "reference_vectors.npz") as data:
        return {key: data[key] for key in data.files}


@cache
def _key_spec() -> tuple[str, dict]:
    spec = json.loads((DATA / "reference_state_dict_keys.json").read_text())
    return spec["salt"], spec["state_dict_keys"]


def reference_state_dict(model: str) -> dict[str, np.ndarray]:
    """The state dict of `model` (one of MODELS) filled by the parity rule, as {key: float32/int64 array}."""
    salt, keys = _key_spec()
    table = reference_vectors()["time_embedding_table"]
    out: dict[str, np.ndarray] = {}
    for key, (dtype, shape) in keys[model].items():
        shape = tuple(shape)
        rng = np.random.default_rng([zlib.crc32(salt.encode()), zlib.crc32(key.encode())])
        if "int" in dtype:
            value = np.zeros(shape, np.int64)
        elif key.endswith("time_emb.embeddings"):
            value = table
        elif key.endswith("running_mean"):
            value = rng.uniform(-0.1, 0.1, shape)
        elif key.endswith("running_var"):
            value = 1 + rng.uniform(0.0, 0.5, shape)
        elif key.endswith("logit_scale"):
            value = np.full(shape, np.log(1 / 0.07))
        elif len(shape) >= 2:
            bound = 1 / np.sqrt(np.prod(shape[1:]))
            value = rng.uniform(-bound, bound, shape)
        elif len(shape) == 1 and key.endswith("weight"):
            value = 1 + rng.uniform(-0.2, 0.2, shape)
        else:
            value = rng.uniform(-0.2, 0.2, shape)
        out[key] = value if "int" in dtype else np.asarray(value, np.float32).reshape(shape)
    return out


def reference_vae_state_dict() -> dict[str, dict[str, np.ndarray]]:
    """`vae_model.pth`'s layout: {'encoder': state_dict, 'decoder': state_dict}."""
    return {"encoder": reference_state_dict("vae_encoder"), "decoder": reference_state_dict("vae_decoder")}
