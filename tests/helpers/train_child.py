"""Subprocess entry for the exact-resume and two-process tests: train the tiny task with the real loop.

usage: python tests/helpers/train_child.py WORKDIR STEPS OUT.npz [--block-at I] [--checkpoint-every K]
With JAX_NUM_PROCESSES > 1 in the environment it joins a multi-host run and feeds its slice of each batch.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: tests.helpers and the package

from diffusets_jax import parallel  # noqa: E402

parallel.initialize_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusets_jax.train import loop  # noqa: E402
from tests.helpers.train_helpers import batch_at, tiny_config, tiny_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--block-at", type=int, default=-1, help="hang when batch I is requested (to be killed)")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    args = parser.parse_args()
    batch_size = 16
    per_process = batch_size // jax.process_count()
    lo = jax.process_index() * per_process

    def batches(start_step):
        for step in range(start_step, 10**9):
            if step == args.block_at:
                Path(args.workdir, "blocked").write_text(str(step))
                while True:
                    time.sleep(1)
            yield {k: v[lo:lo + per_process] for k, v in batch_at(step, batch_size).items()}

    config = tiny_config(num_steps=args.steps, checkpoint_every=args.checkpoint_every, log_every=1)
    result = loop.train(tiny_task(), config, args.workdir, batches)
    leaves = jax.tree.leaves(jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if x.is_fully_addressable
                                          else np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True)),
                                          result.state))
    if jax.process_index() == 0:
        tmp = args.out + ".tmp.npz"
        np.savez(tmp, *leaves)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
