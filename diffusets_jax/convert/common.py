"""Shared pieces of checkpoint conversion: reading state-dict files, key checks, layout changes.

PyTorch layouts: Conv1d weight (out, in, k); ConvTranspose1d weight (in, out, k); Linear weight (out, in).
Flax layouts: Conv kernel (k, in, out); Dense kernel (in, out).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import numpy as np

StateDict = dict[str, np.ndarray]
T = TypeVar("T")


class KeyMismatch(ValueError):
    """A checkpoint whose keys are not the architecture's: keys missing (those the architecture is read from, or
    any other) or unexpected. A ValueError: one line, exit code 2."""


def flatten_state_dict(tree: Mapping, prefix: str = "") -> StateDict:
    """Nested mappings (e.g. `{'encoder': sd, 'decoder': sd}`) -> one flat dict with '.'-joined keys."""
    flat: StateDict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_state_dict(value, name + "."))
        else:
            flat[name] = _to_numpy(value)
    return flat


def _to_numpy(value) -> np.ndarray:
    if not hasattr(value, "detach"):
        return np.asarray(value)
    tensor = value.detach().cpu()
    try:
        return np.asarray(tensor.numpy())
    except TypeError:  # bfloat16 (a half-precision fine-tune) has no numpy dtype; float32 holds it exactly
        return np.asarray(tensor.float().numpy())


# Training scripts save `{'state_dict': sd, 'epoch': ..}` or `{'model': sd, 'optimizer': ..}` rather than the bare
# state dict; the first of these keys holding a mapping is the model's.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# `nn.DataParallel`/DDP prefix every key with `module.`, `torch.compile` with `_orig_mod.`; no DiffuSETS parameter
# path has a component of either name, so dropping them everywhere (also after `encoder.`) cannot mix two weights.
_WRAPPER_COMPONENTS = frozenset({"module", "_orig_mod"})


def _unwrap(obj: Mapping) -> Mapping:
    while True:
        inner = next((obj[key] for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            return obj
        obj = inner


def _drop_wrapper_prefixes(flat: StateDict, path: str) -> StateDict:
    out: StateDict = {}
    for key, value in flat.items():
        name = ".".join(part for part in key.split(".") if part not in _WRAPPER_COMPONENTS)
        if name in out:
            raise ValueError(f"{path!r} holds {name!r} twice (with and without a `module.`/`_orig_mod.` prefix): "
                             "save the bare model's state_dict()")
        out[name] = value
    return out


def convert_unprefixed(state_dict: Mapping, convert: Callable[[StateDict], T]) -> T:
    """`convert(state_dict)` (a flat state dict); where its keys do not match the architecture (`KeyMismatch`) and
    all of them start with the same components, `convert` of the keys without the shortest such prefix that leaves
    exactly the architecture's keys.

    The rule `load_state_dict` applies to `module.`/`_orig_mod.`, for the prefixes no list can name: a PyTorch
    Lightning `.ckpt` keeps the network under the LightningModule attribute holding it (`model.`, `net.`, `unet.`).
    Such a prefix is dropped only where what is left is exactly the expected key set, so it cannot make another
    network's checkpoint convert; where none is, the mismatch is reported with the keys as stored."""
    try:
        return convert(state_dict)
    except KeyMismatch as mismatch:
        for stripped in _without_common_prefixes(state_dict):
            try:
                return convert(stripped)
            except KeyMismatch:
                continue
        raise mismatch


