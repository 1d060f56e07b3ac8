"""Lower compute dtypes from float32 parameters (diffusets_jax/models/precision.py), shared by trainers and samplers."""

import flax.linen as nn
import jax.numpy as jnp

from diffusets_jax.models.precision import cast_floating, with_compute_dtype
from diffusets_jax.models.unet import UNet
from diffusets_jax.models.vae import VAE


def test_cast_floating_casts_only_floating_leaves():
    tree = {"w": jnp.ones((2, 3)), "steps": jnp.arange(3), "mask": jnp.array([True, False]),
            "nested": [jnp.zeros(2, jnp.float16)]}
    cast = cast_floating(tree, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["nested"][0].dtype == jnp.bfloat16
    assert cast["steps"].dtype == tree["steps"].dtype and cast["mask"].dtype == jnp.bool_


def test_with_compute_dtype_sets_the_field_where_a_module_has_one():
    for module in (UNet(channels=(8, 16)), VAE(widths=(8, 16), groups=4)):
        assert module.dtype is None
        computing = with_compute_dtype(module, jnp.bfloat16)
        assert computing.dtype == jnp.bfloat16 and module.dtype is None  # a copy; the original is untouched
        assert computing.clone(dtype=None) == module  # nothing else changed
    dense = nn.Dense(3)  # has `dtype` too
    assert with_compute_dtype(dense, jnp.bfloat16).dtype == jnp.bfloat16

    class NoDtype(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x

    plain = NoDtype()
    assert with_compute_dtype(plain, jnp.bfloat16) is plain
