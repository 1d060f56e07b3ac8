"""One process of the two-process input pipeline test (started by tests/test_data_pipeline.py).

argv: process_id, coordinator port, tfds data_dir, output JSON path. Each process has 4 CPU devices; the
mesh spans all 8. Writes this process's host batch ids and the gathered global batch ids.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, like the parent test process

process_id, port, data_dir, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.data import pipeline  # noqa: E402

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
builder = pipeline.load_builder("tiny_ecg", data_dir=data_dir)
host_batch = pipeline.per_host_batch_size(16, jax.process_count(), parallel.num_batch_shards(mesh))
host_batches = pipeline.train_dataset(builder, "train", host_batch_size=host_batch, fields=("ecg", "study_id"),
                                      seed=7, shuffle_buffer=16).as_numpy_iterator()
host = next(pipeline.train_dataset(builder, "train", host_batch_size=8, fields=("study_id",), seed=7,
                                   shuffle_buffer=16).as_numpy_iterator())
result = {"host": host["study_id"].tolist(), "global": [], "shape": [], "local_devices": 0}
for _ in range(3):
    batch = parallel.shard_host_batch(next(host_batches), mesh)
    result["shape"] = list(batch["ecg"].shape)
    result["local_devices"] = len(batch["ecg"].addressable_shards)
    gathered = multihost_utils.process_allgather(batch["study_id"], tiled=True)
    result["global"].append(np.asarray(gathered).tolist())
evaluation = pipeline.eval_dataset(builder, "validation", host_batch_size=4, fields=("study_id",))
result["eval"] = []
for host_eval in evaluation.as_numpy_iterator():
    batch = parallel.shard_host_batch(host_eval, mesh)
    ids = np.asarray(multihost_utils.process_allgather(batch["study_id"], tiled=True))
    mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True))
    result["eval"] += ids[mask].tolist()
with open(out_path, "w") as f:
    json.dump(result, f)
jax.distributed.shutdown()
