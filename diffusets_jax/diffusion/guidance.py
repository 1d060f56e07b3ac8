"""Classifier-free guidance (Ho & Salimans 2022): null condition, condition dropout, guided model_fn.

The published DiffuSETS has no guidance; the faithful configs train with dropout probability 0 and
sample with guidance scale 1, which makes every function here a no-op on the faithful path.

A condition is a pytree of per-sample arrays, e.g.
`{"text_embedding": (batch, 1536), "sex": (batch,), "age": (batch,), "heart_rate": (batch,)}`.
A null condition has the same structure with the batch axis left out (it is broadcast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
GUIDANCE_MODES: tuple[str, ...] = ("batched", "sequential")

# Out of the range of every real patient (sex is 0/1, age and heart rate are positive), so the
# network cannot confuse "unknown" with a real value; -1 rather than 0 because 0 is a valid sex.
UNKNOWN_PATIENT_VALUE = -1.0


# The U-Net's per-sample conditions, the keys of every condition dict (`fixed_null_condition`, `generate_batch`).
CONDITION_FIELDS = ("text_embedding", "sex", "age", "heart_rate")


def condition_batch_size(cond: Any, what: str = "cond") -> int:
    """The batch size B of a condition pytree of per-sample arrays `(B, ...)`.

    Checked from the shapes alone (at trace time, before anything compiles), so that a field without the batch
    axis, a Python list or number, or fields of unequal batch size is one ValueError naming the field, not an
    IndexError or an XLA shape error deep inside the network.
    """
    leaves = jax.tree_util.tree_flatten_with_path(cond)[0]
    if not leaves:
        raise ValueError(f"{what}: empty; pass at least one per-sample array, e.g. {{'text_embedding': (B, D)}}")
    sizes: dict[str, int] = {}
    for path, leaf in leaves:
        name = what + jax.tree_util.keystr(path)
        shape = getattr(leaf, "shape", None)
        if shape is None:
            raise ValueError(f"{name} is a Python {type(leaf).__name__}: pass each condition field as one array with "
                             "the batch first, (batch,) or (batch, text_dim), e.g. np.asarray(values, np.float32)")
        if len(shape) == 0:
            raise ValueError(f"{name} is a scalar: each condition field needs the batch axis first, (batch,) or "
                             "(batch, text_dim), one row per sample (np.full(batch, value) repeats a value)")
        sizes[name] = int(shape[0])
    if len(set(sizes.values())) != 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"{what}: every field needs the same batch size (first axis), got {listed}")
    return next(iter(sizes.values()))


def fixed_null_condition(text_dim: int = 1536, unknown_value: float = UNKNOWN_PATIENT_VALUE) -> dict[str, jax.Array]:
    """The fixed null condition: zero text embedding `(text_dim,)`, patient features set to `unknown_value`.

    For a *learned* null condition, put this pytree into the trainable parameters (it is differentiable
    through `drop_conditions`) and pass the trained value to the sampler.
    """
    return {
        "text_embedding": jnp.zeros((text_dim,), jnp.float32),
        "sex": jnp.asarray(unknown_value, jnp.float32),
        "age": jnp.asarray(unknown_value, jnp.float32),
        "heart_rate": jnp.asarray(unknown_value, jnp.float32),
    }


def broadcast_null_condition(null_cond: Any, cond: Any) -> Any:
    """`null_cond` broadcast to the per-sample shapes (and dtypes) of `cond`."""

    def broadcast(path: Any, leaf: jax.Array, null_leaf: jax.Array) -> jax.Array:
        null_leaf = jnp.asarray(null_leaf)
        try:
            fits = np.broadcast_shapes(null_leaf.shape, leaf.shape) == leaf.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"null_cond{jax.tree_util.keystr(path)} has shape {null_leaf.shape}, the condition's "
                             f"field is {leaf.shape}: expected {leaf.shape[1:]} (or the whole {leaf.shape}); "
                             "fixed_null_condition(text_dim) builds one for the model's text width")
        return jnp.broadcast_to(null_leaf.astype(leaf.dtype), leaf.shape)

    return jax.tree_util.tree_map_with_path(broadcast, cond, null_cond)


def drop_conditions(cond: Any, key: jax.Array, p: float | jax.Array, null_cond: Any) -> Any:
    """Replace each sample's whole condition by the null condition with probability `p`.

    Pure and jit-friendly (call it inside the jitted train step; `p` may be traced). All fields of a
    sample are dropped together, the usual choice for classifier-free guidance. The draw is one
    Bernoulli per sample of the global batch, so it does not depend on the sharding.
    cond: pytree of `(batch, ...)` arrays; null_cond: same structure, `(...)` or `(batch, ...)`.
    """
    if isinstance(p, (int, float)) and p == 0:
        return cond  # faithful path: nothing to draw, identical graph to training without dropout
    batch_size = condition_batch_size(cond, "drop_conditions: cond")
    # float32 named: a Python float p is float64 under jax_enable_x64, and the draw would take other bits.
    drop = jax.random.bernoulli(key, jnp.asarray(p, jnp.float32), (batch_size,))

    def choose(leaf: jax.Array, null_leaf: jax.Array) -> jax.Array:
        mask = drop.reshape((batch_size,) + (1,) * (leaf.ndim - 1))
        null_leaf = jnp.asarray(null_leaf)
        # Promote rather than cast down: an int32 sex with a float null becomes float, and a learned
        # float32 null keeps its gradient.
        dtype = jnp.result_type(leaf.dtype, null_leaf.dtype)
        return jnp.where(mask, jnp.broadcast_to(null_leaf, leaf.shape).astype(dtype), leaf.astype(dtype))

    return jax.tree.map(choose, cond, null_cond)


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
    """(batch, ...) x2 -> (2 batch, ...) as a0, b0, a1, b1, … .

    Interleaving (not concatenating) keeps each sample's pair on the device that holds the sample when the
    batch axis is sharded, so the doubled batch needs no communication.
    """
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def guided_model_fn(model_fn: ModelFn, null_cond: Any, guidance_scale: float, mode: str = "batched") -> ModelFn:
    """Classifier-free guided model: out = out_null + scale * (out_cond - out_null).

    Scale 1 returns `model_fn` itself (plain conditional sampling, one network call); scale 0 samples
    from the unconditional model. Guidance is applied to the raw network output, which for epsilon- and
    v-prediction is linear in the score, as in Ho & Salimans.
    mode: "batched" runs one network call on a doubled batch; "sequential" makes two calls. Both give
    the same result; which is faster depends on the backend and batch (see `benchmarks/sampling.py`).
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if guidance_scale == 1.0:
        return model_fn
    if null_cond is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a null condition: pass null_cond "
            "(e.g. diffusets_jax.diffusion.guidance.fixed_null_condition(), or the learned one from training)"
        )

    def guided(x_t: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        null = broadcast_null_condition(null_cond, cond)
        if mode == "sequential":
            out_cond = model_fn(x_t, t, cond)
            out_null = model_fn(x_t, t, null)
        else:
            both = model_fn(_interleave(x_t, x_t), _interleave(t, t), jax.tree.map(_interleave, cond, null))
            both = both.reshape((x_t.shape[0], 2) + both.shape[1:])
            out_cond, out_null = both[:, 0], both[:, 1]
        return out_null + guidance_scale * (out_cond - out_null)

    return guided
