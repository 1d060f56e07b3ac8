"""Running a model in a lower compute dtype (bf16) from float32 parameters: the one way the trainers and the
samplers do it.

Both are needed: `with_compute_dtype` makes the module's layers compute in the dtype, and `cast_floating` casts
the parameters and inputs. Casting alone is not enough for a module with a `dtype` field: a float32 constant inside
it (the U-Net's frozen time tables) promotes every layer after it back to float32, so most of its
convolutions and matmuls would silently run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast the floating-point leaves of `tree` to `dtype` (bf16 compute on f32 master params); others stay."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_compute_dtype(module: nn.Module, dtype: Any) -> nn.Module:
    """`module` computing in `dtype` when it has a `dtype` field (the VAE and U-Net do), else `module` as is.

    Its own `dtype` makes every layer compute in that dtype, with the norms, softmax and the cross-attention's
    value combiner kept in float32 by the layers themselves.
    """
    if any(field.name == "dtype" for field in dataclasses.fields(module)):
        return module.clone(dtype=dtype)
    return module
