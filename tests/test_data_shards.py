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
