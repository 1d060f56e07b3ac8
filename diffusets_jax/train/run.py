"""`diffusets-jax train {vae,unet,clip}`: config -> mesh -> prepared dataset -> trainer -> loop -> model directory.

At the end (and with `--export-only`, from the latest checkpoint) the trained component is written into a model
directory (`models.model_dir`; default `WORKDIR/model`) with its provenance: the dataset's card reference (name,
config, version, split, example count, and what it was derived from), the resolved config, the step, the code's
version. A U-Net also records its conditioning (the embedder and prompt style from the latent dataset's card, its
patient-feature mode), its diffusion settings (`config.diffusion`, resolved, with the measured latent std) and the
uid of the VAE whose latents it was trained on.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections

from diffusets_jax import parallel
from diffusets_jax.config import (
    DEFAULT_VAL_SPLIT,
    check_diffusion_section,
    check_optimizer_section,
    check_seed,
)
from diffusets_jax.models import model_dir as model_dirs
from diffusets_jax.models.bundle import check_int_fields
from diffusets_jax.models.winograd import check_algorithm
from diffusets_jax.train.loop import Task, TrainResult, train
from diffusets_jax.train.optim import total_steps

log = logging.getLogger(__name__)

MODELS = ("vae", "unet", "clip")
# The dataset fields each trainer reads (the prepared-ECG schema and the latent dataset's).
FIELDS: dict[str, tuple[str, ...]] = {
    "vae": ("ecg",),
    "unet": ("latent_mean", "latent_logvar", "text_embedding", "sex", "age", "heart_rate"),
    "clip": ("ecg", "text_embedding"),
}
MODEL_DIR_NAME = "model"  # WORKDIR/model: the default model directory of a run


def check_model_kind(model: str, config: ml_collections.ConfigDict, source: str = "the config") -> None:
    """Refuse a config written for another model (e.g. `train vae --config configs/demo_clip.py`)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    kind = config.get("model_kind")
    if kind is None:
        raise ValueError(f"{source} has no model_kind: add `config.model_kind = {model!r}` (the configs in configs/ "
                         "show the layout)")
    if kind != model:
        raise ValueError(f"{source} is a {kind} config (model_kind = {kind!r}): run `diffusets-jax train {kind}`, "
                         f"or pass a {model} config")


# Keys a rerun may change and still resume the same run: how long it trains, how often it logs and saves, and the
# device layout (checkpoints restore onto any mesh). Every other config value is part of the run's fingerprint.
# Training longer re-sizes a learning-rate schedule sized by num_steps mid-run (`train.loop` says so in a line).
RESUMABLE_KEYS: tuple[str, ...] = (
    "train.num_steps", "train.num_epochs", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoints", "train.progress_bar", "mesh",
)
# What the trainers compute in: float32, or bfloat16 activations and matmuls with float32 master parameters.
COMPUTE_DTYPES = ("float32", "bfloat16")
# config.train keys that count something and must be positive.
_POSITIVE_TRAIN_KEYS = ("global_batch_size", "grad_accum_steps", "log_every", "eval_every", "eval_batches",
                        "checkpoint_every", "keep_checkpoints")


# The config.train keys each kind's trainer reads beyond `config.train_section`'s, which its config file adds.
TRAINER_TRAIN_KEYS: dict[str, tuple[str, ...]] = {
    "vae": ("kl_anneal_epochs", "kl_schedule"),
    "unet": ("t_min", "t_max", "loss_reduction", "cond_dropout", "patient_features", "eval_timesteps"),
    "clip": (),
    "classifier": (),
}


def _check_section_fields(config: ml_collections.ConfigDict, source: str) -> None:
    """Refuse a config whose data, mesh, optimizer or train section lacks a field the training reads, or holds one
    it does not. A missing one (a hand-written config, an older run's config.json) failed as a KeyError traceback;
    an unknown one (`train_section(learning_rate=1e-3)`, `"warmup"` typed into config.json) was ignored: the run
    trained with the default, silently."""
    from diffusets_jax.config import data_section, mesh_section, optimizer_section, train_section

    kind = config.get("model_kind")
    if kind not in TRAINER_TRAIN_KEYS:
        return  # check_model_kind names what is wrong
    fields = {"train": set(train_section().keys()) | set(TRAINER_TRAIN_KEYS[kind]),
              "optimizer": set(optimizer_section().keys()), "mesh": set(mesh_section().keys())}
    if kind != "classifier":  # downstream gives its classifier the data itself
        fields["data"] = set(data_section().keys())
    for name, declared in fields.items():
        section = config.get(name)
        if not isinstance(section, ml_collections.ConfigDict):
            raise ValueError(f"{source} has no {name} section (the configs in configs/ show the layout)")
        missing = sorted(declared - set(section.keys()))
        if missing:
            them = "it" if len(missing) == 1 else "them"
            raise ValueError(f"{source} lacks {', '.join(f'{name}.{k}' for k in missing)}: add {them} (the configs "
                             "in configs/ show the layout)")
        unknown = sorted(set(section.keys()) - declared)
        if unknown:
            elsewhere = [f"{other}.{k}" for k in unknown for other, keys in fields.items() if k in keys]
            hint = f"; did you mean {', '.join(elsewhere)}?" if elsewhere else ""
            raise ValueError(f"{source}: {', '.join(f'{name}.{k}' for k in unknown)} is not read by a {kind} "
                             f"training and would be ignored{hint} ({name} fields: {', '.join(sorted(declared))})")


