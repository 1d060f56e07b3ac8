"""The published U-Net checkpoint (`unet_all.pth`) <-> Flax `UNet` variables.

The Flax module tree mirrors the PyTorch one, so every leaf maps to one state-dict key:
`downsampling_blocks_3/block/time_emb/fc1/kernel` <-> `downsampling_blocks.3.block.time_emb.fc1.weight`
(the reference's `bottelneck` spelling is kept on the PyTorch side only). The 13 frozen time tables travel
in the `constants` collection. Each block's `block.down` conv exists in the checkpoint but is never called
by the reference: it is ignored on the way in and written as zeros on the way out, so the exported dict
loads into the reference module with `strict=True`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusets_jax.convert.common import (
    KeyMismatch,
    StateDict,
    check_keys,
    check_weight,
    conv_from_torch,
    conv_to_torch,
    convert_unprefixed,
    dense_from_torch,
    dense_to_torch,
    flatten_state_dict,
)
from diffusets_jax.models.unet import UNet

# Built in every reference block, never called in its forward pass.
UNUSED_KEYS = ("block.down",)
_TORCH_BOTTLENECK = "bottelneck"  # sic: the reference's attribute name


def _torch_module_path(flax_path: tuple[str, ...]) -> str:
    parts = []
    for part in flax_path:
        if part == "bottleneck":
            part = _TORCH_BOTTLENECK
        parts.append(re.sub(r"^(downsampling_blocks|upsampling_blocks|output_conv)_(\d+)$", r"\1.\2", part))
    return ".".join(parts)


def _torch_leaf(flax_path: tuple[str, ...]) -> tuple[str, str]:
    """(PyTorch key, layout) for one Flax leaf path; layout is how the array converts."""
    *module, leaf = flax_path
    prefix = _torch_module_path(tuple(module))
    if leaf == "in_proj_kernel":
        return f"{prefix}.in_proj_weight", "dense"
    if leaf == "kernel":
        return f"{prefix}.weight", "conv_transpose" if module[-1] == "up" else "kernel"
    if leaf == "scale":
        return f"{prefix}.weight", "copy"
    return f"{prefix}.{leaf}", "copy"  # bias, in_proj_bias, embeddings


def _from_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "kernel":
        return conv_from_torch(value) if value.ndim == 3 else dense_from_torch(value)
    if layout == "dense":
        return dense_from_torch(value)
    if layout == "conv_transpose":  # PyTorch (in, out, k) -> (k, in, out)
        return np.transpose(value, (2, 0, 1))
    return value


def _to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "kernel":
        return conv_to_torch(value) if value.ndim == 3 else dense_to_torch(value)
    if layout == "dense":
        return dense_to_torch(value)
    if layout == "conv_transpose":  # (k, in, out) -> PyTorch (in, out, k)
        return np.transpose(value, (1, 2, 0))
    return value


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_leaf_paths(value, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def unet_config_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """UNet constructor arguments read off a reference state dict's shapes (heads excepted: not stored)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise KeyMismatch(
                f"U-Net checkpoint: key {key!r} is missing, so the architecture cannot be read from it; is this "
                "a DiffuSETS U-Net state dict (unet_all.pth)?"
            )
        return tuple(np.shape(state_dict[key]))

    levels = 0
    while f"downsampling_blocks.{levels}.down.weight" in state_dict:
        levels += 1
    if levels == 0:
        shape("downsampling_blocks.0.down.weight")  # raises, naming the key
    down = [f"downsampling_blocks.{i}.block" for i in range(levels)]
    up = [f"upsampling_blocks.{j}.block" for j in range(levels)]
    first_conv = shape(f"{down[0]}.pre_shortcut_convs.weight")
    return dict(
        latent_channels=first_conv[1],
        channels=tuple(shape(f"{d}.post_shortcut_convs.weight")[0] for d in down),
        down_attention_dims=tuple(shape(f"{d}.self_attention.to_q.weight")[0] for d in down),
        bottleneck_attention_dim=shape(f"{_TORCH_BOTTLENECK}.self_attention.to_q.weight")[0],
        up_attention_dims=tuple(shape(f"{u}.self_attention.to_q.weight")[0] for u in up),
        kernel_size=first_conv[2],
        text_dim=shape(f"{down[0]}.cross_attention.value_combiner.weight")[1] - 3,
    )


@functools.lru_cache(maxsize=8)
def _abstract_variables(module: UNet) -> dict:
    """Shapes and dtypes of `module`'s variables (tracing the published model takes seconds: cached)."""
    batch, length = 1, 2 ** len(module.channels)
    f32 = jnp.float32
    return jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((batch, length, module.latent_channels), f32),
        jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch, module.text_dim), f32),
        *(jax.ShapeDtypeStruct((batch,), f32),) * 3,
    )


