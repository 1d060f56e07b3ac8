"""Which models a benchmark builds (the published sizes, the default, or the demo's: `configs/demo_*.py`) and the
random weights it times them with.

The figures are about the published sizes. The demo's are the same architectures at the widths `make demo`
trains: timing that model, or checking quickly that a benchmark still runs end to end (tests/test_benchmarks.py
does, since compiling the published U-Net's and VAE's gradients takes minutes on 2 cores).

    add_size_argument(parser)
    unet = build("unet", args.size)
    variables = random_variables(unet.init, *example_inputs)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import flax.linen as nn

# JAX, Flax and the models are imported where they are used: a benchmark adds `--size` to its parser before it
# imports JAX, so that a bad flag is refused in a second (arguments.py).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = ("published", "demo")


def add_size_argument(parser: argparse.ArgumentParser) -> None:
    """`--size {published,demo}`, spelled the same by every benchmark that has it."""
    parser.add_argument("--size", choices=SIZES, default="published",
                        help="model sizes: the published ones, or the demo's (configs/demo_*.py; quick, for checks)")


def build(kind: str, size: str) -> nn.Module:
    """The `kind` module ("unet", "vae", "clip") at `size`, computing in float32 (a lower compute dtype is the
    caller's, e.g. `jit_generate(compute_dtype=...)`, as the commands do it)."""
    from diffusets_jax.config import load_config, module_fields
    from diffusets_jax.models.clip import CLIP
    from diffusets_jax.models.unet import UNet
    from diffusets_jax.models.vae import VAE

    module = {"unet": UNet, "vae": VAE, "clip": CLIP}[kind]
    if size == "published":
        return module()
    return module(**module_fields(load_config(CONFIGS / f"demo_{kind}.py")))


def random_variables(init: Callable, *args: Any) -> dict:
    """Variables shaped like `init(key, *args)` (e.g. `module.init`), filled from NumPy.

    Timing does not depend on the values, and this skips compiling the initialisers: one PRNG computation per
    parameter (371 in the demo U-Net) compiles for longer on CPU than the forward pass itself (the demo U-Net's
    `jax.jit(init)` 20 s, the same init run op by op 30 s). Weights are N(0, 0.05^2); normalisation scales and
    BatchNorm variances are 1 + N(0, 0.05^2), so that no normalisation divides by a negative variance or
    multiplies by zero.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    abstract = jax.eval_shape(init, jax.random.key(0), *args)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        offset = 1.0 if ("'scale'" in name or "'var'" in name) else 0.0
        return jnp.asarray(offset + rng.normal(0.0, 0.05, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
