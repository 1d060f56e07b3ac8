"""Published PyTorch DiffuSETS checkpoints <-> Flax variables.

`vae_from_torch`, `unet_from_torch`, `clip_from_torch` take a {PyTorch key: numpy array} state dict and return
`(module, variables)` ready for `module.apply(variables, ...)`; their inverses `*_to_torch` go back.
`load_state_dict` reads `.pth` (with PyTorch), `.npz` and `.safetensors` files.
"""

from diffusets_jax.convert.clip import clip_from_torch, clip_to_torch
from diffusets_jax.convert.common import load_state_dict
from diffusets_jax.convert.unet import unet_from_torch, unet_to_torch
from diffusets_jax.convert.vae import vae_from_torch, vae_to_torch

__all__ = [
    "clip_from_torch",
    "clip_to_torch",
    "load_state_dict",
    "unet_from_torch",
    "unet_to_torch",
    "vae_from_torch",
    "vae_to_torch",
]
