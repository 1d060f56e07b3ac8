"""The tf.data input pipeline: prepared TFDS datasets -> per-host numpy batches.

Each process reads its own slice of a split (`tfds.split_for_jax_process`), shuffles it with a seed and
batches to the per-host batch (global batch / process count); `parallel.shard_host_batch` then assembles the
hosts' batches into global `jax.Array`s sharded over the mesh (the training loop, encoding and evaluation
all go through it). TensorFlow only reads files here: it is kept off the GPU so it never competes with JAX
for accelerator memory.

Determinism and resumption. The order is a pure function of `(seed, epoch)`: epoch `e` reads the host's
shard files in an order drawn with the stateless seed `(seed, e)`, interleaves them, and shuffles records
in a buffer seeded from the same pair. A run resumed at step `k` therefore rebuilds exactly the stream a
run that took `k` batches would see: it starts at epoch `k * host_batch // host_examples` and skips the
remaining `k * host_batch % host_examples` records of that epoch. The skip acts on serialized records,
before parsing, so resuming costs reading (not decoding) at most one epoch of the host's slice; the trainer
only has to save `{"step": k}` with its checkpoint. We chose this over
checkpointing tf.data iterators because an iterator checkpoint holds the whole shuffle buffer (hundreds of
MB of ECGs per host per checkpoint) and ties the checkpoint to one process layout, while a step counter is
tiny and readable. Resuming reproduces the stream only with the same seed, global batch size and process
count (each process's slice depends on the count).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from diffusets_jax.data import location


def keep_tensorflow_off_accelerators() -> None:
    """Hide GPUs from TensorFlow so tf.data never allocates accelerator memory that JAX needs.

    Safe to call repeatedly. If TensorFlow already initialised a GPU (someone ran TF ops first), raise with
    what to do instead of silently sharing the device.
    """
    if not tf.config.list_physical_devices("GPU"):
        return  # tensorflow-cpu, or no GPU on this machine
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as err:
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError(
                "TensorFlow already initialised a GPU before the input pipeline could hide it; import "
                "diffusets_jax.data.pipeline (or call keep_tensorflow_off_accelerators()) before running any "
                "TensorFlow op"
            ) from err


keep_tensorflow_off_accelerators()

# Fields each kind of training reads (the prepared schema is `diffusets_jax.data.schema.ecg_features`).
CONDITION_FIELDS: tuple[str, ...] = ("text_embedding", "sex", "age", "heart_rate")
VAE_FIELDS: tuple[str, ...] = ("ecg",)
CLIP_FIELDS: tuple[str, ...] = ("ecg", "text_embedding")
DIFFUSION_FIELDS: tuple[str, ...] = ("ecg", *CONDITION_FIELDS)
LATENT_FIELDS: tuple[str, ...] = ("latent_mean", "latent_logvar", *CONDITION_FIELDS)

MASK_FIELD = "mask"  # evaluation batches: True for real examples, False for padding
DEFAULT_SHUFFLE_BUFFER = 16_384
_INTERLEAVE_CYCLE = 16  # shard files read concurrently; more mixes better, costs more open files


# ----------------------------------------------------------------------------------------------------------
# Sources and splits


def load_builder(source: tfds.core.DatasetBuilder | str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 *, data_dir_flag: str = "--data-dir") -> tfds.core.DatasetBuilder:
    """A prepared dataset's builder from a builder, a registered name + `data_dir`, or a dataset directory.

    A directory holding `dataset_info.json` (e.g. a latent dataset written by `diffusets-jax encode`, or
    `<data_dir>/<name>/<config>/<version>`) is opened with `tfds.builder_from_directory`. A `data_dir` (`data_dir_flag`
    names where it was given; each message names it) goes with a name only: with a path it is refused, not ignored.
    """
    if isinstance(source, tfds.core.DatasetBuilder):
        return source
    source = os.fspath(source)
    if data_dir is not None and os.path.exists(source):
        # The path is read as it is: a data dir given with it was silently ignored (a mistyped or nonexistent one
        # too), though the user may have meant the dataset of that name under it. A path that does not exist is
        # said so below.
        raise ValueError(f"{data_dir_flag} {os.fspath(data_dir)} goes with a dataset name, and the dataset {source} "
                         f"is a path, which is read as it is: drop {data_dir_flag}, or give the dataset's name")
    if os.path.isfile(os.path.join(source, "dataset_info.json")):
        return tfds.builder_from_directory(source)
    if location.is_path(source):
        # A path, not a TFDS name: say what is wrong with it rather than how TFDS failed to parse it as a name.
        what = ("is a folder without dataset_info.json" if os.path.isdir(source) else
                "is a file" if os.path.exists(source) else "does not exist")
        raise FileNotFoundError(f"dataset {source} {what}: give a prepared dataset's version folder (DATA_DIR/NAME/CONFIG/"
                                f"VERSION, which holds dataset_info.json) or a dataset name with {data_dir_flag}")
    from diffusets_jax.data import sources

    if source in sources.SOURCES.values():  # our builders register their names with TFDS when imported
        sources.builder_class(source)
    try:
        builder = tfds.builder(source, data_dir=None if data_dir is None else os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError as err:
        raise FileNotFoundError(
            f"no dataset {source!r} under data_dir {None if data_dir is None else os.fspath(data_dir)!r}: pass the "
            f"{data_dir_flag} it was prepared into (or the dataset's version directory, which holds dataset_info.json)"
        ) from err
    except ValueError as err:  # TFDS could not read it as NAME[/CONFIG][:VERSION]: a mistyped relative path
        raise FileNotFoundError(f"dataset {source!r} is neither a folder here nor a dataset name: give a prepared "
                                "dataset's version folder (DATA_DIR/NAME/CONFIG/VERSION, which holds dataset_info.json) or "
                                f"a dataset name with {data_dir_flag}") from err
    if not builder.is_prepared():
        # A name without /CONFIG is TFDS's default config (local): one prepared with `--config openai` was said to
        # be "not prepared", and the user, who had prepared it, was sent to prepare it again.
        name, hint = source.split(":")[0], ""
        if data_dir is not None and "/" not in name:
            import glob

            found = glob.glob(os.path.join(glob.escape(os.fspath(data_dir)), glob.escape(name), "*", "*",
                                           "dataset_info.json"))
            others = sorted({f"{name}/{os.path.basename(os.path.dirname(os.path.dirname(f)))}" for f in found})
            if others:
                hint = (f"; prepared there: {', '.join(others)}: give the name with its config (a name alone means "
                        f"its default config, {getattr(builder.builder_config, 'name', None)})")
        raise FileNotFoundError(
            f"dataset {source!r} is not prepared under {builder.data_dir!r}: run `diffusets-jax prepare` for it "
            f"or pass the {data_dir_flag} it was prepared into{hint}"
        )
    return builder


# TFDS's name for the union of a dataset's splits, which it reads without a copy: the published all-data recipe.
ALL_SPLITS = "all"


def split_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Examples of `split`: one of the dataset's splits, `all` (their union) or a TFDS split expression
    (`train+validation`, `train[:10%]`). A split the dataset lacks raises ValueError naming those it has."""
    try:
        return int(builder.info.splits[split].num_examples)
    except (ValueError, KeyError, NotImplementedError, TypeError):  # TFDS: unknown name, or not a split expression
        raise ValueError(f"dataset {builder.name!r} has no split {split!r}; it has {sorted(builder.info.splits)} "
                         f"(or {ALL_SPLITS!r}, their union)") from None


