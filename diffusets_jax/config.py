"""Experiment configs: load a `configs/*.py` file, apply dotted overrides with type checks, save it resolved.

A config file is an ordinary Python module with `get_config() -> ml_collections.ConfigDict` (big_vision
style: the file reads like documentation of the experiment). Overrides come from the command line as
`--config.train.learning_rate=1e-4`; a key that does not exist is an error naming the closest keys, and a
value that cannot become the existing field's type is an error too, so a typo never trains silently with
the default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

OVERRIDE_PREFIX = "--config."


def _shipped_configs() -> Path:
    """The folder of the shipped experiment configs (`configs/*.py`).

    The checkout's top-level `configs/` is their single source; an installed wheel (`pip install .`, not editable)
    has no checkout around it, so it carries a copy inside the package, `diffusets_jax/configs/` (pyproject.toml
    maps it there). The copy is looked for first: next to an installed package (site-packages) a `configs/` folder
    may be another project's, while a checkout has no `diffusets_jax/configs/`.
    """
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


SHIPPED_CONFIGS = _shipped_configs()


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Import `path`, call its `get_config()` and apply `overrides` (`"key.sub=value"` strings).

    A `.json` path is read as a resolved config saved by `save_config` (e.g. `workdir/config.json`).

    `overrides` may also carry the `--config.` prefix as typed on the command line. Raises
    FileNotFoundError for a missing file and ValueError for a file without `get_config`, an unknown key
    or a badly typed value.
    """
    from diffusets_jax.io.files import check_input_file, read_json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist (the shipped ones are in {SHIPPED_CONFIGS})")
    check_input_file(path, "config file")
    if path.suffix == ".json":  # a resolved config saved by a run (`workdir/config.json`)
        data = read_json(path, "saved config")
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a saved config (a JSON object of sections)")
        return apply_overrides(config_from_dict(data), overrides)
    spec = importlib.util.spec_from_file_location(f"diffusets_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path} is not a Python file (configs/*.py) or a run's config.json")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ValueError(f"{path} line {err.lineno}: Python syntax error ({err.msg}); fix the config file") from None
    except Exception as err:  # noqa: BLE001 - whatever the user's file raises while it is imported
        raise ValueError(f"{path}{_line_in(err, path)}: the config file raised {type(err).__name__}: {err}; fix "
                         "the config file") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config() function")
    try:
        config = module.get_config()
    except Exception as err:  # noqa: BLE001 - a ValueError of a section helper, a typo in the file, ...
        raise ValueError(f"{path}{_line_in(err, path)}: get_config() raised {type(err).__name__}: {err}; fix the "
                         "config file") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{path}: get_config() must return an ml_collections.ConfigDict, got {type(config)}")
    return apply_overrides(config, overrides)


def _line_in(error: BaseException, path: Path) -> str:
    """' line N' of the innermost frame of `error` inside the config file `path`, or ''."""
    import traceback

    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if Path(frame.filename).resolve() == path.resolve()]
    return f" line {lines[-1]}" if lines else ""


