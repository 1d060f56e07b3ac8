"""One process of the two-process reference-split test (started by tests/test_experiments_evaluate.py).

argv: process_id, coordinator port, dataset folder, result JSON path. Reads the dataset's test split with
`experiments.evaluate.read_reference_split` and writes {"read": records} or {"error": message} to the result path.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, like the parent test process

process_id, port, dataset, result_path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id)

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.experiments.evaluate import read_reference_split  # noqa: E402

parallel.initialize_distributed()
try:
    result = {"read": len(read_reference_split(dataset, "test", limit=2)["ecg"])}
except ValueError as err:
    result = {"error": str(err)}
Path(result_path).write_text(json.dumps(result))
