"""Published PyTorch DiffuSETS checkpoints <-> Flax variables.

Public API (filled in per model): `vae_from_torch`, `unet_from_torch`, `clip_from_torch`, their inverses
`*_to_torch`, and `load_state_dict` for `.pth` / `.npz` / `.safetensors` files.
"""

from diffusets_jax.convert.common import load_state_dict
from diffusets_jax.convert.unet import unet_from_torch, unet_to_torch

__all__ = ["load_state_dict", "unet_from_torch", "unet_to_torch"]
