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
