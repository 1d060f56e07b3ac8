"""One process of the two-process tests of a process leaving a run (started by tests/test_parallel.py).

argv: process_id, coordinator port, mode. Both processes join (heartbeat timeout 3 s) and take part in two
collectives; then, by mode:
- "raise": process 1 raises (an uncaught exception: a bug) and process 0 waits as at a collective that never
  returns (NCCL waits so for a peer that left; gloo on CPU would notice at once);
- "kill": process 1 is SIGKILLed (the kernel's OOM killer, a scheduler), process 0 waits the same way;
- "finish": both finish, process 1 6 s after process 0 (its own results to write), and both exit 0.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, like the parent test process

process_id, port, mode = sys.argv[1], sys.argv[2], sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id,
                  DIFFUSETS_HEARTBEAT_TIMEOUT_S="3")

from diffusets_jax import parallel  # noqa: E402

parallel.initialize_distributed()
for step in range(2):
    parallel.allgather_objects(step)
if process_id == "1":
    if mode == "raise":
        raise RuntimeError("process 1 failed outside failing_together")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(6)
elif mode != "finish":
    time.sleep(600)
print(f"process {process_id} finished")
