"""One process of the two-process `output_dir` tests (started by tests/test_io_run_dir.py).

argv: process_id, coordinator port, output folder, settings JSON, result JSON path[, "write"][, "overwrite"].
Claims the folder with `output_dir(..., command="sample")` (with `overwrite=True` given "overwrite") and writes
{"error": message} or {"claimed": path, "resumed": ..., "complete": ...} to the result path. With "write", it also
writes an output file into the folder and marks the run complete, as a finished `sample` does.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, like the parent test process

process_id, port, out, settings, result_path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
write, overwrite = "write" in sys.argv[6:], "overwrite" in sys.argv[6:]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id)

from diffusets_jax import parallel  # noqa: E402
from diffusets_jax.io.run_dir import output_dir  # noqa: E402

parallel.initialize_distributed()
try:
    with output_dir(out, command="sample", settings=json.loads(settings), overwrite=overwrite) as run:
        result = {"claimed": str(run.path), "resumed": run.resumed, "complete": run.complete}
        if write:
            (run.path / f"samples-{int(process_id):05d}-of-00002.npz").write_bytes(b"npz")
            run.mark_complete()
except ValueError as err:
    result = {"error": str(err)}
Path(result_path).write_text(json.dumps(result))