def unet_from_torch(
    state_dict: Mapping[str, np.ndarray], *, num_heads: int = 8, bottleneck_heads: int = 4, **module_kwargs: Any
) -> tuple[UNet, dict]:
    """A reference U-Net state dict -> (`UNet`, variables) ready for `module.apply(variables, ...)`.

    The architecture (levels, widths, kernel size, text dim) is read from the shapes; head counts are not
    stored in checkpoints (published: 8 and 4). `module_kwargs` go to `UNet` (e.g. `dtype=jnp.bfloat16`).
    Variables are float32 numpy-backed `{'params': ..., 'constants': ...}`; the checkpoint's time tables are
    copied bit-for-bit. Raises ValueError naming missing/unexpected keys or a key with the wrong shape. A prefix
    common to every key that leaves exactly the U-Net's keys (a Lightning `.ckpt`'s `model.`) is dropped
    (`common.convert_unprefixed`).
    """
    return convert_unprefixed(flatten_state_dict(state_dict), functools.partial(
        _unet_from_torch, num_heads=num_heads, bottleneck_heads=bottleneck_heads, **module_kwargs))


def _unet_from_torch(state_dict: StateDict, *, num_heads: int, bottleneck_heads: int,
                     **module_kwargs: Any) -> tuple[UNet, dict]:
    config = unet_config_from_state_dict(state_dict)
    for name, heads in (("num_heads", num_heads), ("bottleneck_heads", bottleneck_heads)):
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:  # 0 divided the widths below
            raise ValueError(f"{name} must be a whole number >= 1 (the published U-Net has 8 and 4), got {heads!r}")
    # Head counts are not in the checkpoint: say so here, not as an attention error deep in the module's init.
    uneven = sorted({w for w in (*config["down_attention_dims"], *config["up_attention_dims"]) if w % num_heads}
                    | ({config["bottleneck_attention_dim"]} if config["bottleneck_attention_dim"] % bottleneck_heads
                       else set()))
    if uneven:
        raise ValueError(f"U-Net checkpoint: its attention widths {', '.join(map(str, uneven))} do not split into "
                         f"{num_heads} heads ({bottleneck_heads} at the bottleneck), which a checkpoint does not record "
                         "(the published U-Net has 8 and 4): convert it from Python with unet_from_torch("
                         "load_state_dict(path), num_heads=H, bottleneck_heads=B), H and B its training's head counts")
    module = UNet(**config, num_heads=num_heads, bottleneck_heads=bottleneck_heads, **module_kwargs)
    abstract = _abstract_variables(module)
    flat: dict[tuple[str, ...], Any] = {}
    keys: dict[str, tuple[tuple[str, ...], str]] = {}
    for collection in ("params", "constants"):
        for path, leaf in _leaf_paths(abstract[collection]).items():
            key, layout = _torch_leaf(path)
            keys[key] = ((collection,) + path, layout)
            flat[(collection,) + path] = leaf
    check_keys(state_dict, keys, UNUSED_KEYS, what="U-Net checkpoint")
    for key, (path, layout) in keys.items():
        check_weight("U-Net checkpoint", key, state_dict[key], flat[path].shape,
                     functools.partial(_to_torch_layout, layout=layout))
        flat[path] = _from_torch_layout(np.asarray(state_dict[key], dtype=np.float32), layout)
    return module, _nest(flat)


def unet_to_torch(variables: Mapping[str, Any]) -> StateDict:
    """Flax `UNet` variables (`params` + `constants`) -> the reference state dict {key: float32 ndarray}.

    All 713 entries of the published layout, including the time tables and the reference's never-called
    `block.down` convs (written as zeros).
    """
    for collection in ("params", "constants"):
        if collection not in variables:
            raise ValueError(
                f"unet_to_torch: variables have no {collection!r} collection; pass the full variables "
                "{'params': ..., 'constants': ...} that UNet.init returns"
            )
    out: StateDict = {}
    for collection in ("params", "constants"):
        for path, leaf in _leaf_paths(variables[collection]).items():
            key, layout = _torch_leaf(path)
            out[key] = _to_torch_layout(np.asarray(jax.device_get(leaf), dtype=np.float32), layout)
    for key in [k for k in out if k.endswith(".block.post_shortcut_convs.weight")]:
        prefix = key.removesuffix("post_shortcut_convs.weight")
        width = out[key].shape[0]
        out[f"{prefix}down.weight"] = np.zeros((width, width, 3), np.float32)
        out[f"{prefix}down.bias"] = np.zeros((width,), np.float32)
    return out
