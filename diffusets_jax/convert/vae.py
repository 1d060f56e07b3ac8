"""Published PyTorch VAE (`vae_model.pth`) <-> Flax `diffusets_jax.models.vae.VAE` variables.

The reference encoder and decoder are `nn.Sequential`s, so their keys are layer indices (`7.conv_1.weight`).
`_layout` lists, in that index order, which Flax layer each index is; both directions walk it, so the
mapping is written once and follows any `VAE` configuration (widths, number of residual blocks).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

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
    get_at_path,
    set_at_path,
    shape_at_path,
)
from diffusets_jax.ecg.leads import REFERENCE_TO_STANDARD
from diffusets_jax.ecg.shapes import ECG_LENGTH
from diffusets_jax.models.vae import VAE

# (kind, flax name) per Sequential index; kind is conv | res | res_skip | attn | norm | silu | upsample.
Layout = list[tuple[str, str]]


def _layout(vae: VAE) -> tuple[Layout, Layout]:
    """The reference `nn.Sequential` order of the encoder and the decoder for this configuration."""
    widths, blocks = vae.widths, vae.num_res_blocks
    encoder: Layout = [("conv", "conv_in")]
    channels = widths[0]
    for level, width in enumerate((*widths, widths[-1])):
        for block in range(blocks):
            encoder.append(("res_skip" if channels != width else "res", f"down_{level}_res_{block}"))
            channels = width
        if level < len(widths):
            encoder.append(("conv", f"down_{level}_downsample"))
    encoder += [("res", "mid_res_0"), ("attn", "mid_attn"), ("res", "mid_res_1"), ("norm", "norm_out"),
                ("silu", ""), ("conv", "conv_out"), ("conv", "conv_moments")]

    decoder: Layout = [("conv", "conv_latent"), ("conv", "conv_in"), ("res", "mid_res_0"), ("attn", "mid_attn"),
                       ("res", "mid_res_1")]
    level_widths = (widths[-1], *reversed(widths))
    channels = widths[-1]
    for level, width in enumerate(level_widths):
        for block in range(blocks + 1):
            decoder.append(("res_skip" if channels != width else "res", f"up_{level}_res_{block}"))
            channels = width
        if level < len(level_widths) - 1:
            decoder += [("upsample", ""), ("conv", f"up_{level}_upsample")]
    decoder += [("norm", "norm_out"), ("silu", ""), ("conv", "conv_out")]
    return encoder, decoder


# Within a residual block: reference submodule -> (Flax submodule, is a conv).
_RES_PARTS = {"groupnorm_1": ("norm_1", False), "conv_1": ("conv_1", True), "groupnorm_2": ("norm_2", False),
              "conv_2": ("conv_2", True), "residual_layer": ("skip", True)}
# The attention blocks' GroupNorm is built by the reference but never applied. (The trailing dot keeps the
# residual blocks' groupnorm_1 / groupnorm_2 out of the pattern.)
_UNUSED_ATTENTION_PARTS = ("groupnorm.",)


def _torch_entries(kind: str) -> list[tuple[str, str, str]]:
    """(torch suffix, flax path inside the layer, layout) for one layer; layout is conv | dense | vector."""
    if kind == "conv":
        return [("weight", "kernel", "conv"), ("bias", "bias", "vector")]
    if kind == "norm":
        return [("weight", "scale", "vector"), ("bias", "bias", "vector")]
    if kind in ("res", "res_skip"):
        entries = []
        for part, (flax_part, is_conv) in _RES_PARTS.items():
            if part == "residual_layer" and kind == "res":
                continue
            if is_conv:
                entries += [(f"{part}.weight", f"{flax_part}/kernel", "conv"), (f"{part}.bias", f"{flax_part}/bias", "vector")]
            else:
                entries += [(f"{part}.weight", f"{flax_part}/scale", "vector"), (f"{part}.bias", f"{flax_part}/bias", "vector")]
        return entries
    if kind == "attn":
        return [(f"attention.{proj}.{torch_name}", f"{proj}/{flax_name}", layout)
                for proj in ("in_proj", "out_proj")
                for torch_name, flax_name, layout in (("weight", "kernel", "dense"), ("bias", "bias", "vector"))]
    return []  # silu, upsample: no parameters


def _mapping(layout: Layout) -> list[tuple[str, str, str]]:
    """(torch key, flax '/'-path, layout) for every parameter of one half, in Sequential order."""
    return [(f"{index}.{torch_suffix}", f"{name}/{flax_path}", kind_layout)
            for index, (kind, name) in enumerate(layout)
            for torch_suffix, flax_path, kind_layout in _torch_entries(kind)]


def _unused_keys(layout: Layout, width_of: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The attention blocks' never-applied GroupNorm, at PyTorch's default init (so exports load strictly)."""
    out = {}
    for index, (kind, name) in enumerate(layout):
        if kind == "attn":
            out[f"{index}.groupnorm.weight"] = np.ones(width_of[name], np.float32)
            out[f"{index}.groupnorm.bias"] = np.zeros(width_of[name], np.float32)
    return out


