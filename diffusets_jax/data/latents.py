"""The latent dataset: a prepared ECG dataset run once through the VAE encoder (`diffusets-jax encode`).

Diffusion training works on VAE latents; encoding every batch again on every step wastes most of the
compute. `encode_dataset` writes, per split, TFRecord shards whose examples hold the encoder's posterior
(`latent_mean`, `latent_logvar`, each `(128, 4)`) plus the conditions. The output directory is a TFDS
dataset (`dataset_info.json` written with `tfds.folder_dataset.write_metadata`), so the same input pipeline
reads it: `pipeline.train_dataset(builder, "train", fields=pipeline.LATENT_FIELDS, ...)`. The train step
then draws a fresh latent each step with `models.vae.VAE.sample_latent` (z = (mean + exp(logvar / 2) eps)
* scale, the published 0.18215 or one measured by `measure_latent_scale`), as the reference does when it
encodes on the fly.

Writing is resumable and crash-safe: shard `i` of a split always holds the same source examples
(`split[i * n : (i + 1) * n]`, in stored order), is written to a temporary file and moved into place with
`os.replace`, and `latent_index.json` (rewritten atomically after each shard) lists the finished shards,
so a rerun skips them. Records whose ECG or latent is not finite are skipped and counted, not fatal.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding

from diffusets_jax import parallel
from diffusets_jax.data import pipeline
from diffusets_jax.data.card import (
    card_conditioning,
    card_fingerprint,
    dataset_reference,
    read_card,
    write_card,
)
from diffusets_jax.data.shards import example_serializer, shard_filename, write_shard, write_tfds_metadata
from diffusets_jax.ecg.shapes import ECG_LENGTH, LATENT_CHANNELS, LATENT_LENGTH, NUM_LEADS
from diffusets_jax.io.files import read_json, remove_temporaries_in, write_json_atomic
from diffusets_jax.io.run_dir import add_readers_lock, fingerprint

INDEX_FILE = "latent_index.json"
INDEX_FORMAT = "diffusets-jax latents v1"
# Conditions copied from the source example next to the latent.
CONDITION_KEYS: tuple[str, ...] = ("text_embedding", "sex", "age", "heart_rate", "prompt", "subject_id", "study_id")
DEFAULT_SPLITS: tuple[str, ...] = ("train", "validation", "test")  # "all" would only duplicate them

# `apply_fn(variables, ecg)` -> `(mean, logvar)`: ecg (batch, 1024, 12) -> each (batch, 128, 4).
EncodeApply = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def latent_features(embedding_dim: int) -> tfds.features.FeaturesDict:
    """Features of one latent example; `embedding_dim` is the source dataset's text embedding size.

    - `latent_mean`, `latent_logvar` (128, 4) float32: the VAE encoder's posterior, channels last
    - `text_embedding` (embedding_dim,) float32, `sex` int32, `age` float32, `heart_rate` float32, `prompt`,
      `subject_id`, `study_id` int64: copied from the source example (see `schema.ecg_features`)
    """
    latent = tfds.features.Tensor(shape=(LATENT_LENGTH, LATENT_CHANNELS), dtype=np.float32)
    return tfds.features.FeaturesDict(
        {
            "latent_mean": latent,
            "latent_logvar": latent,
            "text_embedding": tfds.features.Tensor(shape=(embedding_dim,), dtype=np.float32),
            "sex": tfds.features.Scalar(dtype=np.int32),
            "age": tfds.features.Scalar(dtype=np.float32),
            "heart_rate": tfds.features.Scalar(dtype=np.float32),
            "prompt": tfds.features.Text(),
            "subject_id": tfds.features.Scalar(dtype=np.int64),
            "study_id": tfds.features.Scalar(dtype=np.int64),
        }
    )


def load_vae_encoder(model_dir: str | os.PathLike) -> tuple[EncodeApply, Any, dict[str, Any]]:
    """`(apply_fn, variables, vae_reference)` for the VAE of a model directory.

    `vae_reference` (`{"model_dir", "uid", "provenance"}`) goes into the latent dataset's index and card, so a
    resume with another VAE is refused and the U-Net trained on these latents records which VAE they need.
    """
    from diffusets_jax.models import model_dir as model_dirs
    from diffusets_jax.models.vae import VAE

    with model_dirs.reading(model_dir):  # the uid recorded is that of the weights loaded, whoever writes there now
        index = model_dirs.read_index(model_dir)
        model_dirs.require(index, model_dir, "vae")
        module, variables = model_dirs.load_component(model_dir, "vae")
    if not isinstance(module, VAE):
        raise ValueError(f"{os.path.join(os.fspath(model_dir), 'vae')} holds a {type(module).__name__}, not a VAE")
    latent = (ECG_LENGTH // int(module.downsampling), int(module.latent_channels))
    if latent != (LATENT_LENGTH, LATENT_CHANNELS):
        # A latent dataset's features (and the U-Net trained on it) are (128, 4) latents: such a VAE's (e.g. four
        # widths' (64, 4)) fit neither, and nothing refused it before the encoding started.
        raise ValueError(f"{os.path.join(os.fspath(model_dir), 'vae')} makes {latent} latents from (1024, 12) ECGs, "
                         f"and latent datasets and U-Nets take ({LATENT_LENGTH}, {LATENT_CHANNELS}) ones: encode with a "
                         f"VAE of {int(math.log2(ECG_LENGTH // LATENT_LENGTH))} widths and {LATENT_CHANNELS} latent "
                         "channels")

    def encode(variables: Any, ecg: jax.Array) -> tuple[jax.Array, jax.Array]:
        return module.apply(variables, ecg, method=VAE.encode)

    entry = index.components["vae"]
    reference = {"model_dir": os.path.abspath(os.fspath(model_dir)), "uid": entry.get("uid"),
                 "provenance": entry.get("provenance", {})}
    return encode, variables, reference


def measure_latent_moments(source: tfds.core.DatasetBuilder | str | os.PathLike, split: str = "train", *,
                           max_examples: int = 4096) -> tuple[float, float]:
    """(mean, standard deviation) of the posterior means of the first `max_examples` of `split`, in stored order
    (unscaled). Deterministic, and the same on every host (each reads the same leading examples). The latents are
    held as read while they are (`io.run_dir.reading`): `train unet` measures them before it holds them for its run."""
    from diffusets_jax.io.run_dir import reading

    builder = pipeline.load_builder(source)
    try:
        n = min(int(max_examples), pipeline.split_examples(builder, split))
    except ValueError:
        raise ValueError(f"{builder.data_dir}: no split {split!r} to measure the latents on "
                         f"(it has {sorted(builder.info.splits)})") from None
    if n < 1:
        raise ValueError(f"{builder.data_dir}: split {split!r} is empty; cannot measure its latents")
    total = total_sq = count = 0.0
    with reading(builder.data_dir):
        # The first n of the split as a whole: TFDS slices neither `all` nor a sum (`train+validation[:n]`
        # would slice only its last part). One file at a time, so that they are the first n in stored order: TFDS
        # otherwise interleaves 16 files, and `take` would sample the first 16 shards instead.
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                read_config=tfds.ReadConfig(interleave_cycle_length=1),
                                decoders=tfds.decode.PartialDecoding({"latent_mean": True})).take(n)
        for batch in tfds.as_numpy(ds.batch(256)):
            values = np.asarray(batch["latent_mean"], np.float64)
            total, total_sq, count = total + values.sum(), total_sq + np.square(values).sum(), count + values.size
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"{builder.data_dir}: the latent means of {split!r} have standard deviation {std}: "
                         "re-encode with a trained VAE")
    return mean, std


def measure_latent_scale(source: tfds.core.DatasetBuilder | str | os.PathLike, split: str = "train", *,
                         max_examples: int = 4096) -> float:
    """1 / standard deviation of the posterior means of the first `max_examples` of `split` (`measure_latent_moments`).

    The scale that gives the diffusion model unit-variance latents (latent diffusion's `scale_by_std`, which
    measures the first batch): the published 0.18215 suits Stable Diffusion's VAE, not one trained from scratch.
    """
    return 1.0 / measure_latent_moments(source, split, max_examples=max_examples)[1]


def _open_index(out_dir: str, expected: dict, source_card: str, legacy_source_card: str) -> dict:
    """The existing index when resuming (checking it was made from the same source and settings), or a new one.

    `source_card`: `data.card.card_fingerprint` of the source, the one identity of a dataset build that every
    command uses. A dataset rebuilt in place (`prepare --overwrite`, same path and version) has another one, and a
    half-done encoding of the old build must not be resumed with the new: that would mix latents and embeddings of
    two builds. Indexes written before it was recorded take it now. `legacy_source_card`: what earlier versions
    recorded (the fingerprint of `read_card`'s card). The two differ only for a dataset without a card file, whose
    card `read_card` makes up from its config and so did not change on a rebuild; an index holding that value is
    resumed as before, once, and then records the build's own identity."""
    path = os.path.join(out_dir, INDEX_FILE)
    if not os.path.exists(path):
        return {**expected, "source_card": source_card, "splits": {}, "complete": False}
    index = read_json(path, "latent dataset index")
    for key, value in expected.items():
        if index.get(key) != value:
            raise ValueError(
                f"{path} was written with {key}={index.get(key)!r}, not {value!r}: resume with the same arguments "
                "or choose a new --out directory"
            )
    if index.get("source_card") == legacy_source_card:
        index["source_card"] = source_card
    if index.setdefault("source_card", source_card) != source_card:
        raise ValueError(f"{path} was encoded from another build of {expected['source']['name']} (its dataset card "
                         "has changed: it was prepared again since): encode into a new --out directory")
    return index


def _encode_shard(builder: tfds.core.DatasetBuilder, source_split: str, encode: Callable, batch_size: int,
                  batch_sharding: NamedSharding, path: str, serialize: Callable[[dict[str, Any]], bytes],
                  ) -> tuple[int, int, int]:
    """Encode one slice of the source into the TFRecord shard `path`, each example through `serialize`;
    (written, skipped, bytes)."""
    decoders = tfds.decode.PartialDecoding({key: True for key in ("ecg", *CONDITION_KEYS)})
    source = builder.as_dataset(split=source_split, shuffle_files=False, decoders=decoders)
    skipped = 0

    def records():
        nonlocal skipped
        for batch in source.batch(batch_size).prefetch(2).as_numpy_iterator():
            ecg = batch["ecg"]
            count = ecg.shape[0]
            finite_input = np.isfinite(ecg).all(axis=(1, 2))
            padded = np.zeros((batch_size, ECG_LENGTH, NUM_LEADS), np.float32)  # one shape: one compilation
            padded[:count][finite_input] = ecg[finite_input]
            mean, logvar = encode(jax.device_put(padded, batch_sharding))
            mean, logvar = np.asarray(mean)[:count], np.asarray(logvar)[:count]
            keep = finite_input & np.isfinite(mean).all(axis=(1, 2)) & np.isfinite(logvar).all(axis=(1, 2))
            skipped += int(count - keep.sum())
            for i in np.flatnonzero(keep):
                example = {key: batch[key][i] for key in CONDITION_KEYS}
                example.update(latent_mean=mean[i], latent_logvar=logvar[i])
                yield serialize(example)

    written, num_bytes = write_shard(path, records())
    return written, skipped, num_bytes


def check_source(source: tfds.core.DatasetBuilder | str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 splits: Sequence[str] | None = None) -> tfds.core.DatasetBuilder:
    """The prepared dataset to encode, refusing (before any VAE is loaded) one that is not a prepared ECG dataset,
    lacks a requested split, or says nothing of its conditioning (no dataset card)."""
    builder = pipeline.load_builder(source, data_dir)
    missing = [key for key in ("ecg", *CONDITION_KEYS) if key not in builder.info.features.keys()]
    if missing:
        raise ValueError(f"dataset {builder.name!r} lacks {missing}: it is not a prepared ECG dataset (schema.ecg_features)")
    unknown = [s for s in splits or () if s not in builder.info.splits]
    if unknown:
        raise ValueError(f"dataset {builder.name!r} has no split(s) {unknown}; it has {sorted(builder.info.splits)}")
    read_card(builder)
    return builder


def encode_dataset(source: tfds.core.DatasetBuilder | str | os.PathLike, out_dir: str | os.PathLike,
                   apply_fn: EncodeApply, variables: Any, *, vae: dict[str, Any],
                   splits: Sequence[str] | None = None, batch_size: int = 256, examples_per_shard: int = 8192,
                   data_dir: str | os.PathLike | None = None, progress: bool = False, overwrite: bool = False) -> dict:
    """Encode every example of `splits` of a prepared dataset into a latent dataset at `out_dir`; the index.

    `apply_fn(variables, ecg)` runs the encoder (`load_vae_encoder` gives it and the `vae` reference for a model
    directory); it is jitted once with the batch sharded over this process's devices and the variables
    replicated. The index records the VAE's uid so a resume with a different VAE is refused. Returns the index
    (also written to `out_dir/latent_index.json`): per split the shards, examples written and records skipped.
    The finished dataset gets a card (`data.card`) carrying the source's conditioning and the VAE's reference.
    """
    builder = check_source(source, data_dir, splits)
    features = builder.info.features
    splits = list(splits) if splits else [s for s in DEFAULT_SPLITS if s in builder.info.splits] or sorted(builder.info.splits)
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    if jax.process_count() > 1:
        raise ValueError(
            "encode runs as one process over that host's devices (every process would write the same shards): "
            "start it without jax.distributed"
        )
    devices = jax.local_devices()
    if batch_size < 1 or batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} must be a positive multiple of the {len(devices)} local devices")
    source_card = read_card(builder)  # before any work: a dataset that says nothing of its conditioning is refused
    embedding_dim = int(features["text_embedding"].shape[0])
    dataset_name = f"{builder.name}_latents"
    expected = {
        "format": INDEX_FORMAT,
        "source": {"name": builder.name, "version": str(builder.info.version)},
        "vae": vae.get("uid") or vae["model_dir"],
        "examples_per_shard": examples_per_shard,
        "embedding_dim": embedding_dim,
        "latent_shape": [LATENT_LENGTH, LATENT_CHANNELS],
        "dataset_name": dataset_name,
    }
    from diffusets_jax.io.run_dir import READERS_LOCK, RUN_FILE, exclusive_lock, output_dir, reading

    # The folder is claimed like every output folder: a rerun of the same encoding resumes, anything else in it
    # is refused unless `overwrite` (replaced as a whole at the end).
    settings = {**expected, "source_path": os.path.abspath(os.fspath(builder.data_dir)), "splits": splits}
    reads = [("--vae", vae.get("model_dir")), ("--dataset", builder.data_dir), ("--data-dir", data_dir)]
    guards = contextlib.ExitStack()
    guards.enter_context(reading(builder.data_dir))  # no prepare --overwrite swaps the source under us
    if overwrite and os.path.isfile(os.path.join(out_dir, RUN_FILE)):
        # An earlier encoding a training may be reading now (`reading`): held until ours has replaced it.
        guards.enter_context(exclusive_lock(out_dir, f"--overwrite: {out_dir} is being read by a run now (a training "
                                            "on these latents): wait for it to finish, or encode into another --out",
                                            name=READERS_LOCK))
    with guards, output_dir(out_dir, command="encode", settings=settings, overwrite=overwrite, reads=reads) as run:
        index = _encode_into(os.fspath(run.path), builder, source_card, expected, splits, apply_fn, variables, vae,
                             batch_size, progress)
        run.mark_complete(**{split: sum(s["num_examples"] for s in entry["shards"])
                             for split, entry in index["splits"].items()})
    return index