def _without_common_prefixes(state_dict: Mapping) -> Iterator[StateDict]:
    """`state_dict` without its first component, then its first two, ..., while every key has them in common and
    something after them."""
    parts = {key: key.split(".") for key in state_dict}
    if not parts:
        return
    depth = 1
    while all(len(p) > depth for p in parts.values()) and len({tuple(p[:depth]) for p in parts.values()}) == 1:
        yield {".".join(p[depth:]): state_dict[key] for key, p in parts.items()}
        depth += 1


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file into a flat {PyTorch key: numpy array} dict.

    `.pth`/`.pt`/`.ckpt` need PyTorch (read with `weights_only=True`); `.npz` and `.safetensors` dumps of the
    same keys need nothing extra. Nested dicts such as `vae_model.pth`'s `{'encoder': ..., 'decoder': ...}`
    come back with `encoder.` / `decoder.` key prefixes. A training wrapper (`{'state_dict': sd, 'epoch': ..}`,
    `{'model': sd, ..}`) is opened to the state dict, and the `module.` (DataParallel/DDP) and `_orig_mod.`
    (`torch.compile`) key prefixes are dropped (any other prefix common to every key, a Lightning `.ckpt`'s
    `model.`, by the converters: `convert_unprefixed`). bfloat16 tensors come back as float32.
    """
    return _drop_wrapper_prefixes(_read_state_dict(os.fspath(path)), os.fspath(path))


def _read_state_dict(path: str) -> StateDict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory: give the checkpoint file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        if not zipfile.is_zipfile(path):  # numpy would guess a pickle and say so, which helps nobody
            raise ValueError(f"{path!r} is not a .npz archive (not a zip file): is the file complete? Write it again "
                             "with numpy.savez")
        objects = None
        try:
            with np.load(path, allow_pickle=False) as data:
                out = {}
                for key in data.files:
                    try:
                        out[key] = np.asarray(data[key])
                    except ValueError as err:  # numpy's own line names neither the key nor what to do
                        if "allow_pickle" not in str(err):
                            raise
                        objects = key
                        break
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            raise ValueError(f"{path!r} is not a readable .npz ({type(err).__name__}: {err}): is the file complete? "
                             "Write it again with numpy.savez") from None
        if objects is not None:  # complete, but numpy.savez pickled a dict (vae_model.pth's halves) into it
            raise ValueError(f"{path!r}: {objects!r} holds Python objects, not an array (numpy.savez of a nested "
                             "dict such as vae_model.pth's {'encoder': sd, 'decoder': sd}), which convert does not "
                             "unpickle: save one array per flat key, numpy.savez(path, **{f'{half}.{k}': v.numpy() "
                             "for half, sd in checkpoint.items() for k, v in sd.items()})")
        return out
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
            raise ValueError(f"{path!r} is not a readable .safetensors file ({type(err).__name__}: {err}): is the "
                             "file complete?") from None
    if suffix in (".pth", ".pt", ".ckpt", ".bin"):
        try:
            import torch
        except ImportError as err:
            raise ImportError(
                f"reading {path!r} needs PyTorch: `pip install torch` (the CPU build is enough), or dump the "
                "state dict once to .npz/.safetensors where PyTorch is available: "
                "numpy.savez('x.npz', **{k: v.numpy() for k, v in sd.items()})"
            ) from err
        is_zip = zipfile.is_zipfile(path)
        with open(path, "rb") as handle:
            # torch.save(..., _use_new_zipfile_serialization=False) and torch < 1.6 write a bare pickle
            legacy = not is_zip and handle.read(1) == b"\x80"
        if not (is_zip or legacy):
            raise ValueError(f"{path!r} is not a PyTorch checkpoint (neither a zip archive nor a legacy pickle): is "
                             "the download complete?")
        if is_zip:
            _check_zip_crcs(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
            if "Weights only load failed" in str(err):  # complete, but pickles objects (argparse args, numpy) too
                raise ValueError(
                    f"{path!r} holds Python objects besides tensors ({found.group(1) if found else 'not allowed'}), "
                    "which convert does not unpickle: where you trust the file, save the weights alone, "
                    "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth') (the key holding "
                    "the model's state dict)") from None
            raise ValueError(f"{path!r} could not be read by PyTorch ({type(err).__name__}: {err}): is the download "
                             "complete?") from None
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a state dict (a mapping of tensors)")
        return flatten_state_dict(_unwrap(obj))
    raise ValueError(f"{path!r}: unknown checkpoint format {suffix!r}; expected .pth, .npz or .safetensors")


def _check_zip_crcs(path: str) -> None:
    """PyTorch's reader does not check the CRC-32 that torch.save stores: a file damaged in place converted into a
    model with wrong weights. Members stored without one (CRC 0, `compute_crc32=False`) cannot be checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC:
                    with archive.open(info) as member:  # zipfile raises BadZipFile at the end on a mismatch
                        while member.read(1 << 24):
                            pass
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(f"{path!r} is damaged ({type(err).__name__}: {err}): download it again") from None