def _from_torch(weight: np.ndarray, layout: str) -> np.ndarray:
    return {"conv": conv_from_torch, "dense": dense_from_torch}.get(layout, np.asarray)(weight)


def _to_torch(value: np.ndarray, layout: str) -> np.ndarray:
    return {"conv": conv_to_torch, "dense": dense_to_torch}.get(layout, np.asarray)(value)


def _split_halves(state_dict: Mapping) -> tuple[StateDict, StateDict]:
    flat = flatten_state_dict(state_dict)
    halves: dict[str, StateDict] = {"encoder": {}, "decoder": {}}
    stray = []
    for key, value in flat.items():
        half, _, rest = key.partition(".")
        if half in halves and rest:
            halves[half][rest] = value
        else:
            stray.append(key)
    if stray:
        raise KeyMismatch(
            "VAE checkpoint: every key must start with 'encoder.' or 'decoder.' (vae_model.pth holds "
            f"{{'encoder': state_dict, 'decoder': state_dict}}); unexpected keys: {', '.join(sorted(stray)[:20])}"
        )
    for half, sd in halves.items():
        if not sd:
            raise KeyMismatch(f"VAE checkpoint has no '{half}.' keys: is this vae_model.pth?")
    return halves["encoder"], halves["decoder"]


def _infer_config(encoder: StateDict, decoder: StateDict, groups: int) -> VAE:
    """Read widths, channel counts and residual blocks per level from the encoder's shapes.

    Walking the encoder's Sequential from index 1: residual blocks (`conv_1`) and plain 3-D conv weights (the
    downsampling convs, whose output width is the level's width) alternate until the attention block.
    """
    if "0.weight" not in encoder or "0.weight" not in decoder:
        raise KeyMismatch("VAE checkpoint is missing 'encoder.0.weight' or 'decoder.0.weight'; is this vae_model.pth?")
    widths: list[int] = []
    blocks = None
    index = 1
    while f"{index}.conv_1.weight" in encoder or f"{index}.weight" in encoder:
        if f"{index}.weight" in encoder:
            widths.append(int(encoder[f"{index}.weight"].shape[0]))
            blocks = index - 1 if blocks is None else blocks
        index += 1
    if not widths or blocks is None:
        raise KeyMismatch("VAE checkpoint: found no downsampling convs in the encoder; is this the DiffuSETS VAE?")
    # The group count is not in the checkpoint: say so here, not as a GroupNorm error deep in the module's init.
    uneven = sorted({w for w in widths if w % groups})
    if uneven:
        raise ValueError(f"VAE checkpoint: its widths {', '.join(map(str, uneven))} do not split into {groups} GroupNorm "
                         "groups, which a checkpoint does not record (the published VAE has 32): convert it from "
                         "Python with vae_from_torch(load_state_dict(path), groups=G), G its training's group count")
    return VAE(in_channels=int(encoder["0.weight"].shape[1]), latent_channels=int(decoder["0.weight"].shape[0]),
               widths=tuple(widths), groups=groups, num_res_blocks=int(blocks))


def _abstract_params(vae: VAE) -> dict:
    """The shapes of `vae`'s parameters, traced without computing them."""
    x = jax.ShapeDtypeStruct((1, ECG_LENGTH, vae.in_channels), jnp.float32)
    return jax.eval_shape(vae.init, jax.random.key(0), x, jax.random.key(1))["params"]


