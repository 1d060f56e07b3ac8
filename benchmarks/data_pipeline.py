"""Input pipeline throughput and resume cost on a synthetic dataset in the prepared schema; prints JSON.

    PYTHONPATH=. python benchmarks/data_pipeline.py --examples 8192 --global-batch 256

Writes `--examples` records (random ECGs, 1536-d embeddings as with ada-002) into `--shards` TFRecord
files as a TFDS folder dataset, then measures: host pipeline examples/s (DIFFUSION_FIELDS), global
sharded batches/s on all local devices, and the time to the first batch when resuming mid-epoch (the
skip reads the skipped records without parsing them) against starting fresh.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import arguments


def parse_args() -> argparse.Namespace:
    parser = arguments.parser(__doc__.splitlines()[0])
    parser.add_argument("--examples", type=arguments.count, default=8192)
    parser.add_argument("--shards", type=arguments.count, default=16)
    parser.add_argument("--embedding-dim", type=arguments.count, default=1536)
    parser.add_argument("--global-batch", type=arguments.count, default=256)
    parser.add_argument("--batches", type=arguments.count, default=20)
    parser.add_argument("--shuffle-buffer", type=arguments.count, default=4096)
    args = parser.parse_args()
    per_shard = -(-args.examples // args.shards)  # as write_dataset splits them: else a negative shard length
    if per_shard * (args.shards - 1) > args.examples:
        parser.error(f"--examples {args.examples} --shards {args.shards}: at {per_shard} records per shard the records "
                     "run out before the last shards; pass fewer --shards or more --examples (a multiple of --shards "
                     "always works)")
    return args


# Checked before the imports below load JAX and TensorFlow (seconds): a bad flag is one line at once, not a
# traceback (arguments.py). main() parses again, which costs nothing.
if __name__ == "__main__":
    parse_args()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from machine import describe, print_report  # noqa: E402

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.data import pipeline  # noqa: E402
from diffusets_jax.data.schema import ecg_features  # noqa: E402


def write_dataset(directory: str, examples: int, shards: int, embedding_dim: int) -> None:
    # TFDS serializes a (1024, 12) float tensor slowly (element-wise protobuf fill), so serialize a pool of
    # distinct records once and cycle it: the reader's cost does not depend on the values.
    features = ecg_features(embedding_dim)
    rng = np.random.default_rng(0)
    pool = [features.serialize_example({
        "ecg": rng.standard_normal((1024, 12), np.float32), "report_lines": ["Sinus rhythm"],
        "prompt": "Sinus rhythm", "text_embedding": rng.standard_normal(embedding_dim, np.float32),
        "sex": index % 2, "age": 60.0, "heart_rate": 70.0, "heart_rate_source": "rr",
        "subject_id": index, "study_id": index, "record_path": f"r{index}"}) for index in range(64)]
    per_shard = -(-examples // shards)
    lengths = []
    for shard in range(shards):
        count = min(per_shard, examples - shard * per_shard)
        path = os.path.join(directory, f"bench_ecg-train.tfrecord-{shard:05d}-of-{shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(count):
                writer.write(pool[(shard * per_shard + i) % len(pool)])
        lengths.append(count)
    template = tfds.core.ShardedFileTemplate(data_dir=directory, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                             dataset_name="bench_ecg", filetype_suffix="tfrecord")
    split = tfds.core.SplitInfo(name="train", shard_lengths=lengths, num_bytes=0, filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=directory, features=features, split_infos=[split],
                                       filename_template=template, check_data=False)


def time_first_and_rate(iterator, batches: int, batch_size: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = next(iterator)
    jax.block_until_ready(first)  # a no-op for host numpy batches
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    jax.block_until_ready(batch)
    return first_s, batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    machine = describe()

    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        write_dataset(directory, args.examples, args.shards, args.embedding_dim)
        write_s = time.perf_counter() - start
        builder = pipeline.load_builder(directory)
        host_batch = args.global_batch // jax.process_count()
        steps_per_epoch = args.examples // host_batch
        common = {"host_batch_size": host_batch, "fields": pipeline.DIFFUSION_FIELDS, "seed": 0,
                  "shuffle_buffer": args.shuffle_buffer}
        fresh_first, host_rate = time_first_and_rate(
            pipeline.train_dataset(builder, "train", **common).as_numpy_iterator(), args.batches, host_batch)
        resume_step = steps_per_epoch // 2
        resume_first, _ = time_first_and_rate(
            pipeline.train_dataset(builder, "train", start_step=resume_step, **common).as_numpy_iterator(), 1, host_batch)
        mesh = parallel.make_mesh()
        # What the training loop does: per-host batches made into global arrays sharded over the mesh.
        global_batches = (parallel.shard_host_batch(batch, mesh)
                          for batch in pipeline.train_dataset(builder, "train", **common).as_numpy_iterator())
        global_first, global_rate = time_first_and_rate(global_batches, args.batches, args.global_batch)
    print_report({
        "benchmark": "data_pipeline", "examples": args.examples, "shards": args.shards,
        "embedding_dim": args.embedding_dim, "global_batch": args.global_batch, "shuffle_buffer": args.shuffle_buffer,
        "write_examples_per_s": round(args.examples / write_s, 1),
        "host_pipeline_examples_per_s": round(host_rate, 1),
        "global_batches_examples_per_s": round(global_rate, 1),
        "first_batch_s_fresh": round(fresh_first, 3),
        "first_batch_s_global": round(global_first, 3),
        f"first_batch_s_resume_at_step_{resume_step}": round(resume_first, 3),
        "resume_skipped_records": resume_step * host_batch,
    }, machine, indent=1)


if __name__ == "__main__":
    main()
