"""One process of the two-process `save_model` test (started by tests/test_models_bundle.py).

argv: process_id, coordinator port, model directory. Process 0 alone saves a small model there (as process 0
alone exports a training), then both meet at a barrier and process 1 loads it.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, like the parent test process

process_id, port, directory = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id)

import numpy as np  # noqa: E402

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.models.bundle import load_model, save_model  # noqa: E402
from diffusets_jax.models.net1d import BatchNorm1d  # noqa: E402

parallel.initialize_distributed()
if process_id == "0":
    save_model(directory, "bn", BatchNorm1d(momentum=0.2),
               {"params": {"scale": np.full(3, 2.0, np.float32), "bias": np.ones(3, np.float32)}})
parallel.barrier("model-saved")
_, variables = load_model(directory, "bn")
assert variables["params"]["scale"].tolist() == [2.0, 2.0, 2.0], variables