def vae_from_torch(state_dict: Mapping, groups: int = 32) -> tuple[VAE, dict]:
    """Reference VAE state dict -> `(VAE module, variables)` ready for `vae.apply(variables, ...)`.

    `state_dict` is `{'encoder': sd, 'decoder': sd}` (as `torch.load('vae_model.pth')` returns) or one flat
    dict with `encoder.` / `decoder.` key prefixes (as `load_state_dict` returns). Widths, channel counts and
    blocks per level are read from the shapes; `groups` (GroupNorm groups) is not stored in a checkpoint.
    The ECG-facing convs are permuted so the converted model takes and returns the standard lead order.
    Raises ValueError naming every missing or unexpected key. A prefix common to every key that leaves exactly the
    VAE's keys (a Lightning `.ckpt`'s `model.`) is dropped (`common.convert_unprefixed`).
    """
    return convert_unprefixed(flatten_state_dict(state_dict), functools.partial(_vae_from_torch, groups=groups))


def _vae_from_torch(state_dict: StateDict, groups: int) -> tuple[VAE, dict]:
    encoder_sd, decoder_sd = _split_halves(state_dict)
    vae = _infer_config(encoder_sd, decoder_sd, groups)
    abstract = _abstract_params(vae)
    params: dict = {"encoder": {}, "decoder": {}}
    for half, sd, layout in zip(("encoder", "decoder"), (encoder_sd, decoder_sd), _layout(vae), strict=True):
        mapping = _mapping(layout)
        check_keys(sd, [key for key, _, _ in mapping], _UNUSED_ATTENTION_PARTS, what=f"VAE {half} checkpoint")
        for key, flax_path, kind in mapping:
            check_weight(f"VAE {half} checkpoint", key, sd[key], shape_at_path(abstract[half], flax_path),
                         functools.partial(_to_torch, layout=kind))
            set_at_path(params[half], flax_path, np.asarray(_from_torch(sd[key], kind), np.float32))
    _permute_leads(params, vae, to_standard=True)
    return vae, {"params": params}


def vae_to_torch(variables: Mapping, groups: int = 32) -> StateDict:
    """Flax VAE variables -> flat `{'encoder.0.weight': array, ...}` in the reference's layout and lead order.

    Split on the first '.' to rebuild vae_model.pth's `{'encoder': sd, 'decoder': sd}`. The attention blocks'
    unused GroupNorm is written at PyTorch's default init so the result loads with `strict=True`.
    """
    params = variables["params"] if "params" in variables else variables
    vae = _config_from_flax(params, groups)
    params = {half: _copy_tree(params[half]) for half in ("encoder", "decoder")}
    _permute_leads(params, vae, to_standard=False)
    out: StateDict = {}
    for half, layout in zip(("encoder", "decoder"), _layout(vae), strict=True):
        for key, flax_path, kind in _mapping(layout):
            out[f"{half}.{key}"] = np.asarray(_to_torch(get_at_path(params[half], flax_path), kind), np.float32)
        widths = {name: get_at_path(params[half], f"{name}/out_proj/bias").shape[0] for kind, name in layout if kind == "attn"}
        out.update({f"{half}.{key}": value for key, value in _unused_keys(layout, widths).items()})
    return out


def _copy_tree(tree: Mapping) -> dict:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else np.array(v) for k, v in tree.items()}


def _config_from_flax(params: Mapping, groups: int) -> VAE:
    encoder, decoder = params["encoder"], params["decoder"]
    widths = []
    while f"down_{len(widths)}_downsample" in encoder:
        widths.append(int(np.shape(encoder[f"down_{len(widths)}_downsample"]["kernel"])[-1]))
    blocks = sum(1 for name in encoder if name.startswith("down_0_res_"))
    return VAE(in_channels=int(np.shape(decoder["conv_out"]["kernel"])[-1]),
               latent_channels=int(np.shape(decoder["conv_latent"]["kernel"])[-1]),
               widths=tuple(widths), groups=groups, num_res_blocks=blocks)


def _permute_leads(params: dict, vae: VAE, to_standard: bool) -> None:
    """Reorder the encoder's input and the decoder's output channels between reference and standard lead order.

    Only 12-channel models are ECGs in a lead order; other channel counts are left alone.
    """
    if vae.in_channels != len(REFERENCE_TO_STANDARD):
        return
    order = np.asarray(REFERENCE_TO_STANDARD)
    if not to_standard:
        order = np.argsort(order)
    conv_in = params["encoder"]["conv_in"]
    conv_in["kernel"] = conv_in["kernel"][:, order, :]  # (k, in, out): input channels
    conv_out = params["decoder"]["conv_out"]
    conv_out["kernel"] = conv_out["kernel"][:, :, order]  # output channels
    conv_out["bias"] = conv_out["bias"][order]
