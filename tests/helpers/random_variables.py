"""Random model variables without running `init`: shapes from `jax.eval_shape`, values from numpy.

Compiling a model's `init` (random initialisers included) costs far more CPU than the tests that use it;
for tests that only need some well-scaled weights, fill the shapes directly.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def random_variables(module, *init_args, seed: int = 0, **init_kwargs) -> dict:
    """Variables shaped like `module.init(key, *init_args)`, filled with U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Vectors (biases, norm scales) get U(-0.2, 0.2) (+1 for norm scales and variances) so that no test can
    pass by accident on zeros and ones.
    """
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args, **init_kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if len(shape) >= 2:
            bound = 1 / math.sqrt(math.prod(shape[:-1]))  # Flax kernels: (..., in, out)
            return rng.uniform(-bound, bound, shape).astype(np.float32)
        offset = 1.0 if ("scale" in name or "'var'" in name) else 0.0
        return (offset + rng.uniform(-0.2, 0.2, shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)
