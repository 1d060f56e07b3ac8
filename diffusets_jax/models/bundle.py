"""On-disk model format: `DIR/NAME/config.json` (module class + fields) and `DIR/NAME/variables/` (Orbax).

Every command that needs a model (sample, evaluate, train from a converted checkpoint) loads it with
`load_model(DIR, NAME)`; `diffusets-jax convert` and the trainers write it with `save_model`.

config.json::

    {"format": 1, "class": "diffusets_jax.models.vae.VAE", "fields": {"widths": [128, 256, 512], ...}}

Only classes under `diffusets_jax.models` are instantiated, so a config file cannot run arbitrary code.
JSON lists come back as tuples (module fields are tuples so modules stay hashable); dtypes are stored as
`{"dtype": "bfloat16"}`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusets_jax.io.checkpoints import absorb_restore_noise, restore_error_reason
from diffusets_jax.io.files import make_temporary_folder, replace_folder

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"
_ALLOWED_PACKAGE = "diffusets_jax.models."
# Fields every linen Module has that are not configuration.
_NOT_CONFIG = {"parent", "name"}


def module_config(module: nn.Module) -> dict[str, Any]:
    """`{'class': 'diffusets_jax.models.x.Class', 'fields': {...}}` for a module, JSON-ready."""
    cls = type(module)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if not path.startswith(_ALLOWED_PACKAGE):
        raise ValueError(f"save_model: only modules defined under {_ALLOWED_PACKAGE[:-1]} can be saved, got {path}")
    fields = {f.name: _to_json(getattr(module, f.name), f"{path}.{f.name}")
              for f in dataclasses.fields(module) if f.name not in _NOT_CONFIG and f.init}
    return {"format": FORMAT_VERSION, "class": path, "fields": fields}


def module_from_config(config: dict[str, Any], source: str = "config") -> nn.Module:
    """Inverse of `module_config`: import the class (only under diffusets_jax.models) and build it."""
    path = config.get("class") if isinstance(config, dict) else None
    if not isinstance(path, str) or not path.startswith(_ALLOWED_PACKAGE):
        raise ValueError(f"{source}: 'class' must name a module under {_ALLOWED_PACKAGE[:-1]}, got {path!r}")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{source}: cannot import {path} ({err}); was it saved by a newer diffusets-jax?") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{source}: {path} is not a flax.linen Module")
    fields = config.get("fields", {})
    known = {f.name for f in dataclasses.fields(cls) if f.name not in _NOT_CONFIG and f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: {path} has no field(s) {', '.join(unknown)}")
    check_int_fields(fields, cls, f"{source}: fields")
    return cls(**{name: _from_json(value) for name, value in fields.items()})


# How a module declares a whole number, and a sequence of them (its fields' annotations are strings).
_INT_TYPES = ("int", int)
_INT_SEQUENCE_TYPES = ("tuple[int, ...]", "Sequence[int]")


def check_int_fields(fields: Any, module_class: type, where: str) -> None:
    """Refuse, in one ValueError line `{where}.{key} ...`, a float or a bool in `fields` (a mapping) where
    `module_class` declares an int or a sequence of ints. A float (`"num_res_blocks": 2.0` in an edited config.json
    or config file) passed every check and failed in the module's first traced call (`range(2.0)`), after the
    command had claimed its output folder; a bool ran as 0 or 1: another architecture than written. What a field is
    declared comes from the module, so a float field (a dropout rate) still takes a float."""
    for field in dataclasses.fields(module_class):
        if field.name not in fields:
            continue
        value = fields[field.name]
        if field.type in _INT_TYPES and (isinstance(value, bool) or not isinstance(value, int)):
            hint = f": write {int(value)}" if isinstance(value, float) and value.is_integer() else ""
            raise ValueError(f"{where}.{field.name} takes an int (a width, count or size), got {value!r} (a "
                             f"{type(value).__name__}){hint}")
        if (field.type in _INT_SEQUENCE_TYPES and isinstance(value, tuple | list)
                and not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{where}.{field.name} takes whole numbers (widths, counts or sizes), got {tuple(value)}")


def _to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.integer | np.floating | np.bool_):
        return value.item()
    if isinstance(value, tuple | list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, where) for k, v in value.items()}
    try:
        return {"dtype": np.dtype(value).name}
    except TypeError:
        pass
    raise ValueError(f"save_model: field {where} = {value!r} ({type(value).__name__}) cannot be stored as JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        if set(value) == {"dtype"}:
            import jax.numpy as jnp

            return jnp.dtype(value["dtype"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def save_model(directory: str | os.PathLike, name: str, module: nn.Module, variables: Any, *,
               replace: bool = False) -> str:
    """Write `directory/name/{config.json, variables/}` atomically; returns the model's path.

    Everything is written to a temporary sibling first and moved into place, so a crash never leaves a
    half-written model under `name`. A folder already at `name` is replaced only with `replace=True` (the caller
    has decided it may go, e.g. `model_dir.check_component_writable`); otherwise FileExistsError, before any work.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"save_model: model name {name!r} must be a plain directory name")
    directory = os.path.abspath(os.fspath(directory))
    target = os.path.join(directory, name)
    if os.path.exists(target) and not replace:
        raise FileExistsError(f"save_model: {target} already exists; pass replace=True to replace it")
    os.makedirs(directory, exist_ok=True)
    config = module_config(module)
    # Not tempfile.mkdtemp: its 0700 followed the folder into place, so a model shared with colleagues (a lab's
    # group-readable umask) could not be read by them. A new folder gets the permissions the umask gives.
    staging = make_temporary_folder(os.path.join(directory, name))
    try:
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        # One process writes a model (process 0 exports a training); Orbax's default waits for every process of
        # a multi-host run at its barriers, which the others never reach: the export hung.
        this_process = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                          active_processes={jax.process_index()})
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=this_process)
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), jax.tree.map(np.asarray, dict(variables)))
        checkpointer.wait_until_finished()
        checkpointer.close()
        replace_folder(staging, target)  # an old model (replace=True) goes only once the new one holds the name
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # our own partial write
        raise
    return target


