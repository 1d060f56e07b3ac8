"""`batch_threefry`: the same random values as JAX's own threefry, bit for bit, from a few batched calls."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax import parallel
from diffusets_jax.batched_threefry import batch_threefry
from diffusets_jax.config import load_config
from diffusets_jax.train.run import make_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Tiny versions of the three trained models: the same layers and initialisers as the published sizes.
TINY = {
    "vae": ("demo_vae.py", ["model.widths=(8, 16, 16)", "model.groups=4", "model.num_res_blocks=1",
                             "data.num_train_examples=64"]),
    "unet": ("diffusets_unet.py", ["model.channels=(8, 16)", "model.down_attention_dims=(8, 16)",
                                   "model.bottleneck_attention_dim=8", "model.up_attention_dims=(32, 16)",
                                   "model.bottleneck_heads=2", "model.text_dim=12"]),
    "clip": ("demo_clip.py", ["model.filters=(8, 16)", "model.blocks_per_stage=(1, 1)", "model.text_dim=8",
                              "model.kernel_size=4", "data.num_train_examples=64"]),
}


def _init_fn(name: str):
    config_file, overrides = TINY[name]
    return make_task(name, load_config(CONFIGS / config_file, overrides), num_steps=10).init_variables


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=parallel.RUN_ONCE_CPU_COMPILER_OPTIONS)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def _count(jaxpr, name: str) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count(sub, name)
    return total


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_init_is_bit_identical_from_a_few_threefry_calls(name):
    init = _init_fn(name)
    key = jax.random.PRNGKey(3)
    _assert_bitwise_equal(_compiled(batch_threefry(init), key)(key), _compiled(init, key)(key))
    plain, batched = jax.make_jaxpr(init)(key).jaxpr, jax.make_jaxpr(batch_threefry(init))(key).jaxpr
    draws = _count(plain, "random_bits") + _count(plain, "random_fold_in")
    assert draws > 20, f"{name}: {draws} draws; the comparison needs a model with many"
    # Every draw went into a batch: one threefry call per dependency level (key derivations, then the draws).
    assert _count(batched, "random_bits") == _count(batched, "random_fold_in") == 0
    assert _count(batched, "threefry2x32") <= 12, _count(batched, "threefry2x32")


def _mixed(key, x):
    """Draws that depend on computed values and on each other, outputs that are keys, draws JAX must keep
    (a 16-bit draw, a batch of keys) and a nested jit."""
    k = jax.random.fold_in(key, jnp.sum(x > 0).astype(jnp.uint32))
    a = jax.random.normal(k, (3, 5))
    keys = jax.random.split(k, 4)
    b = jax.random.uniform(keys[1], (7,)) + jnp.sum(a)
    c = jax.random.randint(jax.random.fold_in(keys[2], 9), (2, 2), 0, 100)
    half = jax.random.normal(keys[3], (4,), dtype=jnp.bfloat16)  # 16-bit draw: not batched
    many = jax.vmap(lambda kk: jax.random.normal(kk, (2,)))(keys)  # batched keys: not batched
    nested = jax.jit(lambda kk: jax.random.bernoulli(kk, 0.3, (6,)))(jax.random.fold_in(key, 1))
    typed = jax.random.split(jax.random.key(7), (2, 3))
    return {"a": a, "b": b, "c": c, "half": half, "many": many, "nested": nested, "keys": keys, "typed": typed,
            "x": x * 2}


def test_dependent_draws_keys_and_unbatchable_draws_match_jax():
    key = jax.random.PRNGKey(11)
    x = jnp.linspace(-1, 1, 9)
    expected = jax.jit(_mixed)(key, x)
    _assert_bitwise_equal(jax.jit(batch_threefry(_mixed))(key, x), expected)
    _assert_bitwise_equal(batch_threefry(_mixed)(key, x), expected)  # traced eagerly too


def test_non_partitionable_threefry_is_left_alone():
    with jax.threefry_partitionable(False):
        assert batch_threefry(_mixed) is _mixed
