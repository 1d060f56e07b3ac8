"""Published PyTorch CLIP (`clip_model.pth`) <-> Flax `diffusets_jax.models.clip.CLIP` variables.

Reference keys: `resnet.*` (Net1D: `first_conv.conv`, `first_bn`, `stage_list.{s}.block_list.{b}.{bn1,conv1.conv,
bn2,conv2.conv,bn3,conv3.conv,se_fc1,se_fc2}`), `ecg_projector`, `text_projector.linear_{1,2}`, `logit_scale`.
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
from diffusets_jax.models.clip import CLIP

# The reference's first block builds bn1 but never applies it (its input is already normalised by the stem).
_UNUSED_FIRST_BN = "resnet.stage_list.0.block_list.0.bn1."

# One entry per tensor: (torch key, collection, flax '/'-path, layout); layout is conv | dense | vector | scalar.
Entry = tuple[str, str, str, str]


def _conv_entries(torch_prefix: str, flax_prefix: str) -> list[Entry]:
    return [(f"{torch_prefix}.weight", "params", f"{flax_prefix}/kernel", "conv"),
            (f"{torch_prefix}.bias", "params", f"{flax_prefix}/bias", "vector")]


def _dense_entries(torch_prefix: str, flax_prefix: str) -> list[Entry]:
    return [(f"{torch_prefix}.weight", "params", f"{flax_prefix}/kernel", "dense"),
            (f"{torch_prefix}.bias", "params", f"{flax_prefix}/bias", "vector")]


def _bn_entries(torch_prefix: str, flax_prefix: str) -> list[Entry]:
    return [(f"{torch_prefix}.weight", "params", f"{flax_prefix}/scale", "vector"),
            (f"{torch_prefix}.bias", "params", f"{flax_prefix}/bias", "vector"),
            (f"{torch_prefix}.running_mean", "batch_stats", f"{flax_prefix}/mean", "vector"),
            (f"{torch_prefix}.running_var", "batch_stats", f"{flax_prefix}/var", "vector")]


def _mapping(clip: CLIP) -> list[Entry]:
    """Every tensor of this CLIP configuration, reference key <-> Flax location."""
    entries = [("logit_scale", "params", "logit_scale", "scalar")]
    entries += _conv_entries("resnet.first_conv.conv", "ecg_encoder/first_conv")
    entries += _bn_entries("resnet.first_bn", "ecg_encoder/first_bn")
    for stage, blocks in enumerate(clip.blocks_per_stage):
        for block in range(blocks):
            torch_block, flax_block = f"resnet.stage_list.{stage}.block_list.{block}", f"ecg_encoder/stage_{stage}_block_{block}"
            for i in (1, 2, 3):
                if not (stage == 0 and block == 0 and i == 1):
                    entries += _bn_entries(f"{torch_block}.bn{i}", f"{flax_block}/bn{i}")
                entries += _conv_entries(f"{torch_block}.conv{i}.conv", f"{flax_block}/conv{i}")
            entries += _dense_entries(f"{torch_block}.se_fc1", f"{flax_block}/se_fc1")
            entries += _dense_entries(f"{torch_block}.se_fc2", f"{flax_block}/se_fc2")
    entries += _dense_entries("ecg_projector", "ecg_projector")
    entries += _dense_entries("text_projector.linear_1", "text_projector/linear_1")
    entries += _dense_entries("text_projector.linear_2", "text_projector/linear_2")
    return entries


def _infer_config(sd: StateDict) -> CLIP:
    """Read the tower's and heads' sizes from the tensor shapes."""
    needed = ["resnet.first_conv.conv.weight", "ecg_projector.weight", "text_projector.linear_1.weight",
              "resnet.stage_list.0.block_list.0.conv2.conv.weight"]
    missing = [key for key in needed if key not in sd]
    if missing:
        raise KeyMismatch(f"CLIP checkpoint is missing {', '.join(missing)}; is this clip_model.pth?")
    first = sd["resnet.first_conv.conv.weight"]  # (base_filters, in_channels, kernel)
    filters, blocks_per_stage = [], []
    while f"resnet.stage_list.{len(filters)}.block_list.0.conv3.conv.weight" in sd:
        stage = len(filters)
        filters.append(int(sd[f"resnet.stage_list.{stage}.block_list.0.conv3.conv.weight"].shape[0]))
        blocks = 0
        while f"resnet.stage_list.{stage}.block_list.{blocks}.conv3.conv.weight" in sd:
            blocks += 1
        blocks_per_stage.append(blocks)
    text_hidden, text_dim = sd["text_projector.linear_1.weight"].shape
    return CLIP(
        in_channels=int(first.shape[1]), base_filters=int(first.shape[0]), filters=tuple(filters),
        blocks_per_stage=tuple(blocks_per_stage), kernel_size=int(first.shape[2]),
        group_width=int(sd["resnet.stage_list.0.block_list.0.conv2.conv.weight"].shape[1]),
        text_dim=int(text_dim), text_hidden_dim=int(text_hidden), embed_dim=int(sd["ecg_projector.weight"].shape[0]),
    )


def _abstract_variables(clip: CLIP) -> dict:
    """The shapes of `clip`'s variables (`params`, `batch_stats`), traced without computing them."""
    ecg = jax.ShapeDtypeStruct((2, ECG_LENGTH, clip.in_channels), jnp.float32)
    text = jax.ShapeDtypeStruct((2, clip.text_dim), jnp.float32)
    return jax.eval_shape(functools.partial(clip.init, train=False), jax.random.key(0), ecg, text)