def check_train_section(config: ml_collections.ConfigDict, source: str = "the config") -> None:
    """Refuse loop settings that cannot run (e.g. `--config.train.num_steps=-5`), before any work."""
    _check_section_fields(config, source)
    train = config.train
    for key in (*_POSITIVE_TRAIN_KEYS, "num_steps"):
        # A float in a config file or an edited config.json (`global_batch_size=8.5`) was truncated by int():
        # another batch than asked for, silently. A count takes an int, as the model section's do.
        value = train.get(key)
        if key in train and (isinstance(value, bool) or not isinstance(value, int)):
            hint = f": write {int(value)}" if isinstance(value, float) and value.is_integer() else ""
            raise ValueError(f"{source}: train.{key} takes an int (a count), got {value!r} (a "
                             f"{type(value).__name__}){hint}")
    for key in _POSITIVE_TRAIN_KEYS:
        if key in train and int(train[key]) < 1:
            raise ValueError(f"{source}: train.{key} must be a positive number, got {train[key]}")
    if int(train.num_steps) < 0:
        raise ValueError(f"{source}: train.num_steps must be a positive number of steps (0 = from num_epochs), got "
                         f"{train.num_steps}")
    if not (math.isfinite(float(train.num_epochs)) and float(train.num_epochs) >= 0):
        raise ValueError(f"{source}: train.num_epochs must be a finite number >= 0 (0 = from train.num_steps), got "
                         f"{train.num_epochs}")
    if int(train.num_steps) == 0 and not float(train.num_epochs) > 0:
        raise ValueError(f"{source}: train.num_steps and train.num_epochs are both 0: set one of them (how long the "
                         "run trains), e.g. --config.train.num_epochs=10")
    if "kl_anneal_epochs" in train and not (math.isfinite(float(train.kl_anneal_epochs))
                                            and float(train.kl_anneal_epochs) >= 0):
        # A negative one gave the full KL weight from the first step, as 0 does, without a word.
        raise ValueError(f"{source}: train.kl_anneal_epochs must be a finite number >= 0 (the epochs the KL weight "
                         f"ramps up over; 0 = full weight from the start), got {train.kl_anneal_epochs}")
    if "grad_accum_steps" in train and int(train.global_batch_size) % int(train.grad_accum_steps):
        # Found only when the first step was traced, after the workdir was claimed and the data pipeline started.
        raise ValueError(f"{source}: train.global_batch_size {train.global_batch_size} must be divisible by "
                         f"train.grad_accum_steps {train.grad_accum_steps} (each step splits its batch into that "
                         "many micro-batches)")
    check_seed(train.seed, f"{source}: train.seed")
    if not 0.0 <= float(train.ema_decay) < 1.0:
        raise ValueError(f"{source}: train.ema_decay must be in [0, 1) (0 = off), got {train.ema_decay}")
    if train.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{source}: train.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got "
                         f"{train.compute_dtype!r} (float16 would need loss scaling, which the trainers do not do)")
    if "optimizer" in config:
        check_optimizer_section(config.optimizer, source)
    if "diffusion" in config:
        check_diffusion_section(config.diffusion, source)
    if "cond_dropout" in train and not 0.0 <= float(train.cond_dropout) < 1.0:
        raise ValueError(f"{source}: train.cond_dropout must be in [0, 1) (the share of conditions dropped for "
                         f"guidance; 0 = none), got {train.cond_dropout}")
    module_class = _module_class(config.get("model_kind"))
    if module_class is not None:
        check_int_fields(config.get("model", {}), module_class, f"{source}: model")
    _check_model_section(config.get("model", {}), source)
    # The one model field that names a choice rather than a size (the VAE's); a typo would otherwise surface
    # only when the step is traced.
    algorithm = config.get("model", {}).get("conv_algorithm")
    if algorithm is not None:
        try:
            check_algorithm(algorithm)
        except ValueError as err:
            raise ValueError(f"{source}: model.{err}") from None