def read_module_config(directory: str | os.PathLike, name: str) -> dict[str, Any]:
    """The parsed `config.json` of model `name` in `directory` (class and fields), without loading weights."""
    from diffusets_jax.io.files import read_json

    return read_json(os.path.join(os.fspath(directory), name, CONFIG_FILE), f"{name} model config")


def load_model(directory: str | os.PathLike, name: str) -> tuple[nn.Module, dict]:
    """Read a model written by `save_model` -> `(module, variables)` ready for `module.apply(variables, ...)`.

    Variables come back as host numpy arrays; place or shard them with `jax.device_put` (jitted functions
    also accept them as they are).
    """
    path = os.path.join(os.fspath(directory), name)
    config_path = os.path.join(path, CONFIG_FILE)
    variables_path = os.path.abspath(os.path.join(path, VARIABLES_DIR))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model {name!r} in {os.fspath(directory)!r} ({path} does not exist); "
                                "write one with `diffusets-jax convert` or a training run")
    for needed in (config_path, variables_path):
        if not os.path.exists(needed):
            raise FileNotFoundError(f"model {path!r} is incomplete: {needed} is missing")
    module = module_from_config(read_module_config(directory, name), source=config_path)
    checkpointer = ocp.StandardCheckpointer()
    absorb_restore_noise(variables_path)
    try:
        variables = checkpointer.restore(variables_path)
    except Exception as err:  # noqa: BLE001 - tensorstore/Orbax raise ValueError, OSError, JSON errors, ...
        from diffusets_jax.parallel import lost_another_process

        if lost_another_process(err):  # the restore waits for every host: another one stopped, the folder is fine
            raise
        raise ValueError(f"model {path}: its weights ({variables_path}) cannot be read "
                         f"({restore_error_reason(err)}); the folder is damaged or incomplete: write it again with "
                         "`diffusets-jax convert` or a training run's --model-dir") from None
    finally:
        checkpointer.close()
    return module, dict(variables)
