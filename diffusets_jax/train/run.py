"""`diffusets-jax train {vae,unet,clip}`: config -> mesh -> prepared dataset -> trainer -> the generic loop."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections

from diffusets_jax import parallel
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


def resolve_latent_scale(model: str, config: ml_collections.ConfigDict, builder: Any = None) -> None:
    """With `train.scale_by_std` (U-Net only), set `train.latent_scale` to 1 / std of the latent dataset's
    training latents (`data.latents.measure_latent_scale`; deterministic, so a resumed run gets the same value).
    `builder`: the already loaded `config.data` dataset; None loads it (dataset and data_dir) only when needed."""
    if model != "unet" or not config.train.get("scale_by_std", False):
        return
    from diffusets_jax.data import pipeline
    from diffusets_jax.data.latents import measure_latent_scale

    if builder is None:
        builder = pipeline.load_builder(config.data.dataset, config.data.data_dir or None)
    config.train.latent_scale = measure_latent_scale(builder, config.data.train_split)
    log.info("train.scale_by_std: latent scale %.6g (1 / std of the %r latent means)", config.train.latent_scale,
             config.data.train_split)


def run_training(model: str, config: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    """Train `model` on `config.data.dataset` into `workdir` (resuming when it holds checkpoints).

    Joins a multi-host run first when the environment describes one (`parallel.initialize_distributed`).
    Resolves `data.num_train_examples` from the dataset, `train.num_steps` from the epochs and, with
    `train.scale_by_std`, the U-Net's `train.latent_scale` from the latents, so the saved config states
    exactly what ran.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if not config.data.dataset:
        raise ValueError("config.data.dataset is empty: pass --config.data.dataset=DIR (a prepared dataset "
                         "directory, or a TFDS name with --config.data.data_dir)")
    parallel.initialize_distributed()
    from diffusets_jax.data import pipeline  # TensorFlow: only loaded by commands that read datasets

    pipeline.keep_tensorflow_off_accelerators()
    builder = pipeline.load_builder(config.data.dataset, config.data.data_dir or None)
    splits = builder.info.splits
    if config.data.train_split not in splits:
        raise ValueError(f"dataset {config.data.dataset} has no split {config.data.train_split!r} "
                         f"(it has {sorted(splits)}); set --config.data.train_split")
    if int(config.data.num_train_examples) <= 0:
        config.data.num_train_examples = int(splits[config.data.train_split].num_examples)
    num_steps = total_steps(config)
    config.train.num_steps = num_steps
    resolve_latent_scale(model, config, builder)

    mesh = parallel.mesh_from_config(config.mesh)
    host_batch = pipeline.per_host_batch_size(int(config.train.global_batch_size), jax.process_count(),
                                              parallel.num_batch_shards(mesh))
    fields = FIELDS[model]
    seed = int(config.train.seed)

    def train_batches(start_step: int) -> Iterator[dict[str, Any]]:
        return pipeline.train_dataset(builder, config.data.train_split, host_batch_size=host_batch, fields=fields,
                                      seed=seed, start_step=start_step).as_numpy_iterator()

    val_batches: Callable[[], Iterable[dict[str, Any]]] | None = None
    if config.data.val_split in splits:
        val_split = config.data.val_split

        def val_batches() -> Iterable[dict[str, Any]]:
            # A fixed, seeded selection of full batches: the same examples at every evaluation.
            stream = pipeline.train_dataset(builder, val_split, host_batch_size=host_batch, fields=fields,
                                            seed=seed + 1, start_step=0).as_numpy_iterator()
            return itertools.islice(stream, int(config.train.eval_batches))
    else:
        log.warning("dataset has no %r split: no periodic validation", config.data.val_split)

    task = make_task(model, config, num_steps)
    return train(task, config, workdir, train_batches, val_batches, mesh)


def export_latest(model: str, config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Write `workdir/export/<model>` from the latest checkpoint (EMA params when on); returns the directory.

    For exporting a run that is still going or was preempted; `run_training` exports by itself at the end.
    """
    from diffusets_jax.train.loop import abstract_state, checkpoint_manager, restore_state

    workdir = Path(workdir)
    manager = checkpoint_manager(workdir / "checkpoints", int(config.train.keep_checkpoints), async_save=False)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
    if int(config.data.num_train_examples) <= 0:  # only the schedules' lengths depend on it, not the weights
        config.data.num_train_examples = int(config.train.global_batch_size)
    resolve_latent_scale(model, config)
    task = make_task(model, config, max(int(config.train.num_steps), 1))
    mesh = parallel.mesh_from_config(config.mesh)
    abstract, _ = abstract_state(task, mesh, int(config.train.seed), float(config.train.ema_decay) > 0)
    state, _ = restore_state(manager, step, abstract)
    manager.close()
    if task.export is None:
        raise ValueError(f"the {model} trainer has no export")
    task.export(workdir / "export", jax.device_get(state.eval_params()), jax.device_get(state.model_state))
    return workdir / "export" / model