# The Flax module whose fields each model_kind's `config.model` holds (module, class): what each field is declared.
_MODULE_OF_KIND = {"vae": ("diffusets_jax.models.vae", "VAE"), "unet": ("diffusets_jax.models.unet", "UNet"),
                   "clip": ("diffusets_jax.models.clip", "CLIP"), "classifier": ("diffusets_jax.models.net1d", "Net1D")}


def _module_class(kind: Any) -> type | None:
    """The Flax module class of `kind` (None for a kind without one): what each field of its `config.model` is
    declared (`models.bundle.check_int_fields`)."""
    import importlib

    if kind not in _MODULE_OF_KIND:
        return None
    module, name = _MODULE_OF_KIND[kind]
    return getattr(importlib.import_module(module), name)


def _check_model_section(model: Any, source: str) -> None:
    """The architecture's numbers, before any module is built: every integer (or integer in a tuple) is a width,
    a count or a size and must be positive, every float finite, a dropout rate in [0, 1). Otherwise a zero width
    fails deep inside JAX with a traceback, and a negative dropout trains. The fields the module declares `int`
    take an int and nothing else (`models.bundle.check_int_fields`, checked first)."""
    for key, value in model.items():
        # Every tuple of a model section lists widths, counts or sizes (the VAE's widths, the U-Net's channels,
        # CLIP's filters); a float or a string there failed in the first traced step, after the workdir was
        # claimed, as a traceback naming no key.
        if isinstance(value, (tuple, list)) and not all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value):
            raise ValueError(f"{source}: model.{key} takes whole numbers (widths, counts or sizes), got "
                             f"{tuple(value)}")
        if isinstance(value, (tuple, list)) and not value:
            # `--config.model.widths=` (an unset shell variable) gave (): the VAE failed as it was first traced,
            # after the workdir was claimed, with an IndexError traceback.
            raise ValueError(f"{source}: model.{key} is empty; it takes one or more whole numbers (widths, counts or "
                             f"sizes), e.g. --config.model.{key}=32,64")
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if isinstance(item, int) and item < 1:
                raise ValueError(f"{source}: model.{key} must be positive (a width, count or size), got {value}")
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{source}: model.{key} must be a finite number, got {value}")
            if "dropout" in key and not 0.0 <= item < 1.0:
                raise ValueError(f"{source}: model.{key} must be in [0, 1), got {value}")
    # The VAE's GroupNorm splits every width into `groups`; a width it does not divide failed when the model was
    # first traced, in a line that named neither key.
    groups, widths = model.get("groups"), model.get("widths")
    if isinstance(groups, int) and isinstance(widths, (tuple, list)) and any(int(w) % groups for w in widths):
        raise ValueError(f"{source}: model.groups={groups} must divide every one of model.widths {tuple(widths)} "
                         "(GroupNorm splits each width into that many groups)")


