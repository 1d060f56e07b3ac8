"""The host's side of `sample --corpus`: ECGs per second through the corpus schema's encoding, the example serializer
and the TFRecord writer, with no generation.

A corpus host encodes, serializes and writes each ECG while the accelerator computes the next batch
(`ECGGenerator.generate_batches`), so this rate, on one host core, caps a host's corpus throughput whatever the
accelerator samples. The examples are what the corpus writes: random (1024, 12) ECGs, a two-line report, its prompt
and a prompt embedding of `--embedding-dim` (1536: the published ada-002). Prints one JSON object: the whole path and
its parts (encode + serialize, then the writer alone), each the fastest of `--repeats` passes.

    PYTHONPATH=$PWD python benchmarks/corpus_writing.py [--examples 2048] [--embedding-dim 1536] [--repeats 3]
"""

from __future__ import annotations

import os
import tempfile
import time

import arguments


def main() -> None:
    parser = arguments.parser(__doc__, raw=True)
    parser.add_argument("--examples", type=arguments.count, default=2048, help="ECGs per timed pass (one shard)")
    parser.add_argument("--embedding-dim", type=arguments.count, default=1536)
    parser.add_argument("--repeats", type=arguments.count, default=3)
    args = parser.parse_args()

    import numpy as np
    from machine import describe, print_report

    from diffusets_jax.data.schema import ecg_features
    from diffusets_jax.data.shards import example_serializer, write_shard

    machine = describe()
    rng = np.random.default_rng(0)
    ecgs = rng.normal(scale=0.3, size=(args.examples, 1024, 12)).astype(np.float32)
    vectors = rng.normal(size=(args.examples, args.embedding_dim)).astype(np.float32)
    lines = ["Sinus rhythm", "Left ventricular hypertrophy"]
    examples = [{"ecg": ecgs[i], "report_lines": lines, "prompt": "The report of the ECG is that {" + ". ".join(lines)
                 + "}.", "text_embedding": vectors[i], "sex": i % 2, "age": 60.0, "heart_rate": 72.0,
                 "heart_rate_source": "condition", "subject_id": -1, "study_id": i, "record_path": ""}
                for i in range(args.examples)]
    serialize = example_serializer(ecg_features(args.embedding_dim))
    serialize(examples[0])  # TFDS builds its encoders on the first example

    def fastest(run) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    with tempfile.TemporaryDirectory() as folder:  # made here, removed here
        shard = os.path.join(folder, "corpus-train.tfrecord-00000-of-00001")
        serialize_s = fastest(lambda: [serialize(e) for e in examples])
        records = [serialize(e) for e in examples]
        write_s = fastest(lambda: write_shard(shard, records))
        whole_s = fastest(lambda: write_shard(shard, (serialize(e) for e in examples)))
        shard_bytes = os.path.getsize(shard)
    print_report({
        "benchmark": "corpus_writing",
        "examples": args.examples,
        "embedding_dim": args.embedding_dim,
        "repeats": args.repeats,
        "ecg_per_s": round(args.examples / whole_s),
        "encode_and_serialize_ecg_per_s": round(args.examples / serialize_s),
        "tfrecord_write_ecg_per_s": round(args.examples / write_s),
        "microseconds_per_ecg": round(1e6 * whole_s / args.examples, 1),
        "bytes_per_ecg": round(shard_bytes / args.examples),
    }, machine)


if __name__ == "__main__":
    main()
