"""The U-Net's structure, parameter count, jit/bf16 behaviour and conditioning, on a small and the faithful config."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusets_jax.models.unet import UNet, count_params, sinusoidal_time_table

# Three levels, narrow widths: the same code as the published model at a fraction of the compile time.
SMALL = dict(channels=(8, 16), down_attention_dims=(8, 16), bottleneck_attention_dim=8,
             up_attention_dims=(32, 16), bottleneck_heads=2, text_dim=12)
LENGTH = 16


def small_inputs(batch=3, seed=0, text_dim=12):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(batch, LENGTH, 4)), jnp.float32),
        jnp.asarray(rng.integers(0, 1000, size=batch), jnp.int32),
        jnp.asarray(rng.normal(size=(batch, text_dim)) / np.sqrt(text_dim), jnp.float32),
        jnp.asarray(rng.integers(0, 2, size=batch), jnp.float32),
        jnp.asarray(rng.uniform(20, 90, size=batch), jnp.float32),
        jnp.asarray(rng.uniform(40, 150, size=batch), jnp.float32),
    )


def random_variables(module, inputs, seed=0):
    """`module.init`'s variables with PyTorch-scale uniform weights drawn by NumPy (compiling the ~200 PRNG
    initialisers costs more CPU time than the forward pass; the layer tests cover the initialisers)."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if "embeddings" in jax.tree_util.keystr(path):
            return jnp.asarray(sinusoidal_time_table(*leaf.shape))
        if leaf.ndim == 1:  # norm scales around 1, biases around 0
            return jnp.asarray(("scale" in jax.tree_util.keystr(path)) + rng.uniform(-0.2, 0.2, leaf.shape), leaf.dtype)
        bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]))  # fan_in of Flax (k, in, out) / (in, out) kernels
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def small():
    """(module, variables, jitted apply): one compilation shared by the tests (eager Flax is slow on CPU)."""
    module = UNet(**SMALL)
    return module, random_variables(module, small_inputs()), jax.jit(module.apply)