def split_override_args(argv: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.key=value` (or `--config.key value`) arguments from the rest of `argv`."""
    overrides: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(OVERRIDE_PREFIX):
            if "=" in arg:
                overrides.append(arg)
            elif i + 1 < len(args):
                overrides.append(f"{arg}={args[i + 1]}")
                i += 1
            else:
                raise ValueError(f"{arg} needs a value: write {arg}=VALUE")
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of `config` in dotted form (`"train.learning_rate"`)."""
    keys = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, key + "."))
        else:
            keys.append(key)
    return keys


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `"a.b=value"` overrides in place and return `config`.

    The value is parsed as a Python literal when it looks like one and converted to the existing field's
    type (int fields accept `512`, float fields accept `5e-4` and `1`, bool fields `true`/`false`/`1`/`0`,
    tuple fields `"(1, 2)"` or `"1,2"`). Fields whose default is None accept any literal.
    """
    for override in overrides:
        text = override.removeprefix(OVERRIDE_PREFIX)
        if "=" not in text:
            raise ValueError(f"config override {override!r} has no '=': write --config.key=value")
        key, raw = text.split("=", 1)
        key = key.strip()
        parent, leaf = _locate(config, key)
        current = parent[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ValueError(f"config key {key!r} is a section; override one of its fields: "
                             + ", ".join(f"{key}.{k}" for k in current.keys()))
        value = _parse_value(key, raw, current)
        with parent.unlocked():
            parent[leaf] = value
    return config


def save_config(config: ml_collections.ConfigDict, directory: str | os.PathLike) -> Path:
    """Write the resolved config as `config.json` in `directory` (atomically) and return its path."""
    from diffusets_jax.io.files import write_json_atomic

    return write_json_atomic(Path(directory) / "config.json", config_to_dict(config), sort_keys=True)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for JSON and for building modules from fields."""
    return json.loads(config.to_json_best_effort())


def config_from_dict(data: dict[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of `config_to_dict` (lists stay lists)."""
    return ml_collections.ConfigDict(data)


def _locate(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(_unknown_key_message(config, key))
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
    keys = flat_keys(config)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:  # match on the last component too, so `train.lr` finds `optimizer.lr`
        by_leaf: dict[str, list[str]] = {}
        for k in keys:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        for name in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=3, cutoff=0.6):
            close += by_leaf[name]
    hint = f"; did you mean {', '.join(repr(k) for k in close[:3])}?" if close else ""
    return f"unknown config key {key!r}{hint}"


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _parse_value(key: str, raw: str, current: Any) -> Any:
    raw = raw.strip()

    def bad(expected: str) -> ValueError:
        return ValueError(f"config key {key!r} expects {expected} (current value {current!r}), got {raw!r}")

    if isinstance(current, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise bad("a bool (true/false)")
    if isinstance(current, int):
        try:
            value = _whole_number(ast.literal_eval(raw))
        except (ValueError, SyntaxError):
            raise bad("an int") from None
        if value is None:
            raise bad("an int")
        return value
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise bad("a float") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, tuple | list):
        text = raw if raw.startswith(("(", "[")) else f"({raw},)" if raw else "()"
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise bad("a tuple, e.g. (1, 2) or 1,2") from None
        if not isinstance(value, tuple | list):  # `(64)` is 64, not a tuple
            raise bad("a tuple, e.g. (1, 2) or 1,2")
        # Each element takes the type of the current tuple's elements, as a single field would: a float among
        # a model's widths passed every check and failed in the first traced step, after the workdir was claimed.
        if current and all(isinstance(c, int) and not isinstance(c, bool) for c in current):
            value = [_whole_number(v) for v in value]
            if None in value:
                raise bad("a tuple of whole numbers, e.g. (32, 64)")
        return type(current)(value)
    # None or other: any Python literal, else the raw string.
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _whole_number(value: Any) -> int | None:
    """`value` as an int field takes it (512, or 512.0 written as a float), or None."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# The validation split a recipe names: a dataset without it trains without periodic validation, while another
# split named and absent is refused (`train.run.run_training`), most likely a typo.
DEFAULT_VAL_SPLIT = "validation"


def data_section(dataset: str = "", **values: Any) -> ml_collections.ConfigDict:
    """The `config.data` section shared by every training config."""
    section = ml_collections.ConfigDict(
        {
            "dataset": dataset,  # a prepared (or latent) dataset directory, or a TFDS name with data_dir
            "data_dir": "",  # TFDS data dir when `dataset` is a name
            "train_split": "train",
            # Periodic validation; skipped when the dataset has no such split, or when "" (none).
            "val_split": DEFAULT_VAL_SPLIT,
            "num_train_examples": 0,  # 0 = read from the dataset
        }
    )
    section.update(values)
    return section


def mesh_section(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
    """The `config.mesh` section shared by every training config."""
    return ml_collections.ConfigDict(
        {
            # Mesh axis sizes; -1 = all remaining devices. data x fsdp must equal the device count.
            "data": data,
            # > 1 shards params and optimiser state along their largest divisible dimension (FSDP / ZeRO-3).
            "fsdp": fsdp,
        }
    )


# A seed names a random stream. JAX's PRNG keys (without jax_enable_x64, as here) keep only a seed's low 32 bits:
# seed 2**32 + 1 draws exactly what seed 1 draws, and -1 what 2**32 - 1 draws. Seeds outside [0, MAX_SEED] are
# refused, rather than silently repeating another seed's ECGs or weights.
MAX_SEED = 2**32 - 1


def check_seed(seed: Any, name: str = "seed") -> int:
    """`seed` as an int if it is a whole number in [0, `MAX_SEED`]; ValueError naming `name` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be a whole number from 0 to {MAX_SEED} (2**32 - 1: JAX keeps a seed's low 32 "
                         f"bits, so larger ones would repeat smaller ones), got {seed!r}")
    return int(seed)


def train_section(**values: Any) -> ml_collections.ConfigDict:
    """The `config.train` section with the loop's defaults; `values` sets the recipe's own numbers.

    Every key here is read by `diffusets_jax.train.loop.train`; a config file overrides the ones its recipe
    fixes and documents why, and adds the keys its trainer reads (e.g. the U-Net's `t_min`, the VAE's
    `kl_schedule`). The optimiser's settings are in `optimizer_section`.
    """
    section = ml_collections.ConfigDict(
        {
            "seed": 0,
            "global_batch_size": 64,  # examples per optimiser update, over all devices and micro-batches
            "grad_accum_steps": 1,  # split each global batch into this many sequential micro-batches
            # A run's length: num_steps, or num_epochs (num_steps = ceil(num_epochs * examples / batch)); set one and
            # leave the other at 0. Both set must agree (a run's saved config.json states both): otherwise one would
            # silently win (`train.optim.total_steps`).
            "num_epochs": 0.0,
            "num_steps": 0,
            "ema_decay": 0.0,  # 0 = no EMA params
            "compute_dtype": "float32",  # "bfloat16": bf16 activations and matmuls, f32 master params
            "log_every": 50,
            "eval_every": 1000,
            "eval_batches": 4,  # validation batches per evaluation
            "checkpoint_every": 1000,
            "keep_checkpoints": 3,
            "async_checkpoints": True,
            "progress_bar": True,
        }
    )
    section.update(values)
    return section


LR_SCHEDULES: tuple[str, ...] = ("constant", "one_cycle", "cosine")


def optimizer_section(**values: Any) -> ml_collections.ConfigDict:
    """The `config.optimizer` section: AdamW and its learning-rate schedule, every field declared.

    The defaults are PyTorch's AdamW (betas 0.9 / 0.999, eps 1e-8, weight decay 0.01) at a constant rate; a
    recipe sets what it fixes (`diffusets_jax.train.optim` builds the optimiser from exactly these fields).
    """
    section = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-4,  # the peak rate for "one_cycle", the start for "cosine"
            "lr_schedule": "constant",  # one of LR_SCHEDULES
            "warmup_steps": 0,  # "cosine": linear warm-up from 0 over this many steps
            "cosine_final_fraction": 0.1,  # "cosine": decay to this fraction of learning_rate
            # "one_cycle": PyTorch OneCycleLR (start at peak / div_factor, peak after pct_start of the steps,
            # cosine down to start / final_div_factor).
            "one_cycle_pct_start": 0.3,
            "one_cycle_div_factor": 25.0,
            "one_cycle_final_div_factor": 1e4,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.01,  # decoupled, on every parameter, as torch.optim.AdamW(model.parameters())
            "grad_clip_norm": 0.0,  # global-norm clipping; 0 = off (the reference does not clip)
        }
    )
    _update_declared(section, values, "optimizer")
    check_optimizer_section(section)
    return section


# What each optimizer field may hold, beyond being a finite number: (the interval, in words; its test). Outside
# them training runs but wrongly (a negative learning rate ascends the loss; a beta of 1.5 diverges).
_OPTIMIZER_RANGES: dict[str, tuple[str, Any]] = {
    "learning_rate": ("(0, inf)", lambda v: v > 0),
    "warmup_steps": ("[0, inf)", lambda v: v >= 0),
    "cosine_final_fraction": ("[0, 1]", lambda v: 0 <= v <= 1),
    "one_cycle_pct_start": ("(0, 1)", lambda v: 0 < v < 1),
    "one_cycle_div_factor": ("(0, inf)", lambda v: v > 0),
    "one_cycle_final_div_factor": ("(0, inf)", lambda v: v > 0),
    "b1": ("[0, 1)", lambda v: 0 <= v < 1),
    "b2": ("[0, 1)", lambda v: 0 <= v < 1),
    "eps": ("(0, inf)", lambda v: v > 0),
    "weight_decay": ("[0, inf)", lambda v: v >= 0),
    "grad_clip_norm": ("[0, inf)", lambda v: v >= 0),  # 0 = off
}


def check_optimizer_section(optimizer: ml_collections.ConfigDict, source: str | None = None) -> None:
    """Refuse `config.optimizer` values that would train wrongly rather than fail: a non-finite number or one
    outside its range (`_OPTIMIZER_RANGES`), an unknown schedule. Run when a recipe builds the section and again
    after command-line overrides (`train.run.check_train_section`); `source` names the config file in the
    message."""
    prefix = f"{source}: " if source else ""
    for key, (interval, allowed) in _OPTIMIZER_RANGES.items():
        try:
            value = float(optimizer[key])
        except (TypeError, ValueError):
            raise ValueError(f"{prefix}optimizer.{key} must be a number, got {optimizer[key]!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{prefix}optimizer.{key} must be a finite number, got {optimizer[key]!r}")
        if not allowed(value):
            raise ValueError(f"{prefix}optimizer.{key} must be in {interval}, got {optimizer[key]!r}")
    if optimizer.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"{prefix}optimizer.lr_schedule must be one of {LR_SCHEDULES}, got {optimizer.lr_schedule!r}")
    if float(optimizer.warmup_steps) > 0 and optimizer.lr_schedule != "cosine":
        # Only the cosine schedule has a warm-up: given to another one it was ignored, without a word.
        raise ValueError(f"{prefix}optimizer.warmup_steps={optimizer.warmup_steps} warms up the cosine schedule only, "
                         f"and optimizer.lr_schedule is {optimizer.lr_schedule!r}: set --config.optimizer.lr_schedule="
                         "cosine, or leave warmup_steps at 0")


def diffusion_section(**values: Any) -> ml_collections.ConfigDict:
    """The `config.diffusion` section of a U-Net recipe: its noise schedule and latent space.

    The same shape goes, resolved, into the model directory's `model_index.json` (`schedule.DiffusionSpec`), so
    sampling uses exactly what training used. `schedule` holds `diffusion.schedule.ScheduleConfig`'s fields
    (what the U-Net predicts included); `latent_scale` multiplies the VAE posterior (the published 0.18215);
    `scale_by_std` measures instead the scale that makes the training latents unit-variance; `clip_sample`
    says whether the DDPM sampler clips the predicted latent to [-1, 1] by default (as published).
    """
    from diffusets_jax.diffusion.schedule import DiffusionSpec, ScheduleConfig

    schedule = {f.name: f.default for f in dataclasses.fields(ScheduleConfig)}
    schedule.update(values.pop("schedule", {}))
    published = DiffusionSpec()
    section = ml_collections.ConfigDict({"schedule": schedule, "latent_scale": published.latent_scale,
                                         "scale_by_std": published.scale_by_std, "clip_sample": published.clip_sample})
    _update_declared(section, values, "diffusion")
    ScheduleConfig(**schedule)  # validate now
    check_diffusion_section(section)
    return section


def check_diffusion_section(diffusion: ml_collections.ConfigDict, source: str | None = None) -> None:
    """Refuse `diffusion.scale_by_std` with `diffusion.clip_sample`: DDPM would clip unit-variance latents to
    [-1, 1] and sample wrongly. Run when a recipe builds the section and again after command-line overrides
    (`train.run.check_train_section`), where `--config.diffusion.scale_by_std=true` alone on a published recipe
    (clip_sample true) trained and exported such a U-Net; `source` names the config file in the message."""
    prefix = f"{source}: " if source else ""
    if diffusion.get("scale_by_std") and diffusion.get("clip_sample"):
        raise ValueError(f"{prefix}diffusion.scale_by_std makes the latents unit-variance, reaching beyond [-1, 1]: "
                         "set diffusion.clip_sample=False (--config.diffusion.clip_sample=false)")


def _update_declared(section: ml_collections.ConfigDict, values: dict[str, Any], name: str) -> None:
    """`section.update(values)`, refusing keys the section does not declare (a recipe typo is an error)."""
    unknown = sorted(set(values) - set(section.keys()))
    if unknown:
        raise ValueError(f"{name} section has no field(s) {unknown}; fields: {sorted(section.keys())}")
    section.update(values)


def module_section(module_class: type, **values: Any) -> ml_collections.ConfigDict:
    """`config.model`: every architecture field of a Flax module class with its default, then `values`.

    Listing all fields makes the config state the whole architecture and lets any of them be overridden
    from the command line (`--config.model.kernel_size=9`). Dtype fields are left to the trainers.
    """
    fields = {}
    for field in dataclasses.fields(module_class):
        if field.name in ("parent", "name") or "dtype" in field.name:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
            fields[field.name] = tuple(default) if isinstance(default, list) else default
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{module_class.__name__} has no field(s) {sorted(unknown)}; fields: {sorted(fields)}")
    fields.update(values)
    return ml_collections.ConfigDict(fields)


def module_fields(config: ml_collections.ConfigDict, section: str = "model") -> dict[str, Any]:
    """A config's model section as module keyword arguments (JSON lists back to the tuples Flax fields need)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config_to_dict(config)[section].items()}