def has_split(builder: tfds.core.DatasetBuilder, split: str) -> bool:
    """Whether `split_examples` reads `split` from this dataset."""
    try:
        split_examples(builder, split)
    except ValueError:
        return False
    return True


def host_split(builder: tfds.core.DatasetBuilder, split: str, *, drop_remainder: bool,
               process_index: int | None = None, process_count: int | None = None) -> tfds.core.SplitInfo:
    """This process's slice of `split` (`tfds.split_for_jax_process`), as a `SplitInfo` with file instructions.

    `drop_remainder=True` (training) gives every process the same number of examples, dropping fewer than
    `process_count`; `False` (evaluation) keeps all, the first processes getting one more.
    """
    split_examples(builder, split)  # one line naming the splits it has, for a split it lacks
    subsplit = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count,
                                          drop_remainder=drop_remainder)
    info = builder.info.splits[subsplit]
    if info.num_examples == 0:
        raise ValueError(
            f"split {split!r} of {builder.name!r} leaves no examples for process "
            f"{jax.process_index() if process_index is None else process_index}: it has "
            f"{builder.info.splits[split].num_examples} examples for {process_count or jax.process_count()} processes"
        )
    return info


def _check_fields(builder: tfds.core.DatasetBuilder, fields: Sequence[str]) -> tfds.features.FeaturesDict:
    """The sub-FeaturesDict of `fields`: parsing only these skips the rest of each record."""
    if not fields:
        raise ValueError("fields is empty: name the features to read, e.g. pipeline.VAE_FIELDS")
    available = builder.info.features.keys()
    missing = [f for f in fields if f not in available]
    if missing:
        raise ValueError(f"dataset {builder.name!r} has no field(s) {missing}; it has {sorted(available)}")
    return tfds.features.FeaturesDict({f: builder.info.features[f] for f in fields})