def run_settings(model: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What identifies a training run in its workdir (`io.run_dir` fingerprint): the model and the config as given,
    without `RESUMABLE_KEYS`."""
    from diffusets_jax.config import config_to_dict

    return {"model": model, "config": _without(config_to_dict(config), RESUMABLE_KEYS)}


def _without(settings: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """`settings` (a config as a dict, changed in place) without the dotted `keys`."""
    for key in keys:
        *parents, leaf = key.split(".")
        section = settings
        for part in parents:
            section = section.get(part, {})
        section.pop(leaf, None)
    return settings


def make_task(model: str, config: ml_collections.ConfigDict, num_steps: int) -> Task:
    """The trainer of `model` ("vae", "unet" or "clip") for `config`."""
    if model == "vae":
        from diffusets_jax.train.vae import vae_task

        return vae_task(config, num_steps)
    if model == "unet":
        from diffusets_jax.train.diffusion import diffusion_task

        return diffusion_task(config, num_steps)
    if model == "clip":
        from diffusets_jax.train.clip import clip_task

        return clip_task(config, num_steps)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def _load_dataset(model: str, config: ml_collections.ConfigDict) -> Any:
    """The training dataset's builder, refusing one without the fields this model trains on."""
    from diffusets_jax.data import pipeline

    if not config.data.dataset:
        raise ValueError("config.data.dataset is empty: pass --config.data.dataset=DIR (a prepared dataset "
                         "directory, or a TFDS name with --config.data.data_dir)")
    builder = pipeline.load_builder(config.data.dataset, config.data.data_dir or None,
                                    data_dir_flag="--config.data.data_dir")
    missing = [f for f in FIELDS[model] if f not in builder.info.features.keys()]
    if missing:
        if model == "unet" and "ecg" in builder.info.features.keys():
            raise ValueError(f"{config.data.dataset} is a prepared ECG dataset; the U-Net trains on VAE latents: run "
                             "`diffusets-jax encode --vae MODEL_DIR --data-dir ... --out LATENTS` and pass "
                             "--config.data.dataset=LATENTS")
        raise ValueError(f"{config.data.dataset} lacks {missing}: the {model} trains on a prepared ECG dataset"
                         + (" (not a latent dataset)" if "latent_mean" in builder.info.features.keys() else ""))
    return builder


def check_dataset_fits_model(module: Any, builder: Any, dataset: str) -> None:
    """Refuse a dataset whose text embeddings or latents are not the width the model takes, in one line naming
    both and the setting to change, before anything compiles (the mismatch used to surface as an XLA
    broadcasting error from inside the first train step)."""
    features = builder.info.features
    checks = (("text_embedding", "text_dim", "its text embeddings are {n}-d (the embedder it was prepared with)"),
              ("latent_mean", "latent_channels", "its latents have {n} channels (the VAE it was encoded with)"))
    for feature, field, what in checks:
        if feature not in features.keys() or not hasattr(module, field):
            continue
        n = int(features[feature].shape[-1])
        if n != int(getattr(module, field)):
            raise ValueError(f"dataset {dataset}: {what.format(n=n)}, but the model's {field} is "
                             f"{getattr(module, field)}: set --config.model.{field}={n}, or train on a dataset "
                             f"made for this model")


def resolve_from_dataset(model: str, config: ml_collections.ConfigDict, builder: Any, *,
                         latent_scale: float | None = None) -> None:
    """Fill in, in place, what a run reads from its dataset, so the saved config states exactly what ran:
    `data.num_train_examples` (0 = the train split's size) and, with `diffusion.scale_by_std` (U-Net only),
    `diffusion.latent_scale`: 1 / std of the training latents (`data.latents.measure_latent_scale`; deterministic,
    so a resumed run gets the same value). `latent_scale`: the value already measured on this dataset and split,
    not measured again."""
    from diffusets_jax.data.pipeline import split_examples

    examples, given = split_examples(builder, config.data.train_split), int(config.data.num_train_examples)
    if given != 0 and given != examples:
        # It only sizes an epoch (the run reads the whole split): 100000 on a split of 5000 trained 20x the epochs
        # asked for, and a value below the split's size trained on all of it all the same.
        raise ValueError(f"data.num_train_examples={given}, but split {config.data.train_split!r} of "
                         f"{config.data.dataset} has {examples} examples: leave it at 0 (read from the dataset); to "
                         f"train on part of the split, name it, e.g. --config.data.train_split='"
                         f"{config.data.train_split}[:1000]'")
    config.data.num_train_examples = examples
    if model != "unet" or not config.diffusion.scale_by_std:
        return
    if latent_scale is None:
        from diffusets_jax.data.latents import measure_latent_scale

        latent_scale = measure_latent_scale(builder, config.data.train_split)
        log.info("diffusion.scale_by_std: latent scale %.6g (1 / std of the %r latent means)", latent_scale,
                 config.data.train_split)
    config.diffusion.latent_scale = latent_scale


def settings_resolver(model: str, config: ml_collections.ConfigDict,
                      builder: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A run's settings (`run_settings`) -> the same resolved from `builder` as `config` (resolved by
    `resolve_from_dataset`) was: the form in which a run given its own saved config.json (resolved values) and one
    given the config file (the values as written) are compared (`io.run_dir.output_dir`'s `resolve`). Their
    fingerprints differ, and the fingerprint is of the config as given so that existing workdirs still resume."""
    from diffusets_jax.config import config_from_dict

    measured = float(config.diffusion.latent_scale) if model == "unet" and config.diffusion.scale_by_std else None

    def resolve(settings: dict[str, Any]) -> dict[str, Any]:
        try:
            other = config_from_dict(settings["config"])
            resolve_from_dataset(model, other, builder, latent_scale=measured)
        except (KeyError, AttributeError, TypeError, ValueError):  # not a training's settings: compared as they are
            return settings
        return run_settings(model, other)

    return resolve


def run_training(model: str, config: ml_collections.ConfigDict, workdir: str | Path,
                 model_dir: str | Path | None = None, *, overwrite: bool = False) -> TrainResult:
    """Train `model` on `config.data.dataset` into `workdir` (resuming when it holds this run's checkpoints) and
    write the result into `model_dir` (default `workdir/model`).

    The workdir is claimed like every output folder (`io.run_dir.output_dir`, flag `--workdir`): a rerun with the
    same config (up to `RESUMABLE_KEYS`) resumes; another run's or a user's folder is refused unless `overwrite`,
    which replaces it as a whole when this run ends.

    Joins a multi-host run first when the environment describes one (`parallel.initialize_distributed`).
    Resolves `data.num_train_examples` from the dataset, `train.num_steps` from the epochs and, with
    `diffusion.scale_by_std`, the U-Net's latent scale from the latents, so the saved config states exactly what
    ran. Everything that can be checked before training (config kind, dataset, its card, the model directory
    path) is checked first.
    """
    check_model_kind(model, config)
    check_train_section(config)
    settings = run_settings(model, config)  # as given, before the dataset resolves anything
    parallel.initialize_distributed()
    from diffusets_jax.data import pipeline  # TensorFlow: only loaded by commands that read datasets
    from diffusets_jax.data.location import dataset_folder
    from diffusets_jax.io.run_dir import check_output_path, output_dir, reading

    pipeline.keep_tensorflow_off_accelerators()
    command = f"train {model}"
    # The dataset as given (a TFDS name is found under its data dir only once opened, below).
    given = [("--config.data.dataset", dataset_folder(config.data.dataset)),
             ("--config.data.data_dir", config.data.data_dir or None)]
    check_output_path(workdir, "--workdir", command=command, overwrite=overwrite, reads=given)
    own_model_dir = model_dir is None  # the default, WORKDIR/model, lives and is replaced with the workdir
    model_dir = Path(model_dir) if model_dir is not None else Path(workdir) / MODEL_DIR_NAME
    check_output_path(model_dir, "--model-dir", reads=given)
    check_apart(model_dir, workdir)
    model_dirs.check_component_writable(model_dir, model, workdir=workdir, overwrite=overwrite)
    builder = _load_dataset(model, config)
    splits = builder.info.splits
    # `all` (the published all-data recipe) and split expressions are read as the pipeline reads them.
    if not pipeline.has_split(builder, config.data.train_split):
        raise ValueError(f"dataset {config.data.dataset} has no split {config.data.train_split!r} "
                         f"(it has {sorted(splits)}, or {pipeline.ALL_SPLITS!r}, their union); set "
                         "--config.data.train_split")
    provenance_of_data = _dataset_provenance(model, builder, config)  # refuses a dataset without a card, now
    if model == "unet":
        check_latents_fit_model_dir_vae(model_dir, builder, config.data.dataset)
    resolve_from_dataset(model, config, builder)
    num_steps = total_steps(config)
    config.train.num_steps = num_steps
    target = Path(workdir) / MODEL_DIR_NAME if own_model_dir else model_dir
    if model == "vae" and exported_run(target, model) != export_record(workdir, num_steps, config):
        # This run will export a new VAE (a first run, or one extended with more steps): refused now, not after
        # the training, where the directory's U-Net was trained on the VAE there.
        model_dirs.check_vae_replaceable(target, overwrite=overwrite, source="trained")

    mesh = parallel.mesh_from_config(config.mesh)
    host_batch = pipeline.per_host_batch_size(int(config.train.global_batch_size), jax.process_count(),
                                              parallel.num_batch_shards(mesh))
    fields = FIELDS[model]
    seed = int(config.train.seed)

    def train_batches(start_step: int) -> Iterator[dict[str, Any]]:
        return pipeline.train_dataset(builder, config.data.train_split, host_batch_size=host_batch, fields=fields,
                                      seed=seed, start_step=start_step).as_numpy_iterator()

    val_batches: Callable[[], Iterable[dict[str, Any]]] | None = None
    if pipeline.has_split(builder, config.data.val_split):
        val_split = config.data.val_split

        def val_batches() -> Iterable[dict[str, Any]]:
            # A fixed, seeded selection of full batches: the same examples at every evaluation.
            stream = pipeline.train_dataset(builder, val_split, host_batch_size=host_batch, fields=fields,
                                            seed=seed + 1, start_step=0).as_numpy_iterator()
            return itertools.islice(stream, int(config.train.eval_batches))
    elif config.data.val_split and config.data.val_split != DEFAULT_VAL_SPLIT:
        # Another split than the recipes' named and absent is most likely a typo (`val_split=valid`): it trained for
        # days without validation, said only by a warning among the first log lines.
        raise ValueError(f"dataset {config.data.dataset} has no split {config.data.val_split!r} (it has "
                         f"{sorted(splits)}); set --config.data.val_split to one of them, or to '' for no periodic "
                         "validation")
    else:
        log.warning("dataset has no %r split: no periodic validation", config.data.val_split)

    task = make_task(model, config, num_steps)
    check_dataset_fits_model(task.model, builder, config.data.dataset)
    reads = [("--config.data.dataset", builder.data_dir), ("--config.data.data_dir", config.data.data_dir or None)]
    with contextlib.ExitStack() as held:
        # Held while training: a prepare or encode --overwrite of the dataset is refused rather than crash us
        # mid-run. A host that finds the dataset being replaced stops every host, not only itself.
        with parallel.failing_together():
            held.enter_context(reading(builder.data_dir))
        run = held.enter_context(output_dir(workdir, command=command, settings=settings, overwrite=overwrite,
                                            flag="--workdir", reads=reads,
                                            resolve=settings_resolver(model, config, builder)))
        check_same_dataset_build(run.path, builder, config.data.dataset)
        result = train(task, config, run.path, train_batches, val_batches, mesh)
        if not result.preempted:
            # Every process takes part (with fsdp over hosts each holds only slices of the weights); process 0 writes.
            variables = trained_variables(result.state)
            if jax.process_index() == 0:
                try:
                    export_state(model, task, config, variables, result.step, run.final,
                                 run.path / MODEL_DIR_NAME if own_model_dir else model_dir, provenance_of_data,
                                 builder, overwrite=overwrite)
                except ValueError as err:  # e.g. another run exported into --model-dir while this one trained
                    if run.path != run.final:  # an --overwrite's staging folder: the same command resumes it
                        raise
                    # Refused only now, after the training: say that it is kept and how to export it elsewhere
                    # (the same command with another --model-dir is another run's settings).
                    raise ValueError(f"{err} (this training is complete and kept in {run.final}: `diffusets-jax "
                                     f"train {model} --config {run.final / 'config.json'} --workdir {run.final} "
                                     "--export-only --model-dir DIR` writes it into another directory)") from None
            run.mark_complete(step=result.step)
    return result


def check_apart(model_dir: Path, workdir: str | Path) -> None:
    """The model directory and the workdir must not overlap (WORKDIR/model aside): the export would otherwise land
    among the run's checkpoints (`--model-dir` = the workdir) or its component folder be the workdir itself
    (`--model-dir runs --workdir runs/vae`), refused only at the end of the training."""
    work, model = Path(workdir).resolve(), Path(model_dir).resolve()
    if model == work / MODEL_DIR_NAME:
        return
    if model == work or work.is_relative_to(model) or model.is_relative_to(work):
        raise ValueError(f"--model-dir {model_dir} overlaps --workdir {workdir}: give a folder outside it, or leave "
                         f"--model-dir out for WORKDIR/{MODEL_DIR_NAME}")


DATASET_BUILD_FILE = "dataset_build.json"  # in the workdir: which build of the dataset this run trains on


def check_same_dataset_build(workdir: Path, builder: Any, dataset: str, *, export: bool = False) -> None:
    """Refuse to resume a training on another build of its dataset (prepared or encoded again at the same path):
    the run's fingerprint names the dataset by path, and its checkpoints would go on with other examples. The
    build is the dataset card's fingerprint, recorded in the workdir when the run starts (a run begun before this
    record existed gets it on its next resume). `export`: refuse exporting the run with another build (its
    provenance and a U-Net's conditioning come from the dataset), recording nothing: an export only reads."""
    from diffusets_jax.data.card import card_fingerprint
    from diffusets_jax.io.files import read_json, write_json_atomic

    current, record = card_fingerprint(builder), Path(workdir) / DATASET_BUILD_FILE
    if record.is_file():
        recorded = read_json(record, "dataset build record")
        if recorded.get("card") != current:
            todo = (f"export with the dataset the run trained on ({recorded.get('dataset')})" if export
                    else "train into a new --workdir, or pass --overwrite to start over on this build")
            raise ValueError(f"--workdir {workdir} holds a training on another build of {dataset} (its dataset card "
                             f"changed: prepared or encoded again at that path): {todo}")
    elif jax.process_index() == 0 and not export:
        write_json_atomic(record, {"dataset": str(Path(builder.data_dir).resolve()), "card": current})


# Config keys an export may give otherwise than the run did (besides RESUMABLE_KEYS, which no run's settings hold):
# where the data lives. A dataset moved or mounted elsewhere since the training is read at its new path; that it is
# the build the run trained on is checked against the run's dataset_build.json. Everything else changes what the
# exported component is or says (its architecture, a U-Net's prediction type or patient features, EMA or not).
EXPORT_FREE_KEYS: tuple[str, ...] = ("data.dataset", "data.data_dir")


def check_export_config(model: str, config: ml_collections.ConfigDict, workdir: Path, record: dict[str, Any],
                        builder: Any) -> None:
    """Refuse to export the run in `workdir` with a config (resolved) that differs from the run's in anything but
    `EXPORT_FREE_KEYS`: the model directory would record, and sampling use, another parameterisation or conditioning
    than the weights were trained with (an epsilon export of a v-prediction run exported with exit 0). The run's
    settings are its run record's, else its saved config.json's; a run with neither is left to the restore, which
    refuses weights of other shapes."""
    from diffusets_jax.config import load_config
    from diffusets_jax.io.run_dir import differences, fingerprint

    saved = workdir / "config.json"
    if record.get("settings") is not None:
        reference = record["settings"]
    elif saved.is_file():
        reference = run_settings(model, load_config(saved))
    else:
        return
    resolve = settings_resolver(model, config, builder)
    theirs, ours = copy.deepcopy(resolve(reference)), run_settings(model, config)  # the record stays as read
    for settings in (theirs, ours):
        _without(settings.get("config", {}), EXPORT_FREE_KEYS)
    if fingerprint(theirs) != fingerprint(ours):
        raise ValueError(f"the given config differs from the run in {workdir} ({differences(theirs, ours)}), which changes "
                         f"what its export means: export with the config the run saved, --config {saved}")


def check_latents_fit_model_dir_vae(model_dir: Path, builder: Any, dataset: str) -> None:
    """Refuse to train (or export) a U-Net into a model directory whose VAE is not the one that encoded its latents
    (the latent dataset's card names it): `sample` refuses such a directory, so the training would only be found
    useless at its end. A directory without a VAE yet, or latents that do not name theirs, are left as they are."""
    from diffusets_jax.data.card import read_card

    encoded_by = (read_card(builder).get("derived_from", {}).get("vae") or {})
    there = model_dirs.read_index(model_dir).components.get("vae", {}).get("uid")
    wanted = encoded_by.get("uid")
    if wanted and there and wanted != there:
        raise ValueError(f"--model-dir {model_dir} holds VAE {there[:8]}, but the latents of {dataset} were encoded by "
                         f"VAE {wanted[:8]} (of {encoded_by.get('model_dir', 'another model directory')}): `sample` "
                         "refuses a U-Net with another VAE's latents. Give the --model-dir of the VAE that encoded "
                         "them, or encode with this one (`diffusets-jax encode --vae "
                         f"{model_dir}`) and train on those latents")


def _dataset_provenance(model: str, builder: Any, config: ml_collections.ConfigDict) -> dict[str, Any]:
    from diffusets_jax.data.card import dataset_reference, read_card

    reference = dataset_reference(builder, config.data.train_split)
    if model == "unet":
        read_card(builder)  # the U-Net's conditioning comes from it: refuse a dataset that does not say
    return reference


def trained_variables(state: Any) -> dict[str, Any]:
    """The variables a training exports, `{"params": EMA params when on, **model_state}`, as host numpy arrays.
    On several hosts every process must call it: with fsdp over hosts each holds only slices of them."""
    return {"params": parallel.host_values(state.eval_params()), **parallel.host_values(state.model_state)}


def export_record(workdir: str | Path, step: int, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Which training run, step and config an export comes from: its `provenance["run"]` in the model index."""
    from diffusets_jax.config import config_to_dict
    from diffusets_jax.io.run_dir import fingerprint

    return {"workdir": str(Path(workdir).resolve()), "step": int(step),
            "config_fingerprint": fingerprint(config_to_dict(config))}


def exported_run(model_dir: str | Path, model: str) -> dict[str, Any] | None:
    """The `export_record` of the component `model` of `model_dir`; None where there is none."""
    return model_dirs.read_index(model_dir).components.get(model, {}).get("provenance", {}).get("run")


def export_state(model: str, task: Task, config: ml_collections.ConfigDict, variables: dict[str, Any], step: int,
                 workdir: str | Path, model_dir: str | Path, dataset: dict[str, Any], builder: Any, *,
                 overwrite: bool = False) -> Path:
    """Write the trained component `variables` (`trained_variables`) into `model_dir` with its provenance; its
    folder. `overwrite` lets it replace a component another run or a conversion put there.

    Idempotent: when the directory already holds this run's component from the same step and config, it is kept
    as is (a finished run rerun, e.g. a resumed demo, does not give its VAE a new uid under the U-Net's feet)."""
    from diffusets_jax.config import config_to_dict

    run = export_record(workdir, step, config)
    if exported_run(model_dir, model) == run:  # this very checkpoint is already there (a rerun of a finished
        return Path(model_dir) / model         # run): keep its uid
    provenance = {"source": "trained", "dataset": dataset, "run": run, "config": config_to_dict(config)}
    if model != "unet":
        from diffusets_jax.data.card import card_conditioning, read_card

        # A CLIP records the embeddings its text tower learnt from (evaluate checks a dataset's against them).
        conditioning = card_conditioning(read_card(builder), str(builder.data_dir)) if model == "clip" else None
        path = model_dirs.write_component(model_dir, model, task.model, variables, provenance=provenance,
                                          conditioning=conditioning, overwrite=overwrite)
    else:
        from diffusets_jax.data.card import card_conditioning, read_card
        from diffusets_jax.data.latents import measure_latent_moments
        from diffusets_jax.diffusion.sampler_validation import validate_model_defaults
        from diffusets_jax.train.diffusion import diffusion_spec

        card = read_card(builder)
        conditioning = card_conditioning(card, str(builder.data_dir)).with_patient_features(
            str(config.train.patient_features))
        # The scaled latents the U-Net saw (posterior means): the scale fast samplers are validated at.
        mean, std = measure_latent_moments(builder, config.data.train_split)
        scale = float(config.diffusion.latent_scale)
        spec = diffusion_spec(config, latent_std=scale * std)
        vae_uid = card.get("derived_from", {}).get("vae", {}).get("uid")
        path = model_dirs.write_component(model_dir, "unet", task.model, variables, provenance=provenance,
                                          conditioning=conditioning, diffusion=spec, vae_uid=vae_uid,
                                          sampling=validate_model_defaults(spec, latent_mean=scale * mean),
                                          overwrite=overwrite)
    log.info("exported %s to %s", model, path)
    return path


def export_latest(model: str, config: ml_collections.ConfigDict, workdir: str | Path,
                  model_dir: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the latest checkpoint's component into `model_dir` (default `workdir/model`); its folder.

    For exporting a run that is still going or was preempted; `run_training` exports by itself at the end.
    """
    from diffusets_jax.io.files import read_json
    from diffusets_jax.io.run_dir import RUN_FILE
    from diffusets_jax.train.loop import abstract_state, checkpoint_manager, restore_latest

    check_model_kind(model, config)
    workdir = Path(workdir)
    model_dir = Path(model_dir) if model_dir is not None else workdir / MODEL_DIR_NAME
    model_dirs.check_component_writable(model_dir, model, workdir=workdir, overwrite=overwrite)
    if not (workdir / "checkpoints").is_dir():  # before Orbax would create it in a folder that is not a run
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
    run = read_json(workdir / RUN_FILE, "run record") if (workdir / RUN_FILE).is_file() else {}
    if run.get("command", f"train {model}") != f"train {model}":  # its checkpoints are another model's
        raise ValueError(f"--workdir {workdir} holds a diffusets-jax {run['command']} run, not train {model}: export "
                         f"it with `diffusets-jax {run['command']} --export-only`, or give the {model} run's workdir")
    manager = checkpoint_manager(workdir / "checkpoints", int(config.train.keep_checkpoints), async_save=False)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
    builder = _load_dataset(model, config)
    dataset = _dataset_provenance(model, builder, config)
    if model == "unet":
        check_latents_fit_model_dir_vae(model_dir, builder, config.data.dataset)
    resolve_from_dataset(model, config, builder)
    check_export_config(model, config, workdir, run, builder)
    check_same_dataset_build(workdir, builder, config.data.dataset, export=True)
    task = make_task(model, config, max(int(config.train.num_steps), 1))
    mesh = parallel.mesh_from_config(config.mesh)
    abstract, _ = abstract_state(task, mesh, int(config.train.seed), float(config.train.ema_decay) > 0)
    try:  # a reader: the checkpoints stay as they are, whatever it finds (the training may be running)
        state, _, step = restore_latest(manager, abstract, set_aside=False)
    except ValueError as err:
        raise ValueError(f"{err}: with another config than the run's they do not fit; export with the one it "
                         f"saved, --config {workdir / 'config.json'}") from None
    finally:
        manager.close()
    return export_state(model, task, config, trained_variables(state), step, workdir, model_dir, dataset, builder,
                        overwrite=overwrite)