def clip_from_torch(state_dict: Mapping) -> tuple[CLIP, dict]:
    """Reference CLIP state dict -> `(CLIP module, {'params': ..., 'batch_stats': ...})`.

    Sizes (input leads, Net1D widths and depths, kernel, group width, text dim, projection dim) come from the
    shapes. Net1D's first conv is permuted so the converted model takes standard lead order ECGs. Raises
    ValueError naming every missing or unexpected key. A prefix common to every key that leaves exactly the CLIP's
    keys (a Lightning `.ckpt`'s `model.`) is dropped (`common.convert_unprefixed`).
    """
    return convert_unprefixed(flatten_state_dict(state_dict), _clip_from_torch)


def _clip_from_torch(sd: StateDict) -> tuple[CLIP, dict]:
    clip = _infer_config(sd)
    mapping = _mapping(clip)
    check_keys(sd, [key for key, _, _, _ in mapping], (_UNUSED_FIRST_BN,), what="CLIP checkpoint")
    variables: dict = {"params": {}, "batch_stats": {}}
    convert = {"conv": conv_from_torch, "dense": dense_from_torch}
    back = {"conv": conv_to_torch, "dense": dense_to_torch}
    abstract = _abstract_variables(clip)
    for key, collection, path, layout in mapping:
        check_weight("CLIP checkpoint", key, sd[key], shape_at_path(abstract[collection], path),
                     back.get(layout, np.asarray))
        set_at_path(variables[collection], path, np.asarray(convert.get(layout, np.asarray)(sd[key]), np.float32))
    if clip.in_channels == len(REFERENCE_TO_STANDARD):
        stem = variables["params"]["ecg_encoder"]["first_conv"]
        stem["kernel"] = stem["kernel"][:, list(REFERENCE_TO_STANDARD), :]
    return clip, variables


def clip_to_torch(variables: Mapping) -> StateDict:
    """Flax CLIP variables -> `{PyTorch key: array}` in the reference's layout and lead order.

    The first block's unused bn1 is written at PyTorch's default init (and every `num_batches_tracked` as 0)
    so the result loads into the reference module with `strict=True`.
    """
    clip = _config_from_flax(variables)
    out: StateDict = {}
    convert = {"conv": conv_to_torch, "dense": dense_to_torch}
    for key, collection, path, layout in _mapping(clip):
        value = get_at_path(variables[collection], path)
        if path == "ecg_encoder/first_conv/kernel" and clip.in_channels == len(REFERENCE_TO_STANDARD):
            value = value[:, list(np.argsort(REFERENCE_TO_STANDARD)), :]
        out[key] = np.asarray(convert.get(layout, np.asarray)(value), np.float32)
        if key.endswith("running_var"):
            out[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
    width = clip.base_filters  # bn1 of the first block normalises the stem's output
    out.update({
        f"{_UNUSED_FIRST_BN}weight": np.ones(width, np.float32),
        f"{_UNUSED_FIRST_BN}bias": np.zeros(width, np.float32),
        f"{_UNUSED_FIRST_BN}running_mean": np.zeros(width, np.float32),
        f"{_UNUSED_FIRST_BN}running_var": np.ones(width, np.float32),
        f"{_UNUSED_FIRST_BN}num_batches_tracked": np.zeros((), np.int64),
    })
    return out


def _config_from_flax(variables: Mapping) -> CLIP:
    params = variables["params"]
    tower = params["ecg_encoder"]
    first = np.shape(tower["first_conv"]["kernel"])  # (kernel, in, base)
    filters, blocks_per_stage = [], []
    while f"stage_{len(filters)}_block_0" in tower:
        stage = len(filters)
        filters.append(int(np.shape(tower[f"stage_{stage}_block_0"]["conv3"]["kernel"])[-1]))
        blocks_per_stage.append(sum(1 for name in tower if name.startswith(f"stage_{stage}_block_")))
    text_dim, text_hidden = np.shape(params["text_projector"]["linear_1"]["kernel"])
    return CLIP(
        in_channels=int(first[1]), base_filters=int(first[2]), filters=tuple(filters),
        blocks_per_stage=tuple(blocks_per_stage), kernel_size=int(first[0]),
        group_width=int(np.shape(tower["stage_0_block_0"]["conv2"]["kernel"])[1]),
        text_dim=int(text_dim), text_hidden_dim=int(text_hidden),
        embed_dim=int(np.shape(params["ecg_projector"]["kernel"])[-1]),
    )
