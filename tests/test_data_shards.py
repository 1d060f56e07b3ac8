import resource

import pytest

from diffusets_jax.data.shards import write_shard


def test_a_shard_the_disk_cannot_hold_is_an_os_error_and_leaves_nothing(tmp_path):
    # A full disk (here: a file-size limit, which Python turns into EFBIG) made TensorFlow raise its own
    # OutOfRangeError, which the CLI printed as a traceback instead of one line.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError, match=r"cannot write \S+shard.tfrecord: .*File too large"):
            write_shard(tmp_path / "shard.tfrecord", (b"x" * 4096 for _ in range(100)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_examples_are_tfds_bytes_without_its_element_by_element_float_lists(monkeypatch):
    """TFDS fills a float list from a numpy array one element at a time: 2-4 ms for an ECG's 12,288 samples, which a
    `sample --corpus` of a million ECGs spent on its host (40 minutes or more). The bytes must stay TFDS's own."""
    import numpy as np
    from tensorflow_datasets.core import example_serializer as tfds_serializer

    from diffusets_jax.data.schema import ecg_features
    from diffusets_jax.data.shards import example_serializer

    features = ecg_features(16)
    rng = np.random.default_rng(0)
    ecg = rng.normal(size=(1024, 12)).astype(np.float32)
    ecg[0, :3] = np.nan, np.inf, -0.0
    examples = [{"ecg": ecg, "report_lines": lines, "prompt": "Sinus rhythm\u00e9", "heart_rate_source": "condition",
                 "text_embedding": rng.normal(size=16).astype(np.float32), "sex": 1, "age": 40.5, "heart_rate": 61.3,
                 "subject_id": -1, "study_id": 2**40 + 3, "record_path": ""}
                for lines in ([], ["Sinus rhythm", "\u00c4 \x00b"])]
    reference = tfds_serializer.ExampleSerializer(features.get_serialized_info())
    expected = [reference.get_tf_example(features.encode_example(e)).SerializeToString(deterministic=True)
                for e in examples]
    per_element = []
    original = tfds_serializer._item_to_tf_feature
    monkeypatch.setattr(tfds_serializer, "_item_to_tf_feature",
                        lambda item, info: per_element.append(info) or original(item, info))
    assert [example_serializer(features)(e) for e in examples] == expected
    assert per_element == []


def test_every_feature_kind_is_written_as_protobuf_writes_it():
    """The serializer writes tf.train.Example's wire format itself: the same bytes as protobuf's deterministic
    serialization for every kind of flat feature TFDS encodes (strings, ints of every width and sign, bools, floats of
    every width, empty lists), and map keys where one begins another, whose order is upb's own."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import example_serializer as tfds_serializer

    from diffusets_jax.data.shards import example_serializer

    features = tfds.features.FeaturesDict({
        "a": tfds.features.Scalar(dtype=np.int64), "ab": tfds.features.Scalar(dtype=np.bool_),
        "abc": tfds.features.Tensor(shape=(3,), dtype=np.uint64), "a_b": tfds.features.Scalar(dtype=np.int8),
        "b": tfds.features.Tensor(shape=(2, 2), dtype=np.float64), "ba": tfds.features.Tensor(shape=(4,), dtype=np.float16),
        "c": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32)), "\u00e9": tfds.features.Text(),
        "d": tfds.features.Sequence(tfds.features.Text()), "e": tfds.features.Tensor(shape=(0,), dtype=np.float32),
        "f": tfds.features.Sequence(tfds.features.Tensor(shape=(2,), dtype=np.float32)),
    })
    rng = np.random.default_rng(1)
    examples = [{
        "a": int(rng.integers(-2**63, 2**63 - 1)), "ab": bool(i % 2),
        "abc": np.array([0, 2**64 - 1, int(rng.integers(0, 2**63))], np.uint64), "a_b": -128 + i,
        "b": rng.normal(size=(2, 2)) * 10.0 ** rng.integers(-40, 38, size=(2, 2)),
        "ba": rng.normal(size=4).astype(np.float16),
        "c": [] if i == 0 else list(rng.integers(-2**31, 2**31 - 1, size=i)),
        "\u00e9": "" if i == 0 else "Sinus rhythm \u00c4\u4e2d\x00", "d": [] if i == 0 else ["", "x" * 200] * i,
        "e": np.zeros(0, np.float32), "f": [] if i == 0 else rng.normal(size=(i, 2)).astype(np.float32),
    } for i in range(4)]
    reference = tfds_serializer.ExampleSerializer(features.get_serialized_info())
    for example in examples:
        written = example_serializer(features)(example)
        expected = reference.get_tf_example(features.encode_example(example))
        assert written == expected.SerializeToString(deterministic=True)
        assert tf.train.Example.FromString(written).SerializeToString(deterministic=True) == written  # it reads back