def _records(file_instructions: Sequence[Any], order: tf.Tensor | None, cycle_length: int) -> tf.data.Dataset:
    """Serialized records of the given file slices; `order` permutes the slices (None keeps them in order)."""
    filenames = tf.constant([os.fspath(fi.filename) for fi in file_instructions])
    skips = tf.constant([fi.skip for fi in file_instructions], tf.int64)
    takes = tf.constant([fi.take for fi in file_instructions], tf.int64)
    slices = tf.data.Dataset.from_tensor_slices((filenames, skips, takes))
    if order is not None:
        slices = tf.data.Dataset.from_tensor_slices(order).map(
            lambda i: (tf.gather(filenames, i), tf.gather(skips, i), tf.gather(takes, i)))
    read = lambda name, skip, take: tf.data.TFRecordDataset(name).skip(skip).take(take)
    if cycle_length == 1:
        return slices.flat_map(read)
    return slices.interleave(read, cycle_length=cycle_length, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                             deterministic=True)


def _deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def per_host_batch_size(global_batch_size: int, process_count: int, batch_shards: int = 1) -> int:
    """`global_batch_size / process_count`, checking it splits evenly over processes and mesh batch shards."""
    if global_batch_size <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch_size}")
    if global_batch_size % batch_shards:
        raise ValueError(
            f"global batch size {global_batch_size} is not a multiple of the {batch_shards} batch shards of the "
            f"mesh (data x fsdp): choose a multiple of {batch_shards}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} does not split over {process_count} processes: choose a "
            f"multiple of {process_count}"
        )
    return global_batch_size // process_count


# ----------------------------------------------------------------------------------------------------------
# Per-host tf.data pipelines (numpy batches of this process's examples)


def train_dataset(builder: tfds.core.DatasetBuilder, split: str, *, host_batch_size: int, fields: Sequence[str],
                  seed: int, start_step: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
    """Endless, shuffled per-host batches `{field: (host_batch_size, ...)}` starting at `start_step`.

    Epoch `e` is shuffled with the stateless seed `(seed, e)`: the same seed gives the same stream on every
    run, and `start_step=k` yields exactly what a run from step 0 yields after its first `k` batches.
    Batches run across epoch boundaries (no example is dropped except by the even per-process split).
    The shuffle buffer holds serialized records, about 55 kB each for an ECG with a 1536-d embedding
    (~0.9 GB of host memory at the default size) and about 10 kB for a latent record.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    features = _check_fields(builder, fields)
    info = host_split(builder, split, drop_remainder=True, process_index=process_index, process_count=process_count)
    instructions = info.file_instructions
    examples_per_epoch = info.num_examples
    start_epoch, skip_in_epoch = divmod(start_step * host_batch_size, examples_per_epoch)
    cycle_length = min(_INTERLEAVE_CYCLE, len(instructions))

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(len(instructions), dtype=tf.int64), seed=epoch_seed)
        buffer_seed = tf.random.stateless_uniform([], seed=epoch_seed + 1, minval=0, maxval=2**62, dtype=tf.int64)
        return _records(instructions, order, cycle_length).shuffle(
            shuffle_buffer, seed=buffer_seed, reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
    ds = ds.skip(skip_in_epoch)  # on serialized records: resuming reads but does not parse the skipped ones
    ds = ds.map(features.deserialize_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_deterministic_options())


def eval_num_batches(builder: tfds.core.DatasetBuilder, split: str, host_batch_size: int,
                     process_count: int | None = None) -> int:
    """Batches every process yields for `split`: enough for the largest process slice, so all step together."""
    count = jax.process_count() if process_count is None else process_count
    largest = max(host_split(builder, split, drop_remainder=False, process_index=i, process_count=count).num_examples
                  for i in range(count))
    return -(-largest // host_batch_size)


def eval_dataset(builder: tfds.core.DatasetBuilder, split: str, *, host_batch_size: int, fields: Sequence[str],
                 process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
    """One ordered pass over this process's slice in batches `{field: ..., "mask": (host_batch_size,) bool}`.

    No shuffle, no repeat. The tail is padded with zero examples whose `mask` is False, and every process
    yields the same number of batches (`eval_num_batches`) so collective evaluation steps never deadlock.
    """
    features = _check_fields(builder, fields)
    if MASK_FIELD in fields:
        raise ValueError(f"field name {MASK_FIELD!r} is reserved for the padding mask of evaluation batches")
    info = host_split(builder, split, drop_remainder=False, process_index=process_index, process_count=process_count)
    num_batches = eval_num_batches(builder, split, host_batch_size, process_count)
    with_mask = lambda serialized: {**features.deserialize_example(serialized), MASK_FIELD: tf.constant(True)}
    ds = _records(info.file_instructions, None, cycle_length=1).map(with_mask, num_parallel_calls=tf.data.AUTOTUNE)
    padding = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.take(num_batches * host_batch_size).batch(host_batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_deterministic_options())
