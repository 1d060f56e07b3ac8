"""Which models a benchmark builds: the published sizes (the default) or the demo's (`configs/demo_*.py`).

The figures are about the published sizes. The demo's are the same architectures at the widths `make demo`
trains: timing that model, or checking quickly that a benchmark still runs end to end (tests/test_benchmarks.py
does, since compiling the published U-Net's and VAE's gradients takes minutes on 2 cores).

    add_size_argument(parser)
    unet = build("unet", args.size, dtype=compute_dtype)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import flax.linen as nn

from diffusets_jax.config import load_config, module_fields
from diffusets_jax.models.clip import CLIP
from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODULES = {"unet": UNet, "vae": VAE, "clip": CLIP}
SIZES = ("published", "demo")


def add_size_argument(parser: argparse.ArgumentParser) -> None:
    """`--size {published,demo}`, spelled the same by every benchmark that has it."""
    parser.add_argument("--size", choices=SIZES, default="published",
                        help="model sizes: the published ones, or the demo's (configs/demo_*.py; quick, for checks)")


def build(kind: str, size: str, **fields: Any) -> nn.Module:
    """The `kind` module ("unet", "vae", "clip") at `size`; `fields` (e.g. `dtype`) override the architecture's."""
    if size == "published":
        return MODULES[kind](**fields)
    architecture = module_fields(load_config(CONFIGS / f"demo_{kind}.py"))
    return MODULES[kind](**{**architecture, **fields})
