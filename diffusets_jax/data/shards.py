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


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer below 2**64."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A length-delimited protobuf field (a message, a string, a packed list) with its tag byte, as the parts to join:
    an example's bytes are joined once, so an ECG's samples are copied once."""
    return [tag, _varint(sum(len(part) for part in parts)), *parts]


# The one-byte tags of tf.train.Example's fields (field number << 3 | wire type 2, length-delimited), from
# tensorflow/core/example/{example,feature}.proto: Example.features = 1, Features.feature (a map) = 1, a map
# entry's key = 1 and value = 2, Feature.bytes_list / float_list / int64_list = 1 / 2 / 3, and each list's
# `value` = 1 (packed for floats and ints).
_FIELD_1, _FIELD_2, _FIELD_3 = b"\x0a", b"\x12", b"\x1a"


def _upb_map_order(key: bytes) -> tuple[int, ...]:
    """Where protobuf's deterministic serialization (upb, Python's protobuf since 4.21) puts a map entry: by key, byte
    for byte, except that a key comes after the longer keys it begins (`heart_rate_source`, then `heart_rate`)."""
    return (*key, 256)


def _feature_parts(value: Any, info: tfds.features.TensorInfo) -> list[bytes | memoryview]:  # noqa: ANN401
    """One encoded feature (`value`) as the parts of the tf.train.Feature TFDS makes of it."""
    if info.sequence_rank and not isinstance(value, np.ndarray):  # a Sequence's items, stacked as TFDS does
        value = np.stack(value) if len(value) else np.empty((0, *info.shape[1:]), info.np_dtype)
    values = np.asarray(value, dtype=info.np_dtype)  # as TFDS casts it; object for strings keeps their bytes
    if values.dtype == object:
        items = [item.encode() if isinstance(item, str) else bytes(item) for item in values.ravel()]
        return _field(_FIELD_1, [part for item in items for part in _field(_FIELD_1, [item])])
    if values.dtype.kind in "biu":  # TFDS's int64 list: bools as 0 / 1, uint64 bit for bit
        ints = values.view(np.int64) if values.dtype == np.uint64 else values.astype(np.int64)
        # a negative int64 is the varint of its two's complement: ten bytes
        packed = b"".join(_varint(int(word)) for word in np.ascontiguousarray(ints).ravel().view(np.uint64))
        return _field(_FIELD_3, _field(_FIELD_1, [packed]) if packed else [])
    # FloatList holds float32: wider floats round to nearest as protobuf's conversion does, narrower ones are exact
    floats = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    return _field(_FIELD_2, _field(_FIELD_1, [memoryview(floats).cast("B")]) if floats.size else [])


class DeterministicExampleSerializer(ExampleSerializer):
    """TFDS's `ExampleSerializer` with the bytes TFDS writes for an example, but the same bytes in every process,
    and without TFDS's element-by-element float lists. The one serializer of prepared data, encodings and corpora.

    A tf.train.Example holds its features in a protobuf map, whose entries protobuf writes in an order that changes
    from process to process unless asked for a deterministic one, so two runs of one command (or a resumed run and an
    uninterrupted one) wrote shards that held the same examples but differed byte for byte. TFDS fills a float list
    from a numpy array one element at a time: 2-4 ms an example for an ECG's 12,288 samples on a busy 2-core CPU, an
    hour of a corpus of a million ECGs spent on its host. Handing protobuf the values as a Python list still took
    0.6 ms an example (1,600 a second: a host that could not keep up with an accelerator's sampling), so this writes
    the wire format itself, the bytes protobuf's deterministic serialization writes (its test compares them), in
    about 0.06 ms (TFDS's `encode_example` before it takes about 0.03 ms). For flat features of tensors (the
    prepared-data schema, `data.schema`); anything else is refused. A module-level class, so that Beam workers
    unpickle this one (`data.builder` makes TFDS's split writers use it)."""

    def __init__(self, example_specs: Mapping[str, Any]):
        super().__init__(example_specs)
        nested = sorted(key for key, info in example_specs.items()
                        if not isinstance(info, tfds.features.TensorInfo) or info.sequence_rank > 1)
        if nested:
            raise ValueError(f"DeterministicExampleSerializer serializes flat tensor features; {', '.join(nested)} "
                             "are nested")
        self._keys_in_order = sorted(example_specs, key=lambda key: _upb_map_order(key.encode()))
        self._key_fields = {key: b"".join(_field(_FIELD_1, [key.encode()])) for key in example_specs}

    def serialize_example(self, example: Mapping[str, Any]) -> bytes:
        """`example`: encoded (`features.encode_example`), as TFDS's writers pass it."""
        entries = [part for key in self._keys_in_order for part in _field(_FIELD_1, [
            self._key_fields[key], *_field(_FIELD_2, _feature_parts(example[key], self.example_specs[key]))])]
        return b"".join(_field(_FIELD_1, entries))


def example_serializer(features: tfds.features.FeaturesDict) -> Callable[[Mapping[str, Any]], bytes]:
    """`features.serialize_example` through `DeterministicExampleSerializer`: the bytes TFDS writes, the same in
    every process, about ten times faster."""
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