def test_faithful_parameter_count_and_frozen_tables():
    module = UNet()
    assert module.num_levels == 7
    f32 = jnp.float32
    variables = jax.eval_shape(
        module.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 128, 4), f32), jax.ShapeDtypeStruct((2,), jnp.int32),
        jax.ShapeDtypeStruct((2, 1536), f32), *(jax.ShapeDtypeStruct((2,), f32),) * 3,
    )
    assert set(variables) == {"params", "constants"}
    # The reference's 13,345,792 trainable parameters minus its 13 never-called `block.down` convs
    # (328,356 parameters; see test_convert_unet for the full reference count).
    assert count_params(variables["params"]) == 13_345_792 - 328_356
    tables = jax.tree_util.tree_leaves(variables["constants"])
    assert len(tables) == 13 and all(t.shape == (1000, 64) for t in tables)
    assert not any("embeddings" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"]))


def test_time_table_formula():
    table = sinusoidal_time_table()
    i, j = 41, 5
    assert table[i, j] == np.float32(np.sin((i + 1) * np.exp(-j * 10 / 31)))
    assert table[i, 32 + j] == np.float32(np.cos((i + 1) * np.exp(-j * 10 / 31)))
    # The published table (stored float32) agrees to float32 rounding of arguments up to 1000.
    from tests.helpers.reference_weights import reference_vectors

    np.testing.assert_allclose(table, reference_vectors()["time_embedding_table"], atol=1e-4)


def test_small_forward_shapes_jit_and_batch_independence(small):
    module, variables, apply = small
    inputs = small_inputs()
    eps = apply(variables, *inputs)
    assert eps.shape == (3, LENGTH, 4) and eps.dtype == jnp.float32
    assert np.all(np.isfinite(eps))
    # Each sample's output depends only on its own inputs (attention runs over length, never over batch).
    other = small_inputs(seed=1)
    mixed = tuple(jnp.concatenate([a[:1], b[1:]]) for a, b in zip(inputs, other, strict=True))
    eps_mixed = apply(variables, *mixed)
    np.testing.assert_allclose(eps_mixed[0], eps[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(eps_mixed[1:], eps[1:], atol=1e-3)


@pytest.mark.parametrize("which", [1, 2, 3, 4, 5])
def test_every_condition_changes_the_output(small, which):
    _, variables, apply = small
    inputs = list(small_inputs())
    eps = apply(variables, *inputs)
    inputs[which] = inputs[which] + (1 if which != 2 else 0.5)
    assert not np.allclose(apply(variables, *inputs), eps, atol=1e-5)


def test_fast_cross_attention_equals_the_literal_one(small):
    module, variables, apply = small
    inputs = small_inputs()
    exact = jax.jit(module.clone(exact_cross_attention=True).apply)(variables, *inputs)
    np.testing.assert_allclose(apply(variables, *inputs), exact, rtol=1e-5, atol=1e-5)


def test_composed_self_attention_projections_equal_the_layers_in_turn(small):
    """By default each self-attention linear is multiplied into the attention's projection first; the published
    order (`exact_projections=True`) gives the same U-Net, and only the default takes the composed path."""
    module, variables, apply = small
    inputs = small_inputs()
    exact = module.clone(exact_projections=True)
    np.testing.assert_allclose(apply(variables, *inputs), jax.jit(exact.apply)(variables, *inputs),
                               rtol=1e-5, atol=1e-5)
    assert "HIGHEST" in str(jax.make_jaxpr(module.apply)(variables, *inputs))
    assert "HIGHEST" not in str(jax.make_jaxpr(exact.apply)(variables, *inputs))


def test_attention_head_by_head_gives_the_same_unet(small, monkeypatch):
    """Above a size threshold the CPU runs self-attention one head at a time (`layers.attend`): forcing it on for
    every layer leaves the U-Net's output where it was."""
    from diffusets_jax.models import layers

    module, variables, _ = small
    inputs = small_inputs()

    def traced():  # a new function each time: JAX caches traces by function, and the path is chosen when tracing
        return jax.jit(lambda *args: module.apply(*args)), jax.make_jaxpr(lambda *args: module.apply(*args))

    monkeypatch.setattr(layers, "BY_HEAD_MIN_SCORE_BYTES", float("inf"))
    apply, jaxpr = traced()
    want = apply(variables, *inputs)
    assert "scan" not in str(jaxpr(variables, *inputs))
    monkeypatch.setattr(layers, "BY_HEAD_MIN_SCORE_BYTES", 0)
    apply, jaxpr = traced()
    assert "scan" in str(jaxpr(variables, *inputs))
    np.testing.assert_allclose(apply(variables, *inputs), want, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params(small):
    module, variables, apply = small
    inputs = small_inputs()
    reference = apply(variables, *inputs)
    bf16 = module.clone(dtype=jnp.bfloat16)
    abstract = jax.eval_shape(bf16.init, jax.random.key(0), *inputs)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(abstract))
    eps = jax.jit(bf16.apply)(variables, *inputs)
    assert eps.dtype == jnp.float32
    scale = float(np.abs(reference).max())
    assert float(np.abs(eps - reference).max()) < 0.05 * scale


@pytest.mark.slow
def test_gradients_reach_params_not_constants(small):
    module, variables, _ = small
    inputs = small_inputs()

    @jax.jit
    def loss(params):
        return jnp.sum(module.apply({"params": params, "constants": variables["constants"]}, *inputs) ** 2)

    grads = jax.grad(loss)(variables["params"])
    block = grads["downsampling_blocks_0"]["block"]
    assert np.abs(block["pre_shortcut_convs"]["kernel"]).max() > 0
    assert np.abs(block["time_emb"]["fc1"]["kernel"]).max() > 0
    # The cross-attention's query/key path cannot influence a uniform softmax: zero gradient, as in PyTorch.
    assert np.abs(block["cross_attention"]["to_q"]["kernel"]).max() == 0
    assert np.all(np.isfinite(np.asarray(jax.tree_util.tree_leaves(grads)[0])))


def test_bad_inputs_are_named(small):
    module, variables, _ = small
    x, t, text, sex, age, hr = small_inputs()  # shape checks run at trace time: jax.eval_shape, no compute
    apply = partial(jax.eval_shape, module.apply)
    with pytest.raises(ValueError, match="channels-last"):
        apply(variables, jnp.transpose(x, (0, 2, 1)), t, text, sex, age, hr)
    with pytest.raises(ValueError, match="text_dim=12"):
        apply(variables, x, t, jnp.zeros((3, 7)), sex, age, hr)
    with pytest.raises(ValueError, match="divisible by 4"):
        apply(variables, x[:, :6], t, text, sex, age, hr)
    # Per-sample inputs without their batch axis (or with an extra one) failed deep in an index or a concatenation.
    with pytest.raises(ValueError, match=r"text_embedding has shape \(12,\), expected \(batch, text_dim\) = \(3, 12\)"):
        apply(variables, x, t, text[0], sex, age, hr)
    with pytest.raises(ValueError, match=r"sex has shape \(3, 1\), expected \(batch,\) = \(3,\)"):
        apply(variables, x, t, text, sex[:, None], age, hr)
    with pytest.raises(ValueError, match=r"heart_rate has shape \(2,\), expected"):
        apply(variables, x, t, text, sex, age, hr[:2])
    with pytest.raises(ValueError, match=r"t has shape \(\), expected \(batch,\)"):
        apply(variables, x, jnp.int32(5), text, sex, age, hr)
    with pytest.raises(ValueError, match="t has dtype float32, expected integer timesteps"):
        apply(variables, x, t.astype(jnp.float32), text, sex, age, hr)
    with pytest.raises(ValueError, match="UNet: sex is a Python list; pass an array"):
        apply(variables, x, t, text, [1.0, 0.0, 1.0], age, hr)
    with pytest.raises(ValueError, match="one attention width per"):
        jax.eval_shape(UNet(**{**SMALL, "up_attention_dims": (32,)}).init, jax.random.key(0), *small_inputs())
    # An even kernel padded by kernel_size // 2 lengthens every convolution's output by one sample; the residual
    # sum then failed deep in JAX ("add got incompatible shapes"), a traceback from `train`.
    with pytest.raises(ValueError, match="UNet config: kernel_size must be odd .*, got 4"):
        jax.eval_shape(UNet(**{**SMALL, "kernel_size": 4}).init, jax.random.key(0), *small_inputs())