def _encode_into(out_dir: str, builder: tfds.core.DatasetBuilder, source_card: dict, expected: dict,
                 splits: list[str], apply_fn: EncodeApply, variables: Any, vae: dict[str, Any], batch_size: int,
                 progress: bool) -> dict:
    """`encode_dataset`'s work inside its claimed folder `out_dir`."""
    index_path = os.path.join(out_dir, INDEX_FILE)
    examples_per_shard, embedding_dim = expected["examples_per_shard"], expected["embedding_dim"]
    dataset_name = expected["dataset_name"]
    index = _open_index(out_dir, expected, card_fingerprint(builder), fingerprint(source_card))
    latent = latent_features(embedding_dim)
    serialize = example_serializer(latent)
    devices = jax.local_devices()

    mesh = parallel.make_mesh(devices=devices)
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    variables = jax.device_put(variables, replicated)
    encode_jit = jax.jit(apply_fn, in_shardings=(replicated, batch_sharding), out_shardings=(batch_sharding, batch_sharding))
    encode = lambda ecg: encode_jit(variables, ecg)

    jobs = []
    for split in splits:
        total = builder.info.splits[split].num_examples
        num_shards = max(1, -(-total // examples_per_shard))
        entry = index["splits"].setdefault(split, {"source_examples": total, "shards": [None] * num_shards})
        if entry["source_examples"] != total:
            raise ValueError(
                f"{index_path} was written for {entry['source_examples']} {split!r} examples but the dataset now has "
                f"{total}: it was re-prepared; encode into a new --out directory"
            )
        for shard in range(num_shards):
            filename = shard_filename(dataset_name, split, shard, num_shards)
            done = entry["shards"][shard]
            if done is None or not os.path.exists(os.path.join(out_dir, filename)):
                jobs.append((split, shard, filename))
    write_json_atomic(index_path, index, indent=1)

    from diffusets_jax.io.progress import progress_bar

    bar = progress_bar(len(jobs), unit="shard", desc="encode", disable=not progress)
    for split, shard, filename in jobs:
        start = shard * examples_per_shard
        end = min(start + examples_per_shard, index["splits"][split]["source_examples"])
        written, skipped, num_bytes = _encode_shard(
            builder, f"{split}[{start}:{end}]", encode, batch_size, batch_sharding, os.path.join(out_dir, filename),
            serialize)
        index["splits"][split]["shards"][shard] = {
            "file": filename, "source": [start, end], "num_examples": written, "skipped": skipped, "num_bytes": num_bytes}
        write_json_atomic(index_path, index, indent=1)
        bar.update(1)
        bar.set_postfix(split=split, skipped=sum(_skipped(index).values()), refresh=False)  # at the bar's pace
    bar.close()
    # Every shard is written, so a temporary left in the folder now is a killed run's (a half-written shard, up to
    # a shard's size each time, or the index): ours, in this claimed folder, which one process writes alone.
    remove_temporaries_in(out_dir)

    write_tfds_metadata(
        out_dir, dataset_name, latent,
        {split: [s["num_examples"] for s in entry["shards"]] for split, entry in index["splits"].items()},
        description=(f"VAE posteriors (latent_mean, latent_logvar) of {builder.name} {builder.info.version}, encoded "
                     f"by the VAE of {vae['model_dir']}, with the conditions; written by `diffusets-jax encode`."))
    write_card(out_dir, kind="latents", name=dataset_name, config=source_card.get("config"),
               version=str(builder.info.version), conditioning=card_conditioning(source_card),
               splits={split: sum(s["num_examples"] for s in entry["shards"]) for split, entry in index["splits"].items()},
               derived_from={"dataset": dataset_reference(builder), "vae": vae})
    add_readers_lock(out_dir)
    index["complete"] = True
    write_json_atomic(index_path, index, indent=1)
    return index


def _skipped(index: dict) -> dict[str, int]:
    return {split: sum(s["skipped"] for s in entry["shards"] if s) for split, entry in index["splits"].items()}