def check_keys(
    state_dict: Mapping[str, np.ndarray], expected: Iterable[str], ignored_prefixes_or_keys: Iterable[str] = (),
    what: str = "checkpoint",
) -> None:
    """Raise a ValueError naming every missing or unexpected key.

    `ignored_prefixes_or_keys` are parameters the reference builds but never uses (see the parity README):
    a key matching one exactly, or containing it as a dotted component sequence, is neither required nor
    unexpected. BatchNorm `num_batches_tracked` counters are always ignored.
    """
    ignored = tuple(ignored_prefixes_or_keys)

    def is_ignored(key: str) -> bool:
        return key.endswith("num_batches_tracked") or any(
            key == pattern or key.startswith(pattern) or f".{pattern}" in f".{key}" for pattern in ignored
        )

    expected = {k for k in expected if not is_ignored(k)}
    present = {k for k in state_dict if not is_ignored(k)}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else "")
            )
        raise KeyMismatch(f"{what} does not match the expected architecture: " + "; ".join(parts))


def conv_from_torch(weight: np.ndarray) -> np.ndarray:
    """Conv1d weight (out, in, k) -> Flax Conv kernel (k, in, out)."""
    return np.transpose(np.asarray(weight), (2, 1, 0))


def conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax Conv kernel (k, in, out) -> Conv1d weight (out, in, k)."""
    return np.transpose(np.asarray(kernel), (2, 1, 0))


def dense_from_torch(weight: np.ndarray) -> np.ndarray:
    """Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.transpose(np.asarray(weight))


def dense_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Flax Dense kernel (in, out) -> Linear weight (out, in)."""
    return np.transpose(np.asarray(kernel))


def set_at_path(tree: dict, path: str, value: np.ndarray) -> None:
    """`tree['a']['b'] = value` for path 'a/b', creating the intermediate dicts (Flax variable paths)."""
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def get_at_path(tree: Mapping, path: str) -> np.ndarray:
    """`tree['a']['b']` for path 'a/b', as a numpy array."""
    return np.asarray(_leaf(tree, path))


def shape_at_path(tree: Mapping, path: str) -> tuple[int, ...]:
    """The shape of `tree['a']['b']` for path 'a/b' (an array, or a `jax.ShapeDtypeStruct` of `jax.eval_shape`)."""
    return tuple(_leaf(tree, path).shape)


def _leaf(tree: Mapping, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def check_weight(what: str, key: str, value: np.ndarray, expected: tuple[int, ...],
                 to_torch: Callable[[np.ndarray], np.ndarray]) -> None:
    """One checkpoint weight (`value`, as stored under `key`), before conversion, against the architecture read
    from the checkpoint's other keys: its shape against `expected`, the Flax variable's shape mapped to the key's
    layout by `to_torch` (an edited checkpoint, or one of another variant, would otherwise convert and fail only
    at the first `apply`, or for a decoder weight only at sampling), its dtype (numbers) and its values (NaN or
    inf weights convert into a model whose every output is non-finite)."""
    wanted = to_torch(np.broadcast_to(np.float32(0), tuple(expected))).shape
    if np.shape(value) != wanted:
        raise ValueError(f"{what}: {key!r} has shape {tuple(np.shape(value))}, which does not fit the architecture "
                         f"read from the other keys (expects {wanted})")
    dtype = np.asarray(value).dtype
    try:  # ml_dtypes' bfloat16 (safetensors) converts; raw bytes or strings made np.isfinite raise a TypeError
        value = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        hint = (" (numpy.savez keeps no bfloat16 type: save it as float32, or as .safetensors, which keeps it)"
                if dtype.kind == "V" and dtype.itemsize == 2 else "")
        raise ValueError(f"{what}: {key!r} holds {dtype} values, not numbers{hint}") from None
    if not np.isfinite(value).all():
        raise ValueError(f"{what}: {key!r} holds NaN or inf values; convert a checkpoint whose weights are all "
                         "finite (an earlier one of the run, if this was saved as training diverged)")
