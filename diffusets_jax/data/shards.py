"""The one TFRecord shard writer: latent datasets (`encode`) and synthetic corpora (`sample --corpus`) use it.

A shard is written under a unique temporary name beside its final one and renamed into place when complete,
so a crash never leaves a torn shard under a real name and two runs never share a temporary file. Shards are
named with TFDS's default template, and `write_tfds_metadata` adds `dataset_info.json` & co once every shard
exists, so `tfds.builder_from_directory(out_dir)` (and the input pipeline) read the folder as a dataset.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.example_serializer import ExampleSerializer

from diffusets_jax.io.files import atomic_path

_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def shard_filename(dataset_name: str, split: str, shard: int, num_shards: int) -> str:
    """TFDS's default shard name, e.g. `synthetic_ecg-train.tfrecord-00003-of-00015`."""
    return f"{dataset_name}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}"


def _tf_feature(value: Any, info: tfds.features.TensorInfo) -> tf.train.Feature:  # noqa: ANN401 (an encoded value)
    """One encoded feature as TFDS writes it, its values handed to protobuf as one Python list."""
    if info.sequence_rank and not isinstance(value, np.ndarray):  # a Sequence's items, stacked as TFDS does
        value = np.stack(value) if len(value) else np.empty((0, *info.shape[1:]), info.np_dtype)
    values = np.asarray(value, dtype=info.np_dtype)  # as TFDS casts it; object for strings keeps their bytes
    if values.dtype == object:
        return tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[item.encode() if isinstance(item, str) else bytes(item) for item in values.ravel()]))
    if values.dtype.kind in "biu":  # TFDS's int64 list: bools as 0 / 1, uint64 bit for bit
        values = values.view(np.int64) if values.dtype == np.uint64 else values.astype(np.int64)
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values.ravel().tolist()))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values.ravel().tolist()))


class DeterministicExampleSerializer(ExampleSerializer):
    """TFDS's `ExampleSerializer` with the bytes TFDS writes for an example, but the same bytes in every process,
    and without TFDS's element-by-element float lists. The one serializer of prepared data, encodings and corpora.

    A tf.train.Example holds its features in a protobuf map, whose entries protobuf writes in an order that changes
    from process to process unless asked for a deterministic one, so two runs of one command (or a resumed run and an
    uninterrupted one) wrote shards that held the same examples but differed byte for byte. TFDS fills a float list
    from a numpy array one element at a time: 2-4 ms an example for an ECG's 12,288 samples on a busy 2-core CPU, an
    hour of a corpus of a million ECGs spent on its host, against 0.6-1 ms for the whole example here, where the
    values go to protobuf as a Python list. For flat features of tensors (the prepared-data schema, `data.schema`);
    anything else is refused. A module-level class, so that Beam workers unpickle this one (`data.builder` makes
    TFDS's split writers use it)."""

    def __init__(self, example_specs: Mapping[str, Any]):
        super().__init__(example_specs)
        nested = sorted(key for key, info in example_specs.items()
                        if not isinstance(info, tfds.features.TensorInfo) or info.sequence_rank > 1)
        if nested:
            raise ValueError(f"DeterministicExampleSerializer serializes flat tensor features; {', '.join(nested)} "
                             "are nested")

    def serialize_example(self, example: Mapping[str, Any]) -> bytes:
        """`example`: encoded (`features.encode_example`), as TFDS's writers pass it."""
        return tf.train.Example(features=tf.train.Features(feature={
            key: _tf_feature(example[key], info) for key, info in self.example_specs.items()
        })).SerializeToString(deterministic=True)


def example_serializer(features: tfds.features.FeaturesDict) -> Callable[[Mapping[str, Any]], bytes]:
    """`features.serialize_example` through `DeterministicExampleSerializer`: the bytes TFDS writes, the same in
    every process, several times faster."""
    serializer = DeterministicExampleSerializer(features.get_serialized_info())
    return lambda example: serializer.serialize_example(features.encode_example(example))


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> tuple[int, int]:
    """Write serialized examples to the TFRecord file `path` atomically; `(records written, bytes)`.

    `records` may be a generator that does the expensive work (encoding, sampling) as the shard is written;
    if it raises, nothing appears under `path`.
    """
    count = 0
    with atomic_path(path) as temporary:
        try:
            with tf.io.TFRecordWriter(os.fspath(temporary)) as writer:
                for record in records:
                    writer.write(record)
                    count += 1
        except tf.errors.OpError as err:  # TensorFlow's own error for a failed write (a full disk): one line, not a
            raise OSError(f"cannot write {path}: {err.message}") from None  # traceback, as for any other file
        num_bytes = os.path.getsize(temporary)
    return count, num_bytes


def write_tfds_metadata(out_dir: str | os.PathLike, dataset_name: str, features: tfds.features.FeaturesDict,
                        shard_lengths: Mapping[str, Sequence[int]], description: str) -> None:
    """`dataset_info.json` and the features' files for the shards of each split (`{split: [examples per shard]}`).

    The byte counts are informational: shards another host wrote to its own disk count as 0 here."""
    from etils import epath

    data_dir = epath.Path(os.fspath(out_dir))
    template = tfds.core.ShardedFileTemplate(data_dir=data_dir, template=_TEMPLATE, dataset_name=dataset_name,
                                             filetype_suffix="tfrecord")
    split_infos = []
    for split, lengths in shard_lengths.items():
        files = [Path(os.fspath(out_dir)) / shard_filename(dataset_name, split, i, len(lengths))
                 for i in range(len(lengths))]
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[int(n) for n in lengths],
                                               num_bytes=sum(f.stat().st_size for f in files if f.exists()),
                                               filename_template=template))
    tfds.folder_dataset.write_metadata(data_dir=data_dir, features=features, split_infos=split_infos,
                                       filename_template=template, description=description, check_data=False)
